"""Adapter geometry (semla_lab.core.adapter_geometry): factor cosines and peft's linear fusion against cat."""
import pytest
import torch

from semla_lab.core.adapter_geometry import (
    cosine,
    linear_vs_cat,
    off_diagonal,
    pairwise_cosines,
)
from semla_lab.core.errors import UsageError


def factors(k=4, r=3, d_in=6, d_out=5, shared_a=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, r, d_in, generator=g)
    if shared_a:
        A = A[:1].expand(k, r, d_in).clone()
    return A, torch.randn(k, d_out, r, generator=g)


def test_pairwise_cosines_are_one_for_equal_factors_and_zero_for_orthogonal_ones():
    eye = torch.eye(3).reshape(3, 1, 3)                       # three orthogonal (1, 3) factors
    assert torch.allclose(pairwise_cosines(eye), torch.eye(3, dtype=torch.float64))
    same = torch.ones(2, 2, 2)
    assert torch.allclose(pairwise_cosines(same * torch.tensor([1.0, 3.0]).view(2, 1, 1)),
                          torch.ones(2, 2, dtype=torch.float64))     # scale does not matter
    assert off_diagonal(torch.arange(9.0).reshape(3, 3)).tolist() == [1, 2, 3, 5, 6, 7]
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == pytest.approx(-1.0)


def test_linear_vs_cat_matches_the_sum_over_pairs():
    A, B = factors()
    w, s = torch.tensor([0.5, 0.3, 0.15, 0.05]), 2.0
    c = (w * s).double()
    cat = sum(c[i] * B[i].double() @ A[i].double() for i in range(4))
    cross = sum((c[i] * c[j]).sqrt() * B[i].double() @ A[j].double() for i in range(4) for j in range(4) if i != j)
    got = linear_vs_cat(A, B, w, s)
    assert got["cross_cat_norm_ratio"] == pytest.approx(float(cross.norm() / cat.norm()))
    assert got["linear_cat_norm_ratio"] == pytest.approx(float((cat + cross).norm() / cat.norm()))
    assert got["cross_cat_cosine"] == pytest.approx(float((cross * cat).sum() / (cross.norm() * cat.norm())))


def test_a_shared_a_makes_linear_a_rescaled_cat_k_times_larger_for_uniform_weights():
    A, B = factors(shared_a=True)
    got = linear_vs_cat(A, B, torch.full((4,), 0.25), 2.0)
    assert got["cross_cat_cosine"] == pytest.approx(1.0)
    assert got["linear_cat_norm_ratio"] == pytest.approx(4.0)    # (sum_j sqrt(w_j))^2 = K for uniform weights
    independent = linear_vs_cat(*factors(k=4, r=8, d_in=64, d_out=64), torch.full((4,), 0.25), 2.0)
    assert abs(independent["cross_cat_cosine"]) < 0.2            # unrelated A's: cross terms point elsewhere


def test_linear_vs_cat_rejects_mismatched_shapes_and_negative_weights():
    A, B = factors()
    with pytest.raises(UsageError, match="expected A"):
        linear_vs_cat(A, B[:, :, :2], torch.full((4,), 0.25), 2.0)
    with pytest.raises(UsageError, match="non-negative"):
        linear_vs_cat(A, B, torch.tensor([0.5, 0.5, 0.5, -0.5]), 2.0)
    with pytest.raises(UsageError, match="different shapes"):
        cosine(torch.ones(2), torch.ones(3))
