"""Random operation sequences: the real policy agrees with the model.

A hypothesis state machine runs requests, starts, stops, renewals, profile
changes, blocks, lost keys, a lost script cache and clock moves (backwards
too) through two policies sharing one Redis, and checks every answer and
the users' whole state against the in-memory model in ``model.py``.

The model ignores key TTLs, which Redis counts in real time while the
scripts here read the test clock. So the clock moves in steps of two
seconds and request buckets refill at most 30 tokens a minute for costs of
at least one token: every TTL a script sets is then at least two seconds
of real time, far longer than a run of ``STEPS`` operations takes, and no
key expires under the test's feet.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Optional

import fakeredis
import pytest
import redis.asyncio as aredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from conftest import Clock
from model import (
    Config,
    Model,
    RenewAnswer,
    Replica,
    StartAnswer,
    clock_us,
)
from pactown_redis import (
    LeaseLostError,
    SecurityCheckResult,
    SecurityPolicy,
    UserProfile,
    UserTier,
)

USERS = ("alice", "b:{ob}")
SERVICES = ("s1", "s2", "s3")
REPLICAS = (0, 1)
STEPS = 30

CONFIG = Config(
    default_tier=UserTier.FREE,
    lease_ms=30_000,
    start_burst=2,
    start_per_minute=20.0,
    rapid_threshold=3,
)
POLICY_OPTIONS: dict[str, Any] = dict(
    default_tier=CONFIG.default_tier,
    lease_ttl=CONFIG.lease_ms / 1000,
    start_burst=CONFIG.start_burst,
    default_rate_limit=CONFIG.start_per_minute,
    rapid_restart_threshold=CONFIG.rapid_threshold,
    cpu_threshold=None,
    memory_threshold=None,
    # Every decision must be the shared one: no deadline on a busy machine.
    timeout=30.0,
)

users = st.sampled_from(USERS)
services = st.sampled_from(SERVICES)
replicas = st.sampled_from(REPLICAS)
costs = st.sampled_from([1, 1.5, 2, 3.25, 7, 20, 61, 150])
steps = st.sampled_from(
    [2.0, 4.0, 10.0, 28.0, 30.0, 32.0, 60.0, 120.0, 600.0,
     3598.0, 3600.0, 3602.0, -2.0, -4.0, -30.0, -600.0, -3600.0]
)


def _override(values: list[Any]) -> st.SearchStrategy[Any]:
    """Either the tier's own value (None) or one of ``values``."""
    return st.none() | st.sampled_from(values)


@st.composite
def profiles(draw: st.DrawFn) -> UserProfile:
    """A tier's profile, some limits replaced by custom ones."""
    user_id = draw(users)
    tier = draw(st.sampled_from([UserTier.FREE, UserTier.BASIC, UserTier.PRO]))
    data = UserProfile.from_tier(user_id, tier).model_dump()
    custom = {
        "max_concurrent_services": draw(_override([0, 1, 2, 3])),
        "max_memory_mb": draw(_override([0, 100, 256, 512])),
        "max_cpu_percent": draw(_override([0, 10, 25, 50])),
        # Always replaced: faster buckets would set TTLs below two seconds.
        "max_requests_per_minute": draw(st.sampled_from([1, 3, 20, 30])),
        "max_services_per_hour": draw(_override([0, 1, 2, 5])),
    }
    data.update({k: v for k, v in custom.items() if v is not None})
    data["allowed_ports"] = draw(
        st.sampled_from([None, [], [80], [80, 8080]])
    )
    return UserProfile.parse(data)


def start_answer(result: SecurityCheckResult) -> StartAnswer:
    """The fields of a start result the model predicts."""
    anomaly = result.anomaly
    return StartAnswer(
        allowed=result.allowed,
        reason=result.reason,
        delay_seconds=result.delay_seconds,
        retry_after=result.retry_after,
        fence=result.fence,
        already_running=result.already_running,
        anomaly=None if anomaly is None else (
            anomaly.anomaly_type, anomaly.severity, anomaly.details
        ),
    )


