"""ForestGapR-style gap statistics: size-frequency power law, spatial pattern, change between surveys.

Semantics follow ForestGapR (GapSizeFDist, GapsSpatPattern, GapChangeDec) and the spatstat functions it
calls (clarkevans.test, Kest, envelope), checked against its published figures on ALS_CHM_DUC.tif.
Everything returns NaN instead of failing when a statistic is undefined (no gap, one gap, equal sizes).
numpy + math only.
"""
import math

import numpy as np

from lib.gaps.polygons import gap_polygons

# ----------------------------------------------------------------------------- size-frequency
_BERNOULLI = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6)  # B2, B4, ..., B14
LAMBDA_RANGE = (1.0001, 20.0)  # Asner et al. 2013 / ForestGapR search interval


def zeta(s) -> np.ndarray:
    """Riemann zeta for real s > 1 (any shape), by Euler-Maclaurin with 9 terms + 7 corrections.

    Relative error < 1e-15 on [1.0001, 20] (VGAM::zeta, which ForestGapR uses, is the same function).
    """
    s = np.asarray(s, np.float64)
    cut = 10.0
    total = sum(k ** -s for k in range(1, int(cut)))
    total = total + cut ** (1 - s) / (s - 1) + 0.5 * cut ** -s
    rising, factorial = s.copy(), 2.0               # s (s+1) ... (s+2j-2),  (2j)!
    for j, bernoulli in enumerate(_BERNOULLI, start=1):
        total = total + bernoulli / factorial * rising * cut ** (-s - 2 * j + 1)
        rising = rising * (s + 2 * j - 1) * (s + 2 * j)
        factorial *= (2 * j + 1) * (2 * j + 2)
    return total


def lambda_asner(areas_m2) -> float:
    """Power-law exponent by the zeta MLE of Asner et al. 2013, searched as ForestGapR does.

    GapSizeFDist(method = "Asner_2013") runs R's optimize() on sum -2 log(x^-l / zeta(l)) over
    LAMBDA_RANGE; optimize stops within ~1e-4 of the true minimum, so the same Brent search is replayed
    here (r_optimize) to return R's value rather than the exact argmin. NaN without gaps.
    """
    x = np.asarray(areas_m2, np.float64)
    if x.size == 0:
        return float("nan")

    def deviance(lam):                                # as ForestGapR writes it
        return float(2 * np.sum(-np.log(x ** -lam / float(zeta(lam)))))

    return r_optimize(deviance, *LAMBDA_RANGE)


def r_optimize(f, lower: float, upper: float, tol: float = np.finfo(float).eps ** 0.25) -> float:
    """R's optimize(f, c(lower, upper))$minimum: Brent's fmin exactly as R's C code runs it."""
    c = (3 - math.sqrt(5)) / 2                        # squared inverse of the golden ratio
    eps = math.sqrt(np.finfo(float).eps)
    a, b = lower, upper
    v = w = x = a + c * (b - a)
    d = e = 0.0
    fv = fw = fx = f(x)
    tol3 = tol / 3
    while True:
        xm = (a + b) / 2
        tol1 = eps * abs(x) + tol3
        t2 = tol1 * 2
        if abs(x - xm) <= t2 - (b - a) / 2:
            return x
        p = q = r = 0.0
        if abs(e) > tol1:                             # fit a parabola through x, w, v
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = (q - r) * 2
            if q > 0:
                p = -p
            else:
                q = -q
            r, e = e, d
        if abs(p) >= abs(q * 0.5 * r) or p <= q * (a - x) or p >= q * (b - x):   # golden section
            e = (b - x) if x < xm else (a - x)
            d = c * e
        else:                                         # parabolic step, not too close to a or b
            d = p / q
            if (x + d) - a < t2 or b - (x + d) < t2:
                d = tol1 if x < xm else -tol1
        u = x + d if abs(d) >= tol1 else (x + tol1 if d > 0 else x - tol1)
        fu = f(u)
        if fu <= fx:
            if u < x:
                b = x
            else:
                a = x
            v, w, x, fv, fw, fx = w, x, u, fw, fx, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu


