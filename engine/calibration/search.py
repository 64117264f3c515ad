"""The joint search: from dense outward along the steepest measured trade, one notch at a time.

Each axis has a ladder of settings from none to aggressive (`Lattice`). From the current point the
search measures every neighbour one notch further along one axis (a numerical gradient of
quality and speed per axis, as in Joint Multi-Dimension Pruning, arXiv 2005.08931) and moves to
the one that buys the most speed per unit of quality lost: log speedup gained over perplexity
ratio lost. It stops when no move is faster or the quality limit is passed. Every point it
measures is kept; the Pareto set is drawn from all of them.

Why this rather than a Gaussian process: with five axes and about seven settings each there are
~10^4 combinations, a measurement costs seconds to minutes, and the quality noise of a few
held-out passages is of the order of the differences between neighbours. One path from dense to
the limit costs (axes) x (steps) measurements, each of a real combination, so the interactions
the issue is about (a width-pruned model tolerating fewer dropped layers) are measured, not
modelled; and the path passes through every quality level, so one run yields the whole front
and every named profile. A GP would spend most of its budget fitting a 5-D surface we only need
along its ridge.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from trident.engine.calibration.compose import AXES, Point

MIN_LOSS = 1e-3           # a move that loses less quality than this counts as losing this much


@dataclass(frozen=True)
class Lattice:
    """The settings each axis may take, mildest first (the first is "off")."""

    depth: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8)
    width: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
    exit: tuple[float | None, ...] = (None, 0.99, 0.95, 0.9)
    prefill_keep: tuple[float, ...] = (1.0, 0.8, 0.7, 0.6, 0.5, 0.4)
    kv_budget: tuple[int, ...] = (0,)

    def ladder(self, axis: str) -> tuple:
        return getattr(self, axis)

    def step(self, point: Point, axis: str) -> Point | None:
        """`point` one notch further along `axis`, or None at the end of its ladder."""
        ladder = self.ladder(axis)
        i = ladder.index(getattr(point, axis))
        return replace(point, **{axis: ladder[i + 1]}) if i + 1 < len(ladder) else None

    def single_axis(self, axis: str) -> list[Point]:
        """Every setting of one axis with the others off."""
        return [replace(Point(), **{axis: v}) for v in self.ladder(axis)[1:]]


@dataclass
class Measured:
    point: Point
    quality: float              # perplexity ratio to dense (lower is better)
    speedup: float              # predicted speedup for the objective (higher is better)


@dataclass
class SearchResult:
    path: list[Measured] = field(default_factory=list)
    moves: list[dict] = field(default_factory=list)    # per step: every neighbour measured and the choice


def greedy_path(lattice: Lattice, measure: Callable[[Point], Measured], max_quality: float,
                axes: tuple[str, ...] = AXES, max_steps: int = 64) -> SearchResult:
    """The path from dense: at each step measure one notch along every axis in `axes` and move to
    the best log-speedup per quality lost; stop past `max_quality` or when nothing is faster."""
    current = measure(Point())
    result = SearchResult(path=[current])
    for _ in range(max_steps):
        options = []
        for axis in axes:
            nxt = lattice.step(current.point, axis)
            if nxt is None or not nxt.runnable:
                continue
            m = measure(nxt)
            gain = math.log(m.speedup / current.speedup)
            loss = max(m.quality - current.quality, MIN_LOSS)
            options.append((gain / loss if gain > 0 else -math.inf, axis, m))
        result.moves.append({"from": current.point.label,
                             "options": [{"axis": a, "point": m.point.label, "quality": m.quality,
                                          "speedup": m.speedup, "score": s if s > -math.inf else None}
                                         for s, a, m in options]})
        good = [o for o in options if o[0] > -math.inf and o[2].quality <= max_quality]
        if not good:
            break
        score, axis, current = max(good, key=lambda o: o[0])
        result.moves[-1]["chose"] = axis
        result.path.append(current)
    return result


def pareto(points: list[Measured]) -> list[Measured]:
    """The points no other point beats on both quality (lower) and speedup (higher), by quality."""
    front = [p for p in points
             if not any((q.quality <= p.quality and q.speedup > p.speedup) or
                        (q.quality < p.quality and q.speedup >= p.speedup) for q in points)]
    unique = {p.point: p for p in front}
    return sorted(unique.values(), key=lambda p: (p.quality, -p.speedup))


def best_within(front: list[Measured], max_quality: float) -> Measured | None:
    """The fastest point within a quality limit."""
    ok = [p for p in front if p.quality <= max_quality]
    return max(ok, key=lambda p: p.speedup) if ok else None


def cheapest_reaching(front: list[Measured], speedup: float) -> Measured | None:
    """The best-quality point at least `speedup` fast."""
    ok = [p for p in front if p.speedup >= speedup]
    return min(ok, key=lambda p: p.quality) if ok else None
