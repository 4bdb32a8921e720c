"""Benchmarks and studies; each module runs as `.venv/bin/python bench/NAME.py`."""


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]
