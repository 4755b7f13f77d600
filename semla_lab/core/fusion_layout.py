"""Per-image fusion in layers that do not see one row per image along their first axis.

`FusedLoRALinear` expects its input as (B, N, in) with image b in row b. Other models lay their batches out
otherwise; CAT-Seg, for one:
- its CLIP towers are sequence-first: the image tower sees (L, B, D), image b in column b;
- its text tower encodes every image's class names at once, (L, B*T, D), image b owning T consecutive columns;
- its aggregator folds classes and windows into the batch, (B*T*windows, N, C), image b owning a block of rows.

`ImageGroupedLinear` wraps a FusedLoRALinear: under a selection for n images it views its input as n equal,
consecutive groups along `image_axis` (0 or 1), moves them first, (n, rows, in), lets the fused layer add each
image's adapters, and restores the layout. Outside a selection it is the plain Linear. The math is the fused
layer's own (fusion.py); only the bookkeeping of which rows belong to which image lives here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .fusion import FusedAdapters, FusedLoRALinear, active_selection


class ImageGroupedLinear(nn.Module):
    """A FusedLoRALinear whose input holds each image's rows as one consecutive group along `image_axis`."""

    def __init__(self, fused: FusedLoRALinear, image_axis: int):
        super().__init__()
        if image_axis not in (0, 1):
            raise ValueError(f"image_axis must be 0 or 1, got {image_axis}")
        self.fused, self.image_axis = fused, image_axis

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for models that read it rather than call the layer (then no adapter acts there)."""
        return self.fused.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.fused.base.bias

    def per_image(self, xs: torch.Tensor, sel) -> torch.Tensor:
        """xs (n, rows, in), image i's rows in xs[i] -> (n, rows, out) with each image's adapters. When an image
        has more rows than in * out / (in + out) (CAT-Seg's narrow aggregator sees classes x pixels), merging
        its adapters into its own weight, W + sum_i w_i s_i B_i A_i, costs fewer operations than the low-rank
        path; the result is the same `cat` fusion."""
        base = self.fused.base
        d_in, d_out = base.in_features, base.out_features
        if sel.fusion != "cat" or xs.shape[1] * (d_in + d_out) <= d_in * d_out:
            return self.fused(xs)
        A, Bt, scale = self.fused.fuse(sel)                               # (n, K r, in), (n, K r, out), (n, K r)
        weight = torch.baddbmm(base.weight.T.to(xs.dtype), (A * scale[..., None]).transpose(1, 2).to(xs.dtype),
                               Bt.to(xs.dtype))                           # (n, in, out) = (W + dW_i)^T
        out = torch.bmm(xs, weight)
        return out if base.bias is None else out.add_(base.bias.to(xs.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel = active_selection(self.fused.key)
        if sel is None:
            return self.fused(x)
        n, d_in, axis = sel.indices.shape[0], x.shape[-1], self.image_axis
        assert x.shape[axis] % n == 0, (f"axis {axis} of input {tuple(x.shape)} does not split into the "
                                        f"selection's {n} images")
        if axis == 0:                                                     # (n*g, ..., in): a view
            return self.per_image(x.reshape(n, -1, d_in), sel).reshape(*x.shape[:-1], -1)
        lead = x.shape[0]                                                 # (L, n*g, ..., in)
        xs = x.reshape(lead, n, -1, d_in).transpose(0, 1).reshape(n, -1, d_in)           # (n, L*g, in)
        out = self.per_image(xs, sel)                                                    # (n, L*g, out)
        return out.reshape(n, lead, -1, out.shape[-1]).transpose(0, 1).reshape(*x.shape[:-1], -1)


def group_by_image(fused: FusedAdapters, image_axis: Callable[[str], int]) -> None:
    """Wrap every layer `fused` installed whose `image_axis(path)` is not None in an ImageGroupedLinear (in place,
    in fused.model); `fused.layers` keeps the FusedLoRALinear layers themselves."""
    for path, layer in fused.layers.items():
        axis = image_axis(path)
        if axis is not None:
            parent_path, _, child = path.rpartition(".")
            setattr(fused.model.get_submodule(parent_path), child, ImageGroupedLinear(layer, axis))
