"""A plain in-memory reference model of the policy's rules, for tests.

The model keeps, per user, what the scripts keep in Redis (profile, the two
buckets, leases with their metadata, start history, fencing counter) and,
per replica, what a policy remembers (held leases, lost-lease callbacks).
Each operation follows the rules stated in the scripts' contracts, with
the same double-precision operations in the same order, so its answers can
be compared with the real policy's exactly.

It deliberately ignores key TTLs: a TTL only drops state that the rules
already treat as gone (a full bucket, expired leases, old starts), and the
tests that use the model keep each run far shorter than any TTL. Automatic
blocking and the overload check are outside the model; tests that use it
leave both off.

Time is the test clock's, in microseconds, as the scripts receive it.
Since the model states the rules down to when expired state is trimmed, a
change to a script's rules needs the same change here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from pactown_redis import (
    TIER_LIMITS,
    AnomalyType,
    RateLimitResult,
    Severity,
    UserProfile,
    UserTier,
)
from pactown_redis._core import HeldLease, LeaseInfo, UserState

HOUR_MS = 3_600_000
RAPID_WINDOW_MS = 60_000


def clock_us(seconds: float) -> float:
    """Return a clock reading as the scripts get it: whole microseconds."""
    return float(int(seconds * 1_000_000))


def number_text(value: float) -> str:
    """Format a count or quota as denial messages show it."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Limits:
    """A profile as the scripts read it."""

    conc: float
    mem: float
    cpu: float
    rpm: float
    sph: float
    tier: str
    ports: Optional[frozenset[int]]
    blocked: bool
    reason: str

    @classmethod
    def of(cls, profile: UserProfile) -> "Limits":
        ports = profile.allowed_ports
        return cls(
            conc=float(profile.max_concurrent_services),
            mem=float(profile.max_memory_mb),
            cpu=float(profile.max_cpu_percent),
            rpm=float(profile.max_requests_per_minute),
            sph=float(profile.max_services_per_hour),
            tier=profile.tier.value,
            ports=None if ports is None else frozenset(ports),
            blocked=profile.blocked,
            reason=profile.reason or "",
        )

    def profile(self, user_id: str) -> UserProfile:
        """Return the profile a policy reads back for these limits."""
        return UserProfile(
            user_id=user_id,
            tier=UserTier(self.tier),
            max_concurrent_services=int(self.conc),
            max_memory_mb=int(self.mem),
            max_cpu_percent=int(self.cpu),
            max_requests_per_minute=int(self.rpm),
            max_services_per_hour=int(self.sph),
            allowed_ports=None if self.ports is None else sorted(self.ports),
            blocked=self.blocked,
            reason=self.reason or None,
        )


@dataclass
class Bucket:
    """A stored token bucket: the nanosecond at which it is full again."""

    full_ns: int


@dataclass
class Fence:
    """The fencing counter: the last token handed out, when the counter
    was created, and the fences of restored leases since released."""

    last: float
    born: Optional[float]
    gone: dict[str, float] = field(default_factory=dict)


@dataclass
class UserData:
    """Everything the scripts store for one user."""

    profile: Optional[Limits] = None
    requests: Optional[Bucket] = None
    start_rate: Optional[Bucket] = None
    # Service id -> expiry (ms), and -> (memory, cpu, fence). Quotas are
    # summed over live leases in expiry order, as the script reads them.
    leases: dict[str, float] = field(default_factory=dict)
    meta: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # Start history: member (the fence, as text) -> start time (us).
    starts: dict[str, float] = field(default_factory=dict)
    fence: Optional[Fence] = None


@dataclass(frozen=True)
class StartAnswer:
    """What ``check_can_start_service`` should return, field by field."""

    allowed: bool
    reason: Optional[str]
    delay_seconds: float
    retry_after: Optional[float]
    fence: Optional[int]
    already_running: bool
    anomaly: Optional[tuple[AnomalyType, Severity, str]]


@dataclass(frozen=True)
class RenewAnswer:
    """One lease's outcome of a renewal."""

    service_id: str
    status: str
    fence: int
    expiry_ms: int