class PolicyMachine(RuleBasedStateMachine):
    """Two replicas and the model, driven by the same operations."""

    def __init__(self, backend: str, url: Optional[str]) -> None:
        super().__init__()
        self.backend = backend
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.client: Any = None
        self.policies: list[SecurityPolicy] = []

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @property
    def now(self) -> float:
        return clock_us(self.clock())

    # -- setup ---------------------------------------------------------------

    @initialize()
    def begin(self) -> None:
        self.run(self._open())
        self.model = Model(CONFIG)
        self.replicas = [Replica() for _ in REPLICAS]

    async def _open(self) -> None:
        if self.backend == "fake":
            self.client = fakeredis.FakeAsyncRedis(
                server=fakeredis.FakeServer(), protocol=3
            )
        else:
            self.client = aredis.from_url(self.url, protocol=3)
        await self.client.flushall()
        self.lost = [[] for _ in REPLICAS]
        self.policies = [
            SecurityPolicy(
                self.client,
                clock=self.clock,
                on_lease_lost=lambda u, s, lost=lost: lost.append((u, s)),
                **POLICY_OPTIONS,
            )
            for lost in self.lost
        ]

    def teardown(self) -> None:
        async def close() -> None:
            for policy in self.policies:
                await policy.close()
            if self.client is not None:
                await self.client.aclose()

        try:
            self.run(close())
        finally:
            self.loop.close()

    # -- checks ------------------------------------------------------------

    def _check_user(self, user_id: str) -> None:
        state = self.run(self.policies[0].get_user_state(user_id))
        assert state == self.model.state(user_id, self.now)

    def _check_replica(self, index: int) -> None:
        assert self.policies[index].held_leases() == (
            self.replicas[index].held
        )
        assert self.lost[index] == self.replicas[index].lost

    # -- operations ----------------------------------------------------------

    @rule(replica=replicas, user_id=users, cost=costs)
    def request(self, replica: int, user_id: str, cost: float) -> None:
        got = self.run(self.policies[replica].check_rate_limit(user_id, cost))
        assert got == self.model.rate_limit(user_id, cost, self.now)
        self._check_user(user_id)

    @rule(
        replica=replicas,
        user_id=users,
        service_id=services,
        port=st.sampled_from([None, 80, 8080, 22]),
        memory=st.sampled_from([0, 64, 100.5, 128, 300]),
        cpu=st.sampled_from([0, 5, 12.25, 30]),
    )
    def start(
        self,
        replica: int,
        user_id: str,
        service_id: str,
        port: Optional[int],
        memory: float,
        cpu: float,
    ) -> None:
        got = self.run(
            self.policies[replica].check_can_start_service(
                user_id, service_id, port=port, memory_mb=memory,
                cpu_percent=cpu,
            )
        )
        want = self.model.start(
            self.replicas[replica], user_id, service_id, port=port,
            memory=memory, cpu=cpu, now=self.now,
        )
        assert not got.degraded
        assert start_answer(got) == want
        self._check_user(user_id)
        self._check_replica(replica)

    @rule(replica=replicas, user_id=users, service_id=services)
    def start_plain(self, replica: int, user_id: str, service_id: str) -> None:
        self.start(replica, user_id, service_id, None, 0, 0)

    @rule(replica=replicas, user_id=users, service_id=services)
    def stop(self, replica: int, user_id: str, service_id: str) -> None:
        got = self.run(
            self.policies[replica].unregister_service(user_id, service_id)
        )
        want = self.model.release(
            self.replicas[replica], user_id, service_id, self.now
        )
        assert got == want
        self._check_user(user_id)
        self._check_replica(replica)

    @rule(replica=replicas, user_id=users, service_id=services)
    def register(self, replica: int, user_id: str, service_id: str) -> None:
        model_replica = self.replicas[replica]
        held = model_replica.held.get(user_id, {}).get(service_id)
        (want,) = self.model.renew(
            model_replica, user_id, {service_id: held}, self.now
        )
        call = self.policies[replica].register_service(user_id, service_id)
        if want.status == "lost":
            with pytest.raises(LeaseLostError):
                self.run(call)
        else:
            assert self.run(call) == want.fence
        self._check_user(user_id)
        self._check_replica(replica)

    @rule(replica=replicas)
    def renew(self, replica: int) -> None:
        model_replica = self.replicas[replica]
        want: list[RenewAnswer] = []
        for user_id, held in list(model_replica.held.items()):
            want += self.model.renew(
                model_replica, user_id, dict(held), self.now
            )
        got = self.run(self.policies[replica].renew_leases())
        assert [
            RenewAnswer(o.service_id, o.status, o.fence, o.expiry_ms)
            for o in got
        ] == want
        self._check_replica(replica)
        for user_id in USERS:
            self._check_user(user_id)

    @rule(profile=profiles())
    def set_profile(self, profile: UserProfile) -> None:
        self.run(self.policies[0].set_user_profile(profile))
        self.model.set_profile(profile)
        self._check_user(profile.user_id)

    @rule(
        replica=replicas,
        user_id=users,
        blocked=st.booleans(),
        reason=st.sampled_from(["", "abuse"]),
    )
    def block(
        self, replica: int, user_id: str, blocked: bool, reason: str
    ) -> None:
        policy = self.policies[replica]
        if blocked:
            self.run(policy.block_user(user_id, reason))
        else:
            self.run(policy.unblock_user(user_id))
        self.model.set_blocked(user_id, blocked, reason if blocked else "")

    @rule(replica=replicas, user_id=users, delete=st.booleans())
    def profile(self, replica: int, user_id: str, delete: bool) -> None:
        policy = self.policies[replica]
        if delete:
            got = self.run(policy.delete_user_profile(user_id))
            assert got == self.model.delete_profile(user_id)
        got = self.run(policy.get_user_profile(user_id))
        assert got == self.model.limits(user_id).profile(user_id)

    @rule(seconds=steps)
    def move_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for user_id in USERS:
            self._check_user(user_id)

    @rule(pick=st.integers(0, 7), offset=st.sampled_from([-2.0, 0.0, 2.0]))
    def move_clock_to_boundary(self, pick: int, offset: float) -> None:
        now = self.now
        ahead = sorted({m for m in self.model.moments() if m + offset > now})
        if ahead:
            self.clock.now = ahead[pick % len(ahead)] / 1e6 + offset
        for user_id in USERS:
            self._check_user(user_id)

    @rule(user_id=users, keep_profile=st.booleans())
    def lose_keys(self, user_id: str, keep_profile: bool) -> None:
        keys = self.policies[0].keys.user(user_id)
        lost = [k for k in keys.all() if not (keep_profile and k == keys.profile)]
        self.run(self.client.delete(*lost))
        self.model.lose_state(user_id, keep_profile=keep_profile)
        self._check_user(user_id)

    @rule()
    def flush_scripts(self) -> None:
        self.run(self.client.script_flush())


