"""Butterfly rotations: orthogonal for any angles, Hadamard at π/4, O(n log n) parameters."""

from __future__ import annotations

import math

import pytest
import torch

from q2lab.transforms.butterfly import Butterfly
from q2lab.transforms.hadamard import UnsupportedSizeError


@pytest.mark.parametrize("n", [2, 16, 64, 576, 640])
def test_any_angles_give_an_orthogonal_matrix(n):
    b = Butterfly(n)
    with torch.no_grad():
        b.angles.uniform_(-math.pi, math.pi, generator=torch.Generator().manual_seed(n))
        if b.skew is not None:
            b.skew.normal_(generator=torch.Generator().manual_seed(n + 1))
    m = b.dense()
    assert float((m.T @ m - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(b.apply(x), x @ m.T, atol=1e-12)


SIZES = [(64, 32 * 6), (1024, 512 * 10), (576, 8 * 4 + 36 * 35 // 2), (640, 16 * 5 + 20 * 19 // 2)]


@pytest.mark.parametrize(("n", "params"), SIZES)
def test_parameter_count_is_half_n_log_n_plus_the_base_factor(n, params):
    """576 = 36·16: 4 butterfly stages of 8 angles, and 630 generators of the 36 × 36 factor."""
    b = Butterfly(n)
    free = b.angles.numel() + (0 if b.skew is None else b.p * (b.p - 1) // 2)
    assert b.n_params == params == free


@pytest.mark.parametrize("n", [64, 576])
def test_pi_over_four_is_a_hadamard_matrix_and_zero_the_identity(n):
    h = Butterfly(n).dense()
    assert torch.allclose(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64), atol=1e-12)
    eye = Butterfly(n, init="identity").dense()
    if n & (n - 1) == 0:
        assert torch.allclose(eye, torch.eye(n, dtype=torch.float64), atol=1e-15)


def test_angles_learn():
    """Adam on the angles reaches a target butterfly (other angles) from the identity: the
    parametrization is differentiable end to end."""
    target = Butterfly(32)
    with torch.no_grad():
        target.angles.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    t = target.dense().float().detach()
    b = Butterfly(32, init="identity")
    opt = torch.optim.Adam(b.parameters(), lr=0.05)
    first = None
    for _ in range(300):
        loss = ((b.dense(torch.float32) - t) ** 2).sum()
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 1e-3 * first


def test_a_size_with_no_hadamard_base_is_one_clear_error():
    with pytest.raises(UnsupportedSizeError, match="no Hadamard transform of size 92"):
        Butterfly(92)


@pytest.mark.parametrize("n", [64, 576])
def test_apply_t_is_the_inverse(n):
    b = Butterfly(n)
    with torch.no_grad():
        b.angles.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
        if b.skew is not None:
            b.skew.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(b.apply_t(x), x @ b.dense(), atol=1e-12)
    assert torch.allclose(b.apply_t(b.apply(x)), x, atol=1e-12)


def test_stored_parameters_of_the_wrong_size_are_one_clear_error():
    from q2lab.errors import ShapeError

    angles, skew = Butterfly(576).params()
    with pytest.raises(ShapeError, match="do not fit size 640"):
        Butterfly.from_params(640, angles, skew)
    with pytest.raises(ShapeError, match="do not fit size 576"):
        Butterfly.from_params(576, angles, skew[:-1])