def lambda_hanel(areas_m2) -> float:
    """Continuous power-law MLE as ForestGapR runs poweRlaw: 1 + n / sum ln(x / xmin), xmin = min(x).

    NaN without gaps or when all gaps have the same size (the estimate is infinite).
    """
    x = np.asarray(areas_m2, np.float64)
    if x.size == 0:
        return float("nan")
    log_sum = float(np.log(x / x.min()).sum())
    return 1.0 + x.size / log_sum if log_sum > 0 else float("nan")


def size_frequency(areas_m2) -> tuple[np.ndarray, np.ndarray]:
    """Gap count per 1 m² size class (k - 1, k], k = 1..floor(max): (sizes, counts), as GapSizeFDist.

    GapSizeFDist bins with cut(x, breaks = seq(0, max(x), 1)): the breaks stop at floor(max), so gaps
    larger than that (a 10.25 m² largest gap of 0.5 m pixels) fall in no class and are not counted.
    """
    x = np.asarray(areas_m2, np.float64)
    top = int(math.floor(x.max())) if x.size else 0
    if top < 1:                                       # R's cut() needs two breaks
        return np.zeros(0), np.zeros(0, np.int64)
    k = np.ceil(x[x <= top]).astype(np.int64)
    return np.arange(1, top + 1, dtype=np.float64), np.bincount(k, minlength=top + 1)[1:]


# ----------------------------------------------------------------------------- spatial pattern
def window_of(info) -> tuple[float, float, float, float]:
    """(xmin, xmax, ymin, ymax) of a raster's extent: the observation window of the gap pattern."""
    (sx, sy), (x0, y0) = info.pixel_size, info.origin
    return x0, x0 + info.width * sx, y0 - info.height * sy, y0


def _neighbour_pairs(xy: np.ndarray, radius: float, queries: np.ndarray | None = None, chunk: int = 4096):
    """Yield (i, j, distance) for the pairs of points at most `radius` apart.

    queries None: every unordered pair once. Otherwise: (query, other) for each query point, itself
    excluded. Points are bucketed in square cells of side >= radius and a point meets only those of its
    3 x 3 cells, so the work grows with the number of neighbours, not with n² (<= ~2048 cells a side).
    """
    cell = max(radius, float(np.ptp(xy, axis=0).max()) / 2048, 1e-12)
    ij = np.floor((xy - xy.min(0)) / cell).astype(np.int64)              # (n, 2) cell of each point
    rows = int(ij[:, 1].max()) + 3                                        # +2: a margin for offsets
    key = (ij[:, 0] + 1) * rows + ij[:, 1] + 1
    order = np.argsort(key, kind="stable")
    start = np.searchsorted(key[order], np.arange((int(ij[:, 0].max()) + 3) * rows + 1))
    half = (0, 1, rows - 1, rows, rows + 1)                               # one of each +-offset
    offsets = half if queries is None else (*half, -1, -rows + 1, -rows, -rows - 1)
    queries = np.arange(len(xy)) if queries is None else queries
    for lo in range(0, len(queries), chunk):
        q = queries[lo:lo + chunk]
        for offset in offsets:
            first, last = start[key[q] + offset], start[key[q] + offset + 1]
            count = last - first
            i = np.repeat(q, count)
            j = order[np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())]
            d = np.hypot(*(xy[i] - xy[j]).T)
            keep = (d <= radius) & ((i < j) if offset == 0 and len(offsets) == 5 else (i != j))
            yield i[keep], j[keep], d[keep]


