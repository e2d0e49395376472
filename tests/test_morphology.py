"""lib/gaps/morphology.py: the doubling max filter equals the max_pool2d one it replaced; the running-sum box
mean equals a brute-force mean over the valid cells of each window."""
import pytest
import torch
import torch.nn.functional as F

from lib.gaps.morphology import NEG_INF, max_filter, mean_filter


def max_pool_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """The former max_filter: two 1-D max_pool2d passes of kernel k over -inf padding (the oracle)."""
    p = k // 2
    x = F.max_pool2d(F.pad(x, (0, 0, p, p), value=NEG_INF), (k, 1), stride=1)
    return F.max_pool2d(F.pad(x, (p, p, 0, 0), value=NEG_INF), (1, k), stride=1)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 31, 64, 101, 203])
@pytest.mark.parametrize("shape", [(2, 1, 37, 29), (1, 1, 1, 9), (3, 1, 128, 7)])
@pytest.mark.parametrize("missing", [NEG_INF, float("nan")])
def test_max_filter_equals_max_pool(k, shape, missing):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-3, 4, shape, generator=g).float()          # small integers: many ties, -0.0 and 0.0
    x = torch.where(torch.rand(shape, generator=g) < 0.5, -x, x)
    x[torch.rand(shape, generator=g) < 0.2] = missing
    torch.testing.assert_close(max_filter(x, k), max_pool_filter(x, k), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k", [1, 3, 15, 51, 99])
def test_mean_filter_is_the_mean_of_the_valid_cells_in_each_window(k):
    g = torch.Generator().manual_seed(k)
    x = 300 + 40 * torch.rand(2, 1, 41, 67, generator=g)          # metres a.s.l.: float32 sums lose centimetres
    valid = torch.rand(x.shape, generator=g) > 0.3
    valid[1, 0, :, :30] = False                                     # a wide hole: some windows see nothing
    got = mean_filter(torch.where(valid, x, torch.full_like(x, float("nan"))), valid, k).numpy()
    xs, vs, p = x.double().numpy(), valid.numpy(), k // 2
    for b, i, j in [(0, 0, 0), (0, 20, 33), (0, 40, 66), (1, 5, 10), (1, 30, 40), (1, 12, 29)]:
        win = (slice(max(i - p, 0), i + p + 1), slice(max(j - p, 0), j + p + 1))
        cells = xs[b, 0][win][vs[b, 0][win]]
        assert got[b, 0, i, j] == pytest.approx(cells.mean() if cells.size else 0.0, abs=1e-4)