@dataclass
class Replica:
    """What one policy instance remembers: the leases it holds (in the
    order it renews them), the lost leases it reported, and the fences of
    those not yet unregistered."""

    held: dict[str, dict[str, HeldLease]] = field(default_factory=dict)
    lost: list[tuple[str, str]] = field(default_factory=list)
    lost_fences: dict[tuple[str, str], int] = field(default_factory=dict)

    def hold(self, user_id: str, service_id: str, lease: HeldLease) -> None:
        self.held.setdefault(user_id, {})[service_id] = lease
        self.lost_fences.pop((user_id, service_id), None)

    def drop(self, user_id: str, service_id: str) -> None:
        leases = self.held.get(user_id)
        if leases is not None:
            leases.pop(service_id, None)
            if not leases:
                del self.held[user_id]


@dataclass(frozen=True)
class Config:
    """The policy options the model decides by."""

    default_tier: UserTier = UserTier.FREE
    lease_ms: int = 30_000
    start_burst: int = 10
    start_per_minute: float = 60.0
    rapid_threshold: int = 5


class Model:
    """The rules, applied to plain Python state."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.users: dict[str, UserData] = {}
        tier = TIER_LIMITS[config.default_tier]
        self.defaults = Limits(
            conc=float(tier["max_concurrent_services"]),
            mem=float(tier["max_memory_mb"]),
            cpu=float(tier["max_cpu_percent"]),
            rpm=float(tier["max_requests_per_minute"]),
            sph=float(tier["max_services_per_hour"]),
            tier=config.default_tier.value,
            ports=None,
            blocked=False,
            reason="",
        )

    def user(self, user_id: str) -> UserData:
        return self.users.setdefault(user_id, UserData())

    def limits(self, user_id: str) -> Limits:
        return self.user(user_id).profile or self.defaults

    # -- profiles ----------------------------------------------------------

    def set_profile(self, profile: UserProfile) -> None:
        self.user(profile.user_id).profile = Limits.of(profile)

    def set_blocked(self, user_id: str, blocked: bool, reason: str) -> None:
        """A block or unblock patches an existing profile and otherwise
        stores the default tier's with the patch applied."""
        data = self.user(user_id)
        base = data.profile or self.defaults
        data.profile = Limits(
            **{**base.__dict__, "blocked": blocked, "reason": reason}
        )

    def delete_profile(self, user_id: str) -> bool:
        data = self.user(user_id)
        existed = data.profile is not None
        data.profile = None
        return existed

    def lose_state(self, user_id: str, *, keep_profile: bool) -> None:
        """Redis lost every key of the user (the profile too, unless
        ``keep_profile``)."""
        profile = self.user(user_id).profile
        self.users[user_id] = UserData(
            profile=profile if keep_profile else None
        )

    # -- buckets -----------------------------------------------------------

    @staticmethod
    def _debt(bucket: Optional[Bucket], now: float) -> float:
        """Nanoseconds until the bucket is full; none for a missing one."""
        if bucket is None:
            return 0.0
        return float(max(0, bucket.full_ns - int(now) * 1000))

    def _debt_for_decision(
        self, bucket: Optional[Bucket], now: float, refill_ns: float
    ) -> tuple[float, Optional[Bucket]]:
        """The debt a decision starts from, and the bucket then stored: a
        debt beyond a whole refill (the clock stepped back) is emptied
        from ``now``."""
        debt = self._debt(bucket, now)
        if debt > refill_ns:
            return refill_ns, self._stored(refill_ns, now)
        return debt, bucket

    @staticmethod
    def _tokens(debt: float, capacity: float, ns_per_token: float) -> float:
        return max(0.0, capacity - debt / ns_per_token)

    def _level(
        self,
        bucket: Optional[Bucket],
        now: float,
        capacity: float,
        ns_per_token: float,
    ) -> float:
        """The tokens a state read reports, storing nothing."""
        debt = min(self._debt(bucket, now), capacity * ns_per_token)
        return self._tokens(debt, capacity, ns_per_token)

    @staticmethod
    def _wait(
        debt: float, capacity: float, ns_per_token: float, cost: float
    ) -> float:
        return debt - (capacity - cost) * ns_per_token

    @staticmethod
    def _stored(debt: float, now: float) -> Optional[Bucket]:
        """The bucket written ``debt`` ns from full: whole nanoseconds,
        rounded down; none when full."""
        whole = math.floor(debt)
        return None if whole <= 0 else Bucket(int(now) * 1000 + whole)

    def rate_limit(self, user_id: str, cost: float, now: float) -> RateLimitResult:
        data = self.user(user_id)
        capacity = self.limits(user_id).rpm
        ns_per_token = 60e9 / capacity
        debt, data.requests = self._debt_for_decision(
            data.requests, now, capacity * ns_per_token
        )

        def answer(allowed: bool, retry_ns: float) -> RateLimitResult:
            tokens = self._tokens(debt, capacity, ns_per_token)
            return RateLimitResult(
                allowed=allowed,
                limit=int(capacity),
                remaining=int(math.floor(tokens)),
                retry_after=math.inf if retry_ns < 0 else retry_ns / 1e9,
                reset_after=debt / 1e9,
            )

        if cost > capacity:
            return answer(False, -1)
        wait = self._wait(debt, capacity, ns_per_token, cost)
        if wait > 0:
            return answer(False, wait)
        debt = float(math.floor(debt + cost * ns_per_token))
        data.requests = self._stored(debt, now)
        return answer(True, 0)

    # -- leases ------------------------------------------------------------

    @staticmethod
    def _purge(data: UserData, now_ms: float) -> None:
        for service_id in [s for s, e in data.leases.items() if e <= now_ms]:
            del data.leases[service_id]
            data.meta.pop(service_id, None)

    def _next_fence(self, data: UserData, now: float) -> float:
        last = data.fence.last if data.fence else 0.0
        fence = max(now, last + 1)
        if data.fence is None:
            data.fence = Fence(fence, now)
        data.fence.last = fence
        if data.fence.born is None:
            data.fence.born = now
        return fence

    def _rapid(self, data: UserData, now: float) -> int:
        since = now - RAPID_WINDOW_MS * 1000
        return sum(1 for score in data.starts.values() if score >= since)

    def start(
        self,
        replica: Replica,
        user_id: str,
        service_id: str,
        *,
        port: Optional[int],
        memory: float,
        cpu: float,
        now: float,
    ) -> StartAnswer:
        """Every check of a start in the scripts' order; reserve on pass.

        Checks count live state only and change nothing; expired leases
        and starts older than the hour are trimmed by a granted start."""
        data = self.user(user_id)
        p = self.limits(user_id)
        cfg = self.config
        if p.blocked:
            return self._deny(
                f"User blocked: {p.reason or 'No reason provided'}",
                AnomalyType.UNAUTHORIZED_ACCESS,
                Severity.HIGH,
                f"Blocked user {user_id} attempted to start a service",
            )

        now_ms = float(math.floor(now / 1000))
        expiry_ms = now_ms + cfg.lease_ms
        live = sorted(
            (e, s.encode("utf-8"), s)
            for s, e in data.leases.items() if e > now_ms
        )

        if data.leases.get(service_id, -math.inf) > now_ms:
            fence = data.meta.get(service_id, (0.0, 0.0, 0.0))[2]
            data.leases[service_id] = expiry_ms
            return self._grant(
                replica, user_id, service_id, fence, expiry_ms,
                memory, cpu, rapid=None,
            )

        ns_per_start = 60e9 / cfg.start_per_minute
        burst = float(cfg.start_burst)
        start_debt, data.start_rate = self._debt_for_decision(
            data.start_rate, now, burst * ns_per_start
        )
        wait = self._wait(start_debt, burst, ns_per_start, 1)
        if wait > 0:
            retry = wait / 1e9
            return self._deny(
                f"Rate limit exceeded. Wait {retry:.1f}s",
                AnomalyType.RATE_LIMIT_EXCEEDED,
                Severity.MEDIUM,
                "Rate limit exceeded for service starts",
                retry=retry,
            )

        running = len(live)
        if running >= p.conc:
            limit = number_text(p.conc)
            return self._deny(
                f"Max concurrent services reached ({running}/{limit}). "
                "Stop a service first.",
                AnomalyType.CONCURRENT_LIMIT_EXCEEDED,
                Severity.MEDIUM,
                f"Max {limit} services",
            )

        horizon = now - HOUR_MS * 1000
        window = [s for s in data.starts.values() if s > horizon]
        started = len(window)
        if started >= p.sph:
            retry = 0.0
            if window:
                oldest = min(window)
                retry = max(0.0, oldest + HOUR_MS * 1000 - now) / 1e6
            limit = number_text(p.sph)
            return self._deny(
                f"Hourly service limit reached ({started}/{limit}). "
                "Try again later.",
                AnomalyType.HOURLY_LIMIT_EXCEEDED,
                Severity.MEDIUM,
                f"Max {limit} service starts per hour",
                retry=retry,
            )

        if port is not None and p.ports is not None and port not in p.ports:
            return self._deny(
                f"Port {port} not allowed for your account",
                AnomalyType.UNAUTHORIZED_ACCESS,
                Severity.HIGH,
                f"Attempted to use restricted port {port}",
            )

        if memory > 0 or cpu > 0:
            used_mem = used_cpu = 0.0
            for _, _, live_id in live:
                mem_used, cpu_used, _ = data.meta.get(live_id, (0.0, 0.0, 0.0))
                used_mem = used_mem + mem_used
                used_cpu = used_cpu + cpu_used
            if used_mem + memory > p.mem:
                return self._quota_denial(
                    "Memory", "MB", AnomalyType.MEMORY_LIMIT_EXCEEDED,
                    used_mem, memory, p.mem,
                )
            if used_cpu + cpu > p.cpu:
                return self._quota_denial(
                    "CPU", "%", AnomalyType.CPU_LIMIT_EXCEEDED,
                    used_cpu, cpu, p.cpu,
                )

        fence = self._next_fence(data, now)
        self._purge(data, now_ms)
        data.starts = {m: s for m, s in data.starts.items() if s > horizon}
        data.start_rate = self._stored(start_debt + ns_per_start, now)
        data.leases[service_id] = expiry_ms
        data.meta[service_id] = (memory, cpu, fence)
        data.starts["%.17g" % fence] = now
        return self._grant(
            replica, user_id, service_id, fence, expiry_ms, memory, cpu,
            rapid=self._rapid(data, now),
        )

    @staticmethod
    def _deny(
        reason: str,
        kind: AnomalyType,
        severity: Severity,
        details: str,
        *,
        retry: Optional[float] = None,
    ) -> StartAnswer:
        return StartAnswer(
            allowed=False,
            reason=reason,
            delay_seconds=retry or 0.0,
            retry_after=retry,
            fence=None,
            already_running=False,
            anomaly=(kind, severity, details),
        )

    def _quota_denial(
        self,
        what: str,
        unit: str,
        kind: AnomalyType,
        used: float,
        asked: float,
        limit: float,
    ) -> StartAnswer:
        space = " " if unit == "MB" else ""
        used_t, asked_t, limit_t = (
            number_text(used), number_text(asked), number_text(limit)
        )
        return self._deny(
            f"{what} limit exceeded ({used_t} + {asked_t} > "
            f"{limit_t}{space}{unit}). Stop a service first.",
            kind,
            Severity.MEDIUM,
            f"{what} quota of {limit_t}{space}{unit} exceeded",
        )

    def _grant(
        self,
        replica: Replica,
        user_id: str,
        service_id: str,
        fence: float,
        expiry_ms: float,
        memory: float,
        cpu: float,
        *,
        rapid: Optional[int],
    ) -> StartAnswer:
        replica.hold(
            user_id,
            service_id,
            HeldLease(int(fence), int(expiry_ms), float(memory), float(cpu)),
        )
        anomaly = None
        if rapid is not None and rapid >= self.config.rapid_threshold:
            anomaly = (
                AnomalyType.RAPID_RESTART,
                Severity.MEDIUM,
                f"Rapid restart pattern ({rapid} starts in 60s)",
            )
        return StartAnswer(
            allowed=True,
            reason=None,
            delay_seconds=0.0,
            retry_after=None,
            fence=int(fence),
            already_running=rapid is None,
            anomaly=anomaly,
        )

    def renew(
        self,
        replica: Replica,
        user_id: str,
        leases: dict[str, Optional[HeldLease]],
        now: float,
    ) -> list[RenewAnswer]:
        """Renew live leases carrying their fence; restore a missing one
        the holder still has time on when the counter is younger than its
        fence (Redis lost it); anything else is lost."""
        data = self.user(user_id)
        now_ms = float(math.floor(now / 1000))
        expiry_ms = now_ms + self.config.lease_ms
        born = data.fence.born if data.fence else None
        self._purge(data, now_ms)

        answers = []
        for service_id, held in leases.items():
            status, fence = self._renew_one(
                data, service_id, held, now, now_ms, expiry_ms, born
            )
            answers.append(
                RenewAnswer(
                    service_id,
                    status,
                    int(fence),
                    0 if status == "lost" else int(expiry_ms),
                )
            )

        for answer, held in zip(answers, leases.values()):
            if answer.status == "lost":
                if held is not None:
                    replica.drop(user_id, answer.service_id)
                    replica.lost.append((user_id, answer.service_id))
                    replica.lost_fences[(user_id, answer.service_id)] = (
                        held.fence
                    )
                continue
            replica.hold(
                user_id,
                answer.service_id,
                HeldLease(
                    answer.fence,
                    answer.expiry_ms,
                    held.memory_mb if held else 0.0,
                    held.cpu_percent if held else 0.0,
                ),
            )
        return answers

    def _renew_one(
        self,
        data: UserData,
        service_id: str,
        held: Optional[HeldLease],
        now: float,
        now_ms: float,
        expiry_ms: float,
        born: Optional[float],
    ) -> tuple[str, float]:
        fence = None if held is None else float(held.fence)
        if service_id in data.leases:
            current = data.meta.get(service_id, (0.0, 0.0, 0.0))[2]
            if fence is not None and fence != current:
                return "lost", 0
            data.leases[service_id] = expiry_ms
            return "ok", current

        if held is None or not held.expiry_ms > now_ms:
            return "lost", 0
        assert fence is not None
        if born is not None and born <= fence:
            return "lost", 0
        if data.fence is not None and data.fence.gone.get(service_id) == fence:
            return "lost", 0
        data.leases[service_id] = expiry_ms
        data.meta[service_id] = (held.memory_mb, held.cpu_percent, fence)
        if data.fence is None:
            data.fence = Fence(fence, now)
        data.fence.last = max(data.fence.last, fence)
        if data.fence.born is None:
            data.fence.born = now
        return "restored", fence

    def release(
        self,
        replica: Replica,
        user_id: str,
        service_id: str,
        now: float,
    ) -> bool:
        """Free a live slot: only the fence this replica holds or lost for
        it, or any holder's when it knows no fence for the service."""
        data = self.user(user_id)
        held = replica.held.get(user_id, {}).get(service_id)
        fence = replica.lost_fences.pop((user_id, service_id), None)
        if held is not None:
            fence = held.fence
        now_ms = float(math.floor(now / 1000))
        current = data.meta.get(service_id, (0.0, 0.0, 0.0))[2]
        removed = False
        live = data.leases.get(service_id, -math.inf) > now_ms
        if live and (fence is None or float(fence) == current):
            del data.leases[service_id]
            data.meta.pop(service_id, None)
            removed = True
            counter = data.fence
            if counter and counter.born is not None and current < counter.born:
                counter.gone[service_id] = current
        self._purge(data, now_ms)
        replica.drop(user_id, service_id)
        return removed

    # -- reading -----------------------------------------------------------

    def moments(self) -> list[float]:
        """Times (us) at which a rule's outcome may change by itself: lease
        expiries, buckets filling up and the ends of the rapid-restart and
        hourly windows."""
        found = []
        for data in self.users.values():
            found += [expiry * 1000 for expiry in data.leases.values()]
            for bucket in (data.requests, data.start_rate):
                if bucket is not None:
                    found.append(bucket.full_ns / 1000)
            for score in data.starts.values():
                found += [score + RAPID_WINDOW_MS * 1000, score + HOUR_MS * 1000]
        return found

    def state(self, user_id: str, now: float) -> UserState:
        data = self.user(user_id)
        p = self.limits(user_id)
        cfg = self.config
        now_ms = float(math.floor(now / 1000))
        tokens = self._level(data.requests, now, p.rpm, 60e9 / p.rpm)
        start_tokens = self._level(
            data.start_rate,
            now,
            float(cfg.start_burst),
            60e9 / cfg.start_per_minute,
        )
        horizon = now - HOUR_MS * 1000
        started = sum(1 for s in data.starts.values() if s > horizon)
        live = sorted(
            ((e, s) for s, e in data.leases.items() if e > now_ms),
            key=lambda item: (item[0], item[1].encode("utf-8")),
        )
        leases = []
        for expiry, service_id in live:
            mem, cpu, fence = data.meta.get(service_id, (0.0, 0.0, 0.0))
            leases.append(
                LeaseInfo(
                    service_id=service_id,
                    expires_in=max(0.0, (expiry - now_ms) / 1000),
                    fence=int(fence),
                    memory_mb=mem,
                    cpu_percent=cpu,
                )
            )
        return UserState(
            tokens=tokens,
            start_tokens=start_tokens,
            started_last_hour=started,
            leases=tuple(leases),
        )