def nearest_neighbour(xy: np.ndarray) -> np.ndarray:
    """(n, 2) points -> (n,) distance to the nearest other point (inf when n = 1).

    Searches within a radius that doubles for the points still without a neighbour inside it, starting
    at the mean spacing: a found distance <= radius is exact.
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    best = np.full(len(xy), np.inf)
    if len(xy) < 2:
        return best
    span = np.ptp(xy, axis=0)
    radius = max(math.sqrt(span[0] * span[1] / len(xy)), float(span.max()) / len(xy), 1e-12)
    for i, j, d in _neighbour_pairs(xy, radius):
        np.minimum.at(best, i, d)
        np.minimum.at(best, j, d)
    todo = np.flatnonzero(best > radius)
    while todo.size:
        radius *= 2
        for i, _, d in _neighbour_pairs(xy, radius, todo):
            np.minimum.at(best, i, d)
        todo = todo[best[todo] > radius]
    return best


CLARK_EVANS_CORRECTIONS = ("none", "Donnelly")  # spatstat's names; "none" is clarkevans.test's default


def clark_evans(xy, window, correction: str = "none") -> dict[str, float]:
    """Clark-Evans R and its two-sided asymptotic Z-test, as spatstat's clarkevans.test(X, correction=).

    R = mean nearest-neighbour distance / expected one. "none" (clarkevans.test's default, so what
    ForestGapR's GapsSpatPattern reports): expected = 0.5 / sqrt(n / area). "Donnelly" (an option here,
    as in spatstat) adds (0.0514 + 0.0412 / sqrt(n)) perimeter / n for a rectangle's edge effect.
    Z = (R - 1) / SE, SE = sqrt((4 - pi) area / (4 pi)) / n / expected. r, z, p follow `correction`;
    r_none, p_none, r_donnelly, p_donnelly give both from the one nearest-neighbour pass. NaN for fewer
    than two points.
    """
    names = {c.lower(): c for c in CLARK_EVANS_CORRECTIONS}
    if correction.lower() not in names:
        raise ValueError(f"unknown Clark-Evans correction {correction!r}, "
                         f"expected one of {CLARK_EVANS_CORRECTIONS}")
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    n, chosen = len(xy), names[correction.lower()]
    keys = ("r", "z", "p", "mean_nn_m", "r_none", "p_none", "r_donnelly", "p_donnelly")
    if n < 2:
        return {"n": n, "correction": chosen, **dict.fromkeys(keys, float("nan"))}
    width, height = window[1] - window[0], window[3] - window[2]
    area = width * height
    observed = float(nearest_neighbour(xy).mean())
    out = {"mean_nn_m": observed, "n": n, "correction": chosen}
    for name in CLARK_EVANS_CORRECTIONS:
        expected = 0.5 / math.sqrt(n / area)
        if name == "Donnelly":
            expected += (0.0514 + 0.0412 / math.sqrt(n)) * 2 * (width + height) / n
        r = observed / expected
        z = (r - 1) / (math.sqrt((4 - math.pi) * area / (4 * math.pi)) / n / expected)
        p = math.erfc(abs(z) / math.sqrt(2))
        out.update({f"r_{name.lower()}": r, f"p_{name.lower()}": p})
        if name == chosen:
            out.update(r=r, z=z, p=p)
    return out


def ripley_radii(n: int, window, count: int = 513) -> np.ndarray:
    """spatstat's default r for K: 0..min(shorter side / 4, sqrt(1000 / (pi * intensity)))."""
    width, height = window[1] - window[0], window[3] - window[2]
    r_max = min(width, height) / 4
    if n > 0:
        r_max = min(r_max, math.sqrt(1000 / (math.pi * n / (width * height))))
    return np.linspace(0.0, r_max, count)


