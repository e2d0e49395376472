"""lib/gaps/morphology.py: the doubling max filter equals the max_pool2d one it replaced."""
import pytest
import torch
import torch.nn.functional as F

from lib.gaps.morphology import NEG_INF, max_filter


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
