"""Adapter geometry: how alike the LoRA factors of several adapters are, and what that makes of peft's
`linear` fusion.

For K adapters on one Linear, with factors A_i (r, in), B_i (out, r), scalings s_i and weights w_i:

    cat    = sum_i w_i s_i B_i A_i                                  (SemLA's fusion)
    linear = (sum_i sqrt(w_i s_i) B_i) (sum_j sqrt(w_j s_j) A_j)   (peft's "linear")
           = cat + cross,   cross = sum_{i != j} sqrt(w_i s_i w_j s_j) B_i A_j

LoRA factors are defined only up to an invertible r x r matrix (B A = (B M)(M^-1 A)), so for independently
initialised adapters the cross terms B_i A_j point nowhere in particular. Adapters trained from one seed start
from the same A and, after a short training, still share it (A_i ~ A_j): then B_i A_j ~ B_i A_i, the cross
terms repeat the cat update, and `linear` mostly rescales it. These functions measure which case holds.
Notebook 05 uses them on the shipped library.
"""
from __future__ import annotations

import torch

from .errors import UsageError


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors of the same shape, read as flat vectors (float64)."""
    if a.shape != b.shape:
        raise UsageError(f"cosine of tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def pairwise_cosines(factors: torch.Tensor) -> torch.Tensor:
    """(K, K) float64 cosine similarities of K factors stacked as (K, ...), e.g. A factors (K, r, in)."""
    flat = factors.double().flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.T


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The K (K - 1) off-diagonal entries of a (K, K) matrix, as a flat tensor."""
    keep = ~torch.eye(matrix.shape[0], dtype=torch.bool)
    return matrix[keep]


def linear_vs_cat(A: torch.Tensor, B: torch.Tensor, weights, scaling: float) -> dict[str, float]:
    """How peft's `linear` delta relates to `cat` for K adapters on one layer (A (K, r, in), B (K, out, r),
    weights (K,) >= 0, one scaling s): {"cross_cat_cosine": cosine of the cross terms with cat,
    "linear_cat_norm_ratio": ||linear|| / ||cat||, "cross_cat_norm_ratio": ||cross|| / ||cat||} (Frobenius)."""
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise UsageError(f"expected A (K, r, in) and B (K, out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if len(w) != A.shape[0] or (w < 0).any():
        raise UsageError(f"expected {A.shape[0]} non-negative weights, got {w.tolist()}")
    c = w * scaling
    A, B = A.double(), B.double()
    cat = torch.einsum("k,kor,kri->oi", c, B, A)
    root = c.sqrt()
    linear = torch.einsum("k,kor->or", root, B) @ torch.einsum("k,kri->ri", root, A)
    cross = linear - cat
    return {"cross_cat_cosine": cosine(cross, cat),
            "linear_cat_norm_ratio": float(linear.norm() / cat.norm()),
            "cross_cat_norm_ratio": float(cross.norm() / cat.norm())}