def ripley_k(xy, window, radii) -> np.ndarray:
    """Ripley's K with the isotropic (Ripley) edge correction of a rectangle, shape (len(radii),).

    K(r) = area / (n (n - 1)) * sum over ordered pairs with d <= r of 1 / (share of the circle of radius
    d around the first point that lies inside the window), as spatstat's Kest "iso". NaN for n < 2.
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    n, radii = len(xy), np.asarray(radii, np.float64)
    if n < 2:
        return np.full(len(radii), np.nan)
    weight = np.zeros(len(radii) + 1)
    for i, j, d in _neighbour_pairs(xy, radii[-1]):                      # each pair once, both ways
        both = _ripley_weight(xy[i], d, window) + _ripley_weight(xy[j], d, window)
        weight += np.bincount(np.searchsorted(radii, d, side="left"), both, minlength=len(weight))
    area = (window[1] - window[0]) * (window[3] - window[2])
    return np.cumsum(weight[:-1]) * area / (n * (n - 1))


def _ripley_weight(xy: np.ndarray, d: np.ndarray, window) -> np.ndarray:
    """1 / share of the circle (centre xy, radius d) inside the rectangle, exact for d <= half a side.

    The arc cut off by each side spans +-acos(dist / d) around its normal; each half is clipped at the
    direction of the adjacent corner, so arcs outside two sides near a corner are counted once.
    """
    dist = np.stack([xy[:, 0] - window[0], window[1] - xy[:, 0], xy[:, 1] - window[2], window[3] - xy[:, 1]])
    outside = np.zeros(len(d))
    for side, (next1, next2) in enumerate(((2, 3), (2, 3), (0, 1), (0, 1))):   # left, right, down, up
        hit = np.flatnonzero(dist[side] < d)                  # only circles that cross this side
        a, half = dist[side, hit], np.arccos(dist[side, hit] / d[hit])
        outside[hit] += (np.minimum(half, np.arctan2(dist[next1, hit], a))
                         + np.minimum(half, np.arctan2(dist[next2, hit], a)))
    return 1.0 / (1.0 - outside / (2 * math.pi))


def ripley_envelope(xy, window, n_simulations: int = 99, seed: int = 0, radii=None) -> dict[str, np.ndarray]:
    """K and L = sqrt(K / pi) of the pattern with pointwise min/max envelopes of CSR simulations.

    As spatstat's envelope(X, Kest, nsim=99): each simulation is a Poisson pattern of the observed
    intensity in the window (the point count varies), seeded for reproducibility.
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    radii = ripley_radii(len(xy), window) if radii is None else np.asarray(radii, np.float64)
    rng = np.random.default_rng(seed)
    (x0, x1, y0, y1) = window
    simulated = np.empty((n_simulations, len(radii)))
    for k in range(n_simulations):
        m = rng.poisson(len(xy))
        points = np.stack([rng.uniform(x0, x1, m), rng.uniform(y0, y1, m)], 1)
        simulated[k] = ripley_k(points, window, radii)
    k_obs = ripley_k(xy, window, radii)
    finite = np.where(np.isnan(simulated), np.inf, simulated)      # a simulation with < 2 points: no K
    lo = finite.min(0, initial=np.inf)
    hi = np.where(np.isinf(finite), -np.inf, finite).max(0, initial=-np.inf)
    lo[np.isinf(lo)], hi[np.isinf(hi)] = np.nan, np.nan            # no usable simulation (or none asked)
    return {"r": radii, "k": k_obs, "k_theo": math.pi * radii ** 2, "k_lo": lo, "k_hi": hi,
            "l": np.sqrt(k_obs / math.pi), "l_theo": radii, "l_lo": np.sqrt(lo / math.pi),
            "l_hi": np.sqrt(hi / math.pi)}


def gap_summary(areas_m2, points, window, correction: str = "none") -> dict[str, float]:
    """Headline figures of a gap map: count, total area, lambda by both methods, Clark-Evans R and test
    with `correction` (default "none", as ForestGapR), and R and p with each correction by name."""
    areas = np.asarray(areas_m2, np.float64)
    ce = clark_evans(points, window, correction)
    return {"n_gaps": int(areas.size), "gap_area_m2": float(areas.sum()), "lambda_asner": lambda_asner(areas),
            "lambda_hanel": lambda_hanel(areas), "clark_evans_r": ce["r"], "clark_evans_z": ce["z"],
            "clark_evans_p": ce["p"], "clark_evans_correction": ce["correction"],
            **{f"clark_evans_{k}": ce[k] for k in ("r_none", "p_none", "r_donnelly", "p_donnelly")},
            "mean_nn_distance_m": ce["mean_nn_m"]}


def summarize_gap_map(labels: np.ndarray, n: int, info) -> dict[str, float]:
    """gap_summary of a gap-id raster with gaps at their label points, as ForestGapR places them.

    For comparing a predicted map with its reference (evaluate.py), threshold by threshold.
    """
    polygons = gap_polygons(labels, n, info)
    return gap_summary(polygons.area, polygons.label_point, window_of(info))


# ----------------------------------------------------------------------------- change between surveys
PIXEL_CLASSES = {1: "new", 2: "expanded", 3: "stable", 4: "regrown", 5: "closed"}  # change raster values
GAP_CLASSES = ("new", "expanded", "shrunk", "unchanged", "closed")


