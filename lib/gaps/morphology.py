"""Raster primitives of the DSM-only methods, in torch on (B, 1, H, W) metres: separable max, NaN-aware
opening and box mean, and hole filling by a pull-push pyramid. Exact for max/min; box sums run in float64."""
import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def odd(n: int) -> int:
    return max(1, int(n) | 1)


def max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Square max filter of odd side k, separable (exact for max); x (B,1,H,W) with -inf as 'no value'.
    NaN propagates to every window holding it (as max_pool2d does); opening never passes NaN."""
    p = k // 2
    x = _sliding_max(F.pad(x, (0, 0, p, p), value=NEG_INF), k, dim=-2)
    return _sliding_max(F.pad(x, (p, p, 0, 0), value=NEG_INF), k, dim=-1)


def _sliding_max(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Max over every k consecutive cells along dim (length L -> L - k + 1), by doubling: after the step of
    shift s each cell holds the max of 2s cells, and two overlapping runs of s >= k / 2 cover k. That is
    log2(k) + 1 elementwise maxima instead of max_pool's k comparisons per cell. Equal to max_pool2d
    except that a tie of -0.0 and 0.0 may give either zero."""
    n = x.size(dim) - k + 1
    s = 1
    while 2 * s <= k:                               # after this step x[i] = max of the input[i : i + 2s]
        length = x.size(dim) - s
        x = torch.maximum(x.narrow(dim, 0, length), x.narrow(dim, s, length))
        s *= 2
    return torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, k - s, n))


def opening(z: torch.Tensor, k: int) -> torch.Tensor:
    """Grey opening (erosion then dilation) with a k x k square; NaN cells are ignored, and stay NaN only
    where no valid cell is within reach."""
    valid = torch.isfinite(z)
    eroded = -max_filter(torch.where(valid, -z, torch.full_like(z, NEG_INF)), k)
    opened = max_filter(torch.where(torch.isfinite(eroded), eroded, torch.full_like(z, NEG_INF)), k)
    return torch.where(torch.isfinite(opened), opened, torch.full_like(z, float("nan")))


def _box_sum(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sum over a window of odd side k centred on each cell along dim (-2 or -1), zeros beyond the edges:
    a difference of float64 running sums, so the cost does not grow with k and the float32 result is exact
    to rounding (summing k float32 terms is not)."""
    n, p = x.shape[dim], k // 2
    sums = F.pad(x, (p, p, 0, 0) if dim == -1 else (0, 0, p, p)).double().cumsum(dim)
    sums = F.pad(sums, (1, 0, 0, 0) if dim == -1 else (0, 0, 1, 0))
    return sums.narrow(dim, k, n) - sums.narrow(dim, 0, n)


def mean_filter(x: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Box mean over valid pixels only (separable sums), x and valid (B,1,H,W)."""
    num = torch.where(valid, x, torch.zeros_like(x))
    den = valid.to(x.dtype)
    for dim in (-2, -1):
        num, den = _box_sum(num, k, dim), _box_sum(den, k, dim)
    return (num / den.clamp_min(0.5)).to(x.dtype)


def _relax(z: torch.Tensor, known: torch.Tensor, values: torch.Tensor, iterations: int) -> torch.Tensor:
    """Jacobi steps of Laplace's equation on the unknown cells (known cells keep their values)."""
    for _ in range(iterations):
        z = torch.where(known, values, F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, stride=1))
    return z


def fill_holes(z: torch.Tensor, known: torch.Tensor, relax_iterations: int = 4) -> torch.Tensor:
    """Every cell of z (B,1,H,W) where `known` is False interpolated from the known ones: weighted means
    pulled up a pyramid of 2x2 blocks, pushed back down bilinearly and relaxed towards a harmonic surface at
    each level (a smooth membrane over the holes, like linear interpolation in a TIN but gridded).
    Cells stay NaN only when nothing is known."""
    if not bool(known.any()):
        return torch.full_like(z, float("nan"))
    weight = known.to(z.dtype)
    total = torch.where(known, z, torch.zeros_like(z))
    pyramid = []
    while True:
        pyramid.append((total, weight))
        h, w = total.shape[-2:]
        if (h == 1 and w == 1) or bool((weight > 0).all()):
            break
        pad = (0, w % 2, 0, h % 2)
        total = F.avg_pool2d(F.pad(total, pad), 2) * 4
        weight = F.avg_pool2d(F.pad(weight, pad), 2) * 4
    filled = None
    for total, weight in reversed(pyramid):
        have = weight > 0
        means = total / weight.clamp_min(1e-12)
        if filled is None:
            filled = torch.where(have, means, means[have].mean())
            continue
        guess = F.interpolate(filled, size=total.shape[-2:], mode="bilinear", align_corners=False)
        filled = _relax(torch.where(have, means, guess), have, means, relax_iterations)
    return filled


def cone_erosion(z: torch.Tensor, slope: torch.Tensor | float, radius_px: int, pixel_size_m: float) -> torch.Tensor:
    """min over cells q within radius_px of z(q) + slope x distance(p, q): a grey erosion by a cone, the
    test of Vosselman's slope-based filter. Built from radius_px 3 x 3 steps (distances along chamfer paths:
    1 and sqrt 2 pixels). Neighbours one rise apart share their minimum before it is added (min(a, b) + c
    rounds as min(a + c, b + c) does), and the left-right minimum serves three rows: 8 passes per pixel of
    radius, not 16. NaN cells never lower anything; cells no finite cell reaches are NaN."""
    big = torch.finfo(z.dtype).max
    h, w = z.shape[-2:]
    padded = torch.full((*z.shape[:-2], h + 2, w + 2), big, dtype=z.dtype, device=z.device)
    out = padded[..., 1:-1, 1:-1]                  # updated in place; the border stays big
    out.copy_(torch.where(torch.isfinite(z), z, torch.full_like(z, big)))
    edge, corner = (torch.as_tensor(slope * d, dtype=z.dtype, device=z.device).expand_as(z)
                    for d in (pixel_size_m, pixel_size_m * 2 ** 0.5))
    across = z.new_empty((*z.shape[:-2], h + 2, w))  # min of the left and right neighbours, every padded row
    edges, corners = torch.empty_like(z), torch.empty_like(z)
    for _ in range(radius_px):  # both minima read the previous step before out changes
        torch.minimum(padded[..., :, :-2], padded[..., :, 2:], out=across)
        torch.minimum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], out=edges)
        torch.minimum(edges, across[..., 1:-1, :], out=edges)
        torch.minimum(across[..., :-2, :], across[..., 2:, :], out=corners)
        torch.minimum(out, edges.add_(edge), out=out)
        torch.minimum(out, corners.add_(corner), out=out)
    return torch.where(out < big, out, torch.full_like(out, float("nan")))
