"""Compare two traces point by point, in forward order, and find where they first diverge.

`compare(a, b)` treats b as the reference. For every name both traces hold:

    max_abs  = max |a - b|
    max_rel  = max |a - b| / |b| over the elements where b != 0 (as numpy.testing reports it)
    cosine   = <a, b> / (|a| |b|) over the flattened arrays (1 when both are all zero)
    worst    = index of the element with the largest |a - b|; `position` is its token position

A point exceeds the tolerance, as numpy.allclose has it, when some element has
|a - b| > atol + rtol * |b|, or when the shapes differ, or NaN/inf appear on one side only.
The first divergence is the first such point in forward order: everything before it
matched, so the bug (or the rounding that grew out of hand) is in what computes it.
"""

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from refqwen.errors import RefqwenError
from refqwen.trace import Trace, forward_order, token_axis

ATOL, RTOL = 1e-4, 1e-4  # float32 against float32 on tiny models; real models need --rtol (docs/numerics.md)


@dataclass
class PointDiff:
    name: str
    shape: list
    max_abs: float
    max_rel: float
    cosine: float
    worst: list  # index of the largest |a - b|
    position: int | None  # its token position
    exceeded: bool
    note: str = ""


@dataclass
class Report:
    points: list  # PointDiff, in forward order
    atol: float
    rtol: float
    only_in_a: list = field(default_factory=list)
    only_in_b: list = field(default_factory=list)
    a: dict = field(default_factory=dict)  # the traces' meta
    b: dict = field(default_factory=dict)

    @property
    def first_divergence(self) -> PointDiff | None:
        return next((p for p in self.points if p.exceeded), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {"ok": self.ok, "first_divergence": first.name if first else None, "atol": self.atol,
                "rtol": self.rtol, "a": self.a, "b": self.b, "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "points": [{k: _json_number(v) for k, v in asdict(p).items()} for p in self.points]}

    def to_json(self, indent=2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return _format(self)


def compare(a, b, atol: float = ATOL, rtol: float = RTOL) -> Report:
    """Compare trace a with the reference trace b (Trace objects or {name: array} mappings)."""
    a, b = (t if isinstance(t, Trace) else Trace.from_dict(t) for t in (a, b))
    if atol < 0 or rtol < 0:
        raise RefqwenError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    names = sorted((n for n in a if n in b), key=forward_order)
    if not names:
        raise RefqwenError(f"the traces share no trace point name (a has {_sample(a)}; b has {_sample(b)})")
    return Report([compare_point(n, a[n], b[n], atol, rtol) for n in names], atol, rtol,
                  [n for n in a if n not in b], [n for n in b if n not in a], a.meta, b.meta)


def compare_point(name, a, b, atol, rtol) -> PointDiff:
    if a.shape != b.shape:
        nan = float("nan")
        return PointDiff(name, list(b.shape), nan, nan, nan, [], None, True,
                         f"shape {list(a.shape)} vs {list(b.shape)}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities and NaN against NaN count as equal
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(a - b))
    err[np.isnan(err)] = np.inf  # NaN against a number, or inf against -inf
    magnitude = np.where(np.isnan(b), 0.0, np.abs(b))  # [same shape]
    worst = [int(i) for i in np.unravel_index(np.argmax(err), err.shape)] if err.size else []
    position = worst[token_axis(name)] if len(worst) > token_axis(name) else None
    return PointDiff(name, list(b.shape), _max(err), _max_relative(err, magnitude), _cosine(a, b), worst, position,
                     bool(np.any((err > atol + rtol * magnitude) | np.isinf(err))))


def _max_relative(err, magnitude) -> float:
    nonzero = magnitude > 0
    if nonzero.any():
        with np.errstate(invalid="ignore"):
            relative = err[nonzero] / magnitude[nonzero]  # inf / inf where b is infinite: counts as inf
        return float(np.max(np.where(np.isnan(relative), np.inf, relative)))
    return math.inf if _max(err) > 0 else 0.0  # b is all zero: any error is infinitely large relative to it


def _max(x) -> float:
    return float(x.max()) if x.size else 0.0


def _cosine(a, b) -> float:
    a, b = a.ravel(), b.ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def _json_number(v):
    """JSON has no inf or NaN: write them as strings."""
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def _sample(trace) -> str:
    names = list(trace)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "nothing"


def _describe(meta: dict) -> str:
    return f"{meta.get('backend', '?')} ({meta.get('model') or 'in memory'})" if meta else "a dict of arrays"


def _format(report: Report) -> str:
    header = f"{'name':<36}{'shape':<18}{'max abs':>10}{'max rel':>10}{'cosine':>12}  {'worst at':<22}"
    lines = [f"a: {_describe(report.a)}", f"b: {_describe(report.b)}  (reference)",
             f"tolerance: |a - b| <= {report.atol:g} + {report.rtol:g} * |b|", "", header]
    for p in report.points:
        where = f"pos {p.position} {tuple(p.worst)}" if p.worst else "-"
        mark = "  EXCEEDS" if p.exceeded else ""
        lines.append(f"{p.name:<36}{p.shape!s:<18}{p.max_abs:>10.2e}{p.max_rel:>10.2e}{p.cosine:>12.7f}  "
                     f"{where:<22}{mark}{'  ' + p.note if p.note else ''}")
    for side, names in (("a", report.only_in_a), ("b", report.only_in_b)):
        if names:
            lines.append(f"only in {side} ({len(names)}): {', '.join(names)}")
    first = report.first_divergence
    lines.append("")
    if first is None:
        lines.append(f"all {len(report.points)} trace points within tolerance")
    else:
        where = first.note or f"max abs {first.max_abs:.3g} at position {first.position}, index {tuple(first.worst)}"
        lines.append(f"first divergence: {first.name} ({where}); "
                     f"{sum(p.exceeded for p in report.points)} of {len(report.points)} points exceed the tolerance")
    return "\n".join(lines)
