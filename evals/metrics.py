"""The numbers a routing report is made of: RouteLLM's PGR/CPT/APGR, Pareto frontiers, random mixing.

Pure numpy over recorded outcomes, so the analytic cases (a perfect router, a random router) can be
checked exactly in tests.

RouteLLM (Ong et al. 2024) definitions, for a weak and a strong model:
- PGR(x): performance gap recovered when a share x of the prompts goes to the strong model,
  (quality(x) - quality(weak)) / (quality(strong) - quality(weak)).
- CPT(p): the smallest share of strong calls whose PGR reaches p (0.5 and 0.8 are reported).
- APGR: the area under PGR(x) for x from 0 to 1 (a random router scores 0.5).
A score router sends the share x of prompts with the highest scores to the strong model; tied scores
are taken in random order, computed exactly as an expectation (each tie group adds its mean gain).
"""

from __future__ import annotations

import numpy as np


def threshold_curve(score: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of strong calls, mean quality) for k = 0..n prompts sent to the strong model, highest score first."""
    n = len(score)
    order = np.argsort(-score, kind="stable")
    gain = (strong - weak)[order].astype(float)
    ranked = score[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ranked) != 0) + 1]
    ends = np.r_[starts[1:], n]
    for lo, hi in zip(starts, ends):  # ties: expected gain of a random order inside the group
        gain[lo:hi] = gain[lo:hi].mean()
    quality = weak.mean() + np.r_[0.0, np.cumsum(gain)] / n
    return np.arange(n + 1) / n, quality


def pgr(quality: np.ndarray, weak_quality: float, strong_quality: float) -> np.ndarray:
    gap = strong_quality - weak_quality
    if abs(gap) < 1e-12:
        return np.zeros_like(quality)
    return (quality - weak_quality) / gap


def _with_ends(share: np.ndarray, quality: np.ndarray, weak_quality: float, strong_quality: float):
    """Sorted points plus the two pure routers at shares 0 and 1 (every router can be all-weak or all-strong)."""
    share = np.r_[0.0, np.asarray(share, float), 1.0]
    quality = np.r_[weak_quality, np.asarray(quality, float), strong_quality]
    order = np.argsort(share, kind="stable")
    return share[order], quality[order]


def cpt(share: np.ndarray, quality: np.ndarray, weak_quality: float, strong_quality: float, target: float) -> float:
    """Smallest share of strong calls reaching PGR >= target, linearly interpolated between points."""
    share, quality = _with_ends(share, quality, weak_quality, strong_quality)
    recovered = pgr(quality, weak_quality, strong_quality)
    above = np.flatnonzero(recovered >= target - 1e-12)
    if not len(above):
        return 1.0
    k = above[0]
    if k == 0:
        return float(share[0])
    x0, x1, y0, y1 = share[k - 1], share[k], recovered[k - 1], recovered[k]
    return float(x0 + (x1 - x0) * (target - y0) / (y1 - y0)) if y1 > y0 else float(x1)


def apgr(share: np.ndarray, quality: np.ndarray, weak_quality: float, strong_quality: float) -> float:
    share, quality = _with_ends(share, quality, weak_quality, strong_quality)
    recovered = pgr(quality, weak_quality, strong_quality)
    return float(np.sum((share[1:] - share[:-1]) * (recovered[1:] + recovered[:-1]) / 2))


def routellm_metrics(share: np.ndarray, quality: np.ndarray, weak_quality: float, strong_quality: float) -> dict:
    if not abs(strong_quality - weak_quality) > 1e-12:  # no gap to recover (or no prompts): the ratios are undefined
        return {"cpt50": None, "cpt80": None, "apgr": None}
    return {
        "cpt50": cpt(share, quality, weak_quality, strong_quality, 0.5),
        "cpt80": cpt(share, quality, weak_quality, strong_quality, 0.8),
        "apgr": apgr(share, quality, weak_quality, strong_quality),
    }


def pareto_frontier(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    order = np.lexsort((-np.asarray(accuracy), np.asarray(cost)))
    keep, best = [], -np.inf
    for i in order:
        if accuracy[i] > best + 1e-12:
            keep.append(i)
            best = accuracy[i]
    return np.array(keep, dtype=int)


def upper_hull(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the upper-left convex hull: the best accuracy any random mix of these points reaches."""
    frontier = pareto_frontier(cost, accuracy)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (cost[b] - cost[a]) * (accuracy[i] - accuracy[a]) - (accuracy[b] - accuracy[a]) * (cost[i] - cost[a])
            if cross >= 0:  # b lies on or below the segment a-i: mixing a and i beats it
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.array(hull, dtype=int)


def random_mix_accuracy(target_cost: float, cost: np.ndarray, accuracy: np.ndarray) -> float:
    """Accuracy of the best random router at a given mean cost: choose between two single arms at random
    with the probabilities that make the expected cost match (RouterBench's "zero router")."""
    hull = upper_hull(cost, accuracy)
    xs, ys = cost[hull], accuracy[hull]
    if target_cost <= xs[0]:
        return float(ys[0])
    return float(np.interp(target_cost, xs, ys))
