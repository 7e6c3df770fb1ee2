"""The profiler's gap split: short gaps between back-to-back kernels vs long waits on the host."""

from types import SimpleNamespace

from lragent.bench.profiling import kernel_gaps


def _kernel(start: float, end: float, name: str) -> SimpleNamespace:
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name)


def test_kernel_gaps_split_short_and_long():
    # two steps of three kernels (times in us): 2 us launch gaps inside a step, a 300 us wait between the steps,
    # an overlap (negative gap) counted as none; listed out of order as the profiler may
    kernels = [
        _kernel(0, 10, "a"),
        _kernel(12, 20, "b"),
        _kernel(19, 30, "c"),
        _kernel(330, 340, "a"),
        _kernel(342, 350, "b"),
        _kernel(352, 360, "c"),
    ]
    got = kernel_gaps(list(reversed(kernels)), steps=2)
    assert got["gap_short_ms"] == (2 + 0 + 2 + 2) / 2 / 1e3
    assert got["gap_long_ms"] == 300 / 2 / 1e3
    assert got["longest_waits_us"] == [(300.0, "a")]
