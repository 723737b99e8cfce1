"""One Prometheus histogram series kept as plain numbers, so that the request path can count
into it without prometheus_client's locks and per-observation objects."""

from __future__ import annotations

from itertools import accumulate

from prometheus_client.utils import floatToGoString


class HistogramSeries:
    """One histogram's cumulative counts, kept as plain numbers: an observation is a short
    scan and two additions, with no lock (the event loop serialises the request path)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """The value's bucket is the first whose bound is at or above it (bisect_left's). Found
        by a scan: compiled (native.py), comparing a few floats costs less than a call to
        bisect_left, and the bounds are few, with most values in the first ones."""
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        cumulative = list(accumulate(self.counts))
        edges = [go_float(bound) for bound in self.bounds] + ["+Inf"]
        return list(zip(edges, cumulative, strict=True))


def go_float(value: float) -> str:
    """A bucket bound as Prometheus writes it (prometheus_client's own formatting)."""
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]
