"""The timed loop the benchmarks share where one pytest-benchmark call is not the unit."""

import time
from typing import Callable


def seconds_per_call(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``calls`` calls of ``fn`` queued back to back, between two ``sync()``
    calls (a device synchronisation, or a barrier): asynchronous work counts in full, and on a
    GPU the host's work for one call overlaps the device's work for the one before."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls
