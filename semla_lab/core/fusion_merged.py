"""Per-image fusion by merged weights, for layers that see many rows per image.

`FusedLoRALinear` (fusion.py) adds each image's `cat` adapter as low-rank terms: per row, K r (in + out)
multiply-adds on top of the base layer's in * out. When an image has many rows, merging its adapter into its
own weight first costs less: W_i = W + sum_k w_k s_k B_k A_k (in * out * K r once per image), then one batched
matmul per image in place of the shared one. That is cheaper as soon as

    rows per image * (in + out) > in * out.

CAT-Seg's aggregator is such a layer: it is narrow (128 channels) and sees every class at every pixel of every
image, (B * T * windows, N, C); its CLIP towers (768-wide, 577 tokens) stay low-rank. `MergedPerImageLinear`
wraps a FusedLoRALinear and takes whichever path is cheaper for the input it gets; both are the same `cat`
fusion (tests/test_fusion_merged.py compares them with peft's per-image path).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .fusion import FusedAdapters, FusedLoRALinear, active_selection


class MergedPerImageLinear(nn.Module):
    """A FusedLoRALinear (images, or image-major groups of rows, along the first axis) that merges each image's
    adapters into its own weight when that costs fewer operations than the low-rank terms."""

    def __init__(self, fused: FusedLoRALinear):
        super().__init__()
        self.fused = fused

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for models that read it rather than call the layer (then no adapter acts there)."""
        return self.fused.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.fused.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel = active_selection(self.fused.key)
        base = self.fused.base
        d_in, d_out = base.in_features, base.out_features
        if sel is None or sel.fusion != "cat":
            return self.fused(x)
        n = sel.indices.shape[0]
        assert x.shape[0] % n == 0, f"batch {x.shape[0]} is not a multiple of the selection's {n} images"
        xs = x.reshape(n, -1, d_in)                                       # (n, rows, in)
        if xs.shape[1] * (d_in + d_out) <= d_in * d_out:
            return self.fused(x)
        A, Bt, scale = self.fused.fuse(sel)                               # (n, K r, in), (n, K r, out), (n, K r)
        weight = torch.baddbmm(base.weight.T.to(x.dtype), (A * scale[..., None]).transpose(1, 2).to(x.dtype),
                               Bt.to(x.dtype))                           # (n, in, out): (W + dW_i)^T
        out = torch.bmm(xs, weight)
        if base.bias is not None:
            out.add_(base.bias.to(x.dtype))
        return out.reshape(*x.shape[:-1], d_out)


def merge_where_cheaper(fused: FusedAdapters) -> None:
    """Wrap every layer `fused` installed in a MergedPerImageLinear (in place, in fused.model); `fused.layers`
    keeps the FusedLoRALinear layers themselves."""
    for path, layer in fused.layers.items():
        parent_path, _, child = path.rpartition(".")
        setattr(fused.model.get_submodule(parent_path), child, MergedPerImageLinear(layer))
