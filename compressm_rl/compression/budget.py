"""State budgets (``compress_to``): how many states each reduction event keeps, and in
which layers (docs/design.md §7). Small pure functions on arrays.

A budget N is the number of complex states a part (actor or critic) ends with, summed
over its LRU layers. The reduction events walk to it geometrically, so that each event
removes a similar fraction, and the last one lands on N. Within an event the states are
either ranked across the part's layers (``"global"``, LAST's idea on balanced
coordinates) or each layer keeps its own share (``"uniform"``).

The global score of real state j of layer l is ``2 σ_j / ‖G_l‖_∞``: what removing that
state adds to the layer's H∞ error bound, relative to the layer's own gain. Each
removed state adds its own term to the truncation bound, so keeping the highest scores
keeps ``Σ_l 2 Σ_{j>r_l} σ_j / ‖G_l‖_∞`` smallest among all cuts of the same total real
rank (the real-mode pairing and radius clamp add their own, smaller terms).
"""

from __future__ import annotations

import numpy as np

ALLOCATIONS = ("global", "uniform")


def event_target(current: int, budget: int, events_left: int) -> int:
    """Complex states this event should leave: ``current · (budget/current)^(1/left)``.

    Every event then removes the same fraction of what is left, and the last one
    (``events_left == 1``) lands on ``budget``; an event that was rolled back leaves more
    to the ones after it. Never below ``budget``, never above ``current``.
    """
    if events_left < 1:
        raise ValueError(f"events_left must be at least 1, got {events_left}")
    if current <= budget:
        return current
    if events_left == 1:
        return budget
    return int(min(current, max(budget, round(current * (budget / current) ** (1 / events_left)))))


def uniform_shares(total: int, caps: list[int]) -> list[int]:
    """``total`` split as evenly as integers allow (the remainder to the first layers),
    none above its cap (a layer's size); what a capped layer cannot take goes to the
    others (water-filling)."""
    shares, free, left = [0] * len(caps), list(range(len(caps))), total
    while free:
        base, extra = divmod(left, len(free))
        fill = {i: base + (k < extra) for k, i in enumerate(free)}
        capped = [i for i in free if fill[i] >= caps[i]]
        if not capped:
            for i in free:
                shares[i] = fill[i]
            break
        for i in capped:
            shares[i] = caps[i]
            left -= caps[i]
        free = [i for i in free if i not in capped]
    return shares


def state_scores(hsv: np.ndarray, norm: float) -> np.ndarray:
    """``2 σ_j / ‖G‖_∞`` for one layer's HSVs ``[2n]`` (descending, so are the scores).

    A layer whose norm is zero or not finite scores zero everywhere (nothing to keep).
    """
    hsv = np.asarray(hsv, dtype=np.float64)
    if not (np.isfinite(norm) and norm > 0.0):
        return np.zeros_like(hsv)
    return 2.0 * hsv / norm


def allocate_ranks(
    scores: list[np.ndarray], total_rank: int, min_ranks: list[int], max_ranks: list[int]
) -> list[int]:
    """Real states to keep per layer: the ``total_rank`` highest scores across layers.

    Args:
        scores: per layer, descending ``[2 n_l]`` (``state_scores``); a layer keeps a
            prefix of its states.
        total_rank: real states to keep in all (clipped to what the bounds allow).
        min_ranks, max_ranks: per-layer bounds on the rank (a floor such as 2·min_state;
            a ceiling such as the layer's numerically non-zero HSVs).

    Returns:
        ``r_l`` with ``min_ranks[l] ≤ r_l ≤ max_ranks[l]`` (``max_ranks[l]`` where the floor
        is above the ceiling); ties go to the earlier layer.
    """
    if not len(scores) == len(min_ranks) == len(max_ranks):
        raise ValueError("scores, min_ranks and max_ranks need one entry per layer")
    ranks = [min(lo, hi) for lo, hi in zip(min_ranks, max_ranks, strict=True)]
    candidates = [
        (-float(s[j]), layer, j)
        for layer, s in enumerate(scores)
        for j in range(ranks[layer], max_ranks[layer])
    ]
    # A layer's scores descend, so taking candidates in score order keeps prefixes.
    for _, layer, _ in sorted(candidates)[: max(0, total_rank - sum(ranks))]:
        ranks[layer] += 1
    return ranks


def weakest_kept(scores: list[np.ndarray], ranks: list[int], min_ranks: list[int]) -> int | None:
    """The layer whose last kept state scores lowest (the next state to give up when a
    cut holds more complex states than its budget), None when every layer is at its
    floor."""
    options = [
        (float(s[r - 1]), layer)
        for layer, (s, r, lo) in enumerate(zip(scores, ranks, min_ranks, strict=True))
        if r > lo
    ]
    return min(options)[1] if options else None