def _run(backend: str, url: Optional[str], examples: int) -> None:
    run_state_machine_as_test(
        lambda: PolicyMachine(backend, url),
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_policy_matches_model_on_fakeredis() -> None:
    """Every answer and every user's state agree with the model (fake)."""
    _run("fake", None, examples=150)


def test_policy_matches_model_on_real_redis(redis_server) -> None:
    """Every answer and every user's state agree with the model (real)."""
    _run("real", redis_server.url, examples=60)


@pytest.mark.parametrize(
    ("moves", "granted", "last"),
    [
        ([], 20, (False, 0, 3.0)),
        ([3.0], 21, (False, 0, 3.0)),
        ([-600.0, 2.9], 20, (False, 0, pytest.approx(0.1))),
        ([-600.0, 3.0], 21, (False, 0, 3.0)),
        ([3600.0], 21, (True, 18, 0.0)),
    ],
)
def test_model_bucket_by_hand(moves, granted, last):
    """The model's free-tier bucket: 20 at once, one per 3 s; a clock
    that steps back owes the step, at most a whole refill."""
    model = Model(CONFIG)
    clock = Clock()

    def request(cost: float = 1) -> Any:
        return model.rate_limit("u", cost, clock_us(clock()))

    allowed = sum(request().allowed for _ in range(20))
    for seconds in moves:
        clock.advance(seconds)
        allowed += request().allowed
    result = request()
    assert allowed == granted
    assert (result.allowed, result.remaining, result.retry_after) == last
    assert math.isinf(request(21).retry_after)
