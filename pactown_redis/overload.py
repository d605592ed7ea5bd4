"""This replica's own load, the one check that is deliberately not shared.

Overload protects the machine a replica runs on, so each replica measures
itself. Readings come from ``psutil``: CPU use since the previous reading
(never an average since boot) and memory in use now. A reading is kept for
``interval`` seconds, so a decision costs no system call most of the time,
and taking one never blocks (``psutil.cpu_percent(interval=None)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import psutil

__all__ = ["LoadMonitor", "LoadSample"]


@dataclass(frozen=True, slots=True)
class LoadSample:
    """CPU and memory use of this machine, in percent."""

    cpu_percent: float
    memory_percent: float


def _psutil_probe() -> LoadSample:
    return LoadSample(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
    )


class LoadMonitor:
    """Decides whether this replica is overloaded, and by how much.

    Args:
        cpu_threshold: CPU percent above which the replica is overloaded;
            ``None`` ignores CPU.
        memory_threshold: memory percent likewise; ``None`` ignores memory.
        interval: seconds a reading is reused.
        probe: returns a reading; defaults to ``psutil``. Tests pass a fixed
            one so that results never depend on how busy the machine is.
        max_delay: the longest delay asked of paid tiers, in seconds.
    """

    def __init__(
        self,
        cpu_threshold: Optional[float],
        memory_threshold: Optional[float],
        *,
        interval: float = 1.0,
        probe: Optional[Callable[[], LoadSample]] = None,
        max_delay: float = 5.0,
    ) -> None:
        self.cpu_threshold = cpu_threshold
        self.memory_threshold = memory_threshold
        self.interval = interval
        self.max_delay = max_delay
        self._probe = probe or _psutil_probe
        self._sample: Optional[LoadSample] = None
        self._taken = float("-inf")
        if probe is None and self.enabled:
            # The first CPU reading only starts psutil's measuring period.
            psutil.cpu_percent(interval=None)

    @property
    def enabled(self) -> bool:
        return self.cpu_threshold is not None or self.memory_threshold is not None

    def sample(self) -> Optional[LoadSample]:
        """Return a recent reading, or ``None`` when both checks are off."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if self._sample is None or now - self._taken >= self.interval:
            self._sample = self._probe()
            self._taken = now
        return self._sample

    def excess(self) -> float:
        """Return how many percentage points the worst reading is over its
        threshold; 0 when not overloaded."""
        sample = self.sample()
        if sample is None:
            return 0.0
        over = 0.0
        if self.cpu_threshold is not None:
            over = max(over, sample.cpu_percent - self.cpu_threshold)
        if self.memory_threshold is not None:
            over = max(over, sample.memory_percent - self.memory_threshold)
        return max(0.0, over)

    def delay_for(self, excess: float) -> float:
        """Return the delay for paid tiers: half a second at the threshold,
        growing with the excess up to ``max_delay``."""
        if excess <= 0:
            return 0.0
        return min(self.max_delay, 0.5 + excess / 20.0 * (self.max_delay - 0.5))