def gap_change(labels1: np.ndarray, n1: int, labels2: np.ndarray, n2: int) -> dict:
    """Two gap-id rasters of one grid (survey 1, then 2) -> change raster and per-gap classes.

    Pixel classes (uint8 raster, 0 elsewhere): 1 new = in a survey-2 gap that touches no survey-1 gap;
    2 expanded = gap only in survey 2, in a gap that overlaps a survey-1 gap; 3 stable = gap in both;
    4 regrown = gap only in survey 1, in a gap that partly survives; 5 closed = in a survey-1 gap that
    no survey-2 gap overlaps. 1 + 2 are GapChangeDec's new-gap pixels (gap at 2, not at 1).
    Gap classes: survey-2 gaps are new, expanded (gained pixels), shrunk (gained none, lost some) or
    unchanged (same pixels); survey-1 gaps that vanished are closed.
    """
    g1, g2 = labels1 > 0, labels2 > 0                           # (H, W)
    both = g1 & g2
    overlap2 = np.bincount(labels2[both], minlength=n2 + 1)[1:]    # (n2,) pixels that were gap
    gained2 = np.bincount(labels2[g2 & ~g1], minlength=n2 + 1)[1:]
    overlap1 = np.bincount(labels1[both], minlength=n1 + 1)[1:]
    lost1 = np.bincount(labels1[g1 & ~g2], minlength=n1 + 1)[1:]
    pairs = np.unique(labels1[both].astype(np.int64) * (n2 + 1) + labels2[both])
    one, two = np.divmod(pairs, n2 + 1)                         # overlapping (gap 1, gap 2) pairs
    changed1 = (lost1 > 0) | (np.bincount(one, minlength=n1 + 1)[1:] > 1)
    touches_changed = np.bincount(two, changed1[one - 1], minlength=n2 + 1)[1:] > 0
    class2 = np.select([overlap2 == 0, gained2 > 0, touches_changed], [0, 1, 2], 3)  # GAP_CLASSES
    closed1 = overlap1 == 0
    lookup2 = np.r_[0, np.where(class2 == 0, 1, 2)].astype(np.uint8)        # gained pixel -> 1 or 2
    lookup1 = np.r_[0, np.where(closed1, 5, 4)].astype(np.uint8)            # lost pixel -> 4 or 5
    pixels = np.zeros(labels2.shape, np.uint8)
    pixels[g2] = lookup2[labels2[g2]]
    pixels[g1] = lookup1[labels1[g1]]
    pixels[both] = 3
    return {"pixels": pixels, "class2": class2, "gained2": gained2, "closed1": closed1}


def change_summary(change: dict, area1_m2, area2_m2, pixel_area_m2: float) -> dict:
    """JSON-ready counts and areas (m²) per pixel class and per gap class of a gap_change result."""
    counts = np.bincount(change["pixels"].ravel(), minlength=6)
    area1, area2 = np.asarray(area1_m2, np.float64), np.asarray(area2_m2, np.float64)
    kinds = change["class2"]
    gaps = {name: {"count": int((kinds == k).sum()), "area_m2": float(area2[kinds == k].sum())}
            for k, name in enumerate(GAP_CLASSES[:4])}
    gaps["closed"] = {"count": int(change["closed1"].sum()), "area_m2": float(area1[change["closed1"]].sum())}
    new_pixels = int(counts[1] + counts[2])
    return {"n_gaps_1": len(area1), "n_gaps_2": len(area2), "new_gap_pixels": new_pixels,
            "new_gap_area_m2": new_pixels * pixel_area_m2,
            "area_m2": {name: float(counts[k] * pixel_area_m2) for k, name in PIXEL_CLASSES.items()},
            "gaps": gaps}


def change_table(change: dict, area1_m2, area2_m2, pixel_area_m2: float) -> dict[str, np.ndarray]:
    """One row per survey-2 gap and per closed survey-1 gap: survey, gap_id, change, area_m2, gained_m2."""
    closed = np.flatnonzero(change["closed1"])
    n2 = len(change["class2"])
    return {"survey": np.r_[np.full(n2, 2), np.full(len(closed), 1)],
            "gap_id": np.r_[np.arange(1, n2 + 1), closed + 1],
            "change": np.array([GAP_CLASSES[k] for k in change["class2"]] + ["closed"] * len(closed), str),
            "area_m2": np.r_[np.asarray(area2_m2, np.float64), np.asarray(area1_m2, np.float64)[closed]],
            "gained_m2": np.r_[change["gained2"] * pixel_area_m2, np.zeros(len(closed))]}
