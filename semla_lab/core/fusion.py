"""Fusing LoRA adapters per image, without creating peft adapters per image.

For each LoRA target Linear W, adapter i contributes B_i A_i scaled by s_i (peft's scaling: alpha / r, or
alpha / sqrt(r) for rsLoRA, with alpha and r of that module under alpha_pattern / rank_pattern). With
per-image weights w (top-K of a library), the paper's `cat` fusion is exactly peft's
`add_weighted_adapter(..., combination_type="cat")`:

    A_cat = [w_1 s_1 A_1; ...; w_K s_K A_K]   B_cat = [B_1 ... B_K]
    dW    = B_cat A_cat = sum_i w_i s_i B_i A_i

We compute x -> x W^T + (x A_cat^T) B_cat^T with batched matmuls, so every image in a batch can
have its own adapters and weights. peft's `linear` instead mixes A's and B's separately,
(sum_i sqrt(w_i s_i) B_i)(sum_j sqrt(w_j s_j) A_j), which is NOT sum_i w_i dW_i: cross terms
B_i A_j appear. Notebook 05 derives both by hand and checks them against peft.

A selection is active inside `with fused.select(...)` for the current thread (or asyncio task) only, and an
inner `select` replaces the outer one until its block ends: selections live in a ContextVar.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

FUSION_TYPES = ("cat", "linear")


@dataclass
class Selection:
    """Per-image adapter choice: indices (B, K) into the library, weights (B, K), fusion type."""
    indices: torch.Tensor
    weights: torch.Tensor
    fusion: str = "cat"


_ACTIVE: ContextVar[dict] = ContextVar("semla_selections", default={})   # {FusedAdapters key: Selection}, never mutated


@contextmanager
def selecting(key: object, sel: Selection):
    """Make `sel` the selection of the layers installed under `key`, in this thread or task, until the block
    ends; nested blocks stack (the outer selection returns when the inner block ends)."""
    token = _ACTIVE.set({**_ACTIVE.get(), key: sel})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_selection(key: object) -> Selection | None:
    """The selection of the layers installed under `key` in this thread or task; None outside `select` (the base
    model)."""
    return _ACTIVE.get().get(key)


class FusedLoRALinear(nn.Module):
    """A frozen Linear plus the stacked LoRA factors of every library adapter for it:
    A (L, r, in), B (L, out, r), scaling (L,). With no active selection under `key` it is the plain Linear."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, key: object):
        super().__init__()
        self.base = base
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("Bt", B.transpose(1, 2).contiguous(), persistent=False)   # (L, r, out) for cat
        self.register_buffer("scaling", scaling, persistent=False)
        self.key = key               # that of the FusedAdapters that installed this layer (a copy gets its own)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, as peft's layers expose it: a model that reads a target's weight instead of calling
        the module (CAT-Seg's attention, as the official) sees the base layer, and that target stays inert."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def fuse(self, sel: Selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fusion step for this layer, every image at once: A_cat (B, K r, in) and B_cat^T (B, K r, out)
        gathered from the library, and the row scales w_i s_i (B, K r) of A_cat."""
        n, k = sel.indices.shape
        flat = sel.indices.reshape(-1)
        r, d_in = self.A.shape[1:]
        scale = (sel.weights * self.scaling.index_select(0, flat).view(n, k)).repeat_interleave(r, dim=1)
        return (self.A.index_select(0, flat).view(n, k * r, d_in),
                self.Bt.index_select(0, flat).view(n, k * r, -1), scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        sel: Selection | None = _ACTIVE.get().get(self.key)
        if sel is None:
            return out
        n = sel.indices.shape[0]
        # the leading axis holds the images, or image-major groups of rows (CAT-Seg: images x classes x windows)
        assert x.shape[0] % n == 0, f"batch {x.shape[0]} is not a multiple of the selection's {n} images"
        xs, base = x.reshape(n, -1, x.shape[-1]), out.reshape(n, -1, out.shape[-1])   # (B, N, in), (B, N, out)
        if sel.fusion == "cat":      # the scales go on h (B, N, K r), fewer numbers than A_cat when N < in
            A, Bt, scale = self.fuse(sel)
            h = torch.bmm(xs, A.transpose(1, 2).to(x.dtype)).mul_(scale.to(x.dtype)[:, None])
            res = base.baddbmm_(h, Bt.to(x.dtype))   # in place: a new (B, N, out) tensor costs page faults on CPU
        else:  # linear: mix the factors first, as peft does
            idx = sel.indices
            coef = sel.weights * self.scaling[idx]                                 # (B, K)
            A, B = self.A[idx].to(x.dtype), self.B[idx].to(x.dtype)               # (B, K, r, in), (B, K, out, r)
            root = coef.abs().sqrt().to(x.dtype)
            A_mix = torch.einsum("bk,bkri->bri", root * coef.sign().to(x.dtype), A)
            B_mix = torch.einsum("bk,bkor->bor", root, B)
            res = base + torch.einsum("bnr,bor->bno", torch.einsum("bni,bri->bnr", xs, A_mix), B_mix)
        return res.reshape(out.shape)


def _module_path(key: str) -> tuple[str, str]:
    """peft key 'base_model.model.<path>.lora_A.weight' -> (<path>, 'A')."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    if not m:
        raise ValueError(f"not a LoRA weight key: {key!r}")
    return m.group(1), m.group(2)


class FusedAdapters:
    """Installs a library's adapters into a model (in place) as FusedLoRALinear layers.

    `adapters` maps name -> (peft state dict, scaling s): a number, or a function of the module path for
    per-module scaling (library.lora_scaling). Use `with fused.select(indices, weights):` to run the model with
    per-image fusion; outside the block the model is the base model."""

    def __init__(self, model: nn.Module,
                 adapters: dict[str, tuple[dict[str, torch.Tensor], float | Callable[[str], float]]]):
        if not adapters:
            raise ValueError("FusedAdapters needs at least one adapter")
        self.model, self.names = model, list(adapters)
        self.key = object()
        self.layers: dict[str, FusedLoRALinear] = {}
        factors: dict[str, dict[str, list]] = {}
        for name, (weights, _) in adapters.items():
            for key, tensor in weights.items():
                path, which = _module_path(key)
                factors.setdefault(path, {"A": [None] * len(self.names), "B": [None] * len(self.names)})
                factors[path][which][self.names.index(name)] = tensor.float()
        for path, ab in factors.items():
            missing = [self.names[i] for i, t in enumerate(ab["A"] + ab["B"]) if t is None][:3]
            if missing:
                raise ValueError(f"adapters {missing} lack LoRA weights for module {path!r}: "
                                 "all adapters of a library must share target modules")
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, child)
            if isinstance(base, FusedLoRALinear):
                raise ValueError(f"{path} already carries fused adapters; install once per model")
            if not isinstance(base, nn.Linear):
                raise ValueError(f"LoRA target {path} is a {type(base).__name__}, expected nn.Linear")
            device = base.weight.device
            scaling = torch.tensor([s(path) if callable(s) else s for _, s in adapters.values()], device=device)
            self.layers[path] = FusedLoRALinear(base, torch.stack(ab["A"]).to(device),
                                                torch.stack(ab["B"]).to(device), scaling.float(), self.key)
            setattr(parent, child, self.layers[path])

    @property
    def modules(self) -> list[str]:
        """Paths of the LoRA target layers, sorted."""
        return sorted(self.layers)

    def _selection(self, indices: torch.Tensor, weights: torch.Tensor, fusion: str) -> Selection:
        if fusion not in FUSION_TYPES:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSION_TYPES}")
        if indices.shape != weights.shape or indices.dim() != 2:
            raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be (B, K)")
        if len(self.names) and (indices.min() < 0 or indices.max() >= len(self.names)):
            raise ValueError(f"adapter indices must lie in [0, {len(self.names)})")
        device = next(iter(self.model.parameters())).device
        return Selection(indices.to(device), weights.to(device).float(), fusion)

    @contextmanager
    def select(self, indices: torch.Tensor, weights: torch.Tensor, fusion: str = "cat"):
        """Activate per-image fusion in this thread or task: indices (B, K) long, weights (B, K)."""
        with selecting(self.key, self._selection(indices, weights, fusion)):
            yield

    def fused_lora(self, indices: torch.Tensor, weights: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each image's fused `cat` adapter, as peft's add_weighted_adapter(cat) stores it (with scaling 1):
        {module path: (lora_A (B, K r, in), lora_B (B, out, K r))}. The forward under `select` never builds
        these: it gathers the same factors layer by layer (`FusedLoRALinear.fuse`) and scales h instead of A."""
        sel = self._selection(indices, weights, "cat")
        fused = {}
        for path, layer in self.layers.items():
            A, Bt, scale = layer.fuse(sel)
            fused[path] = (A * scale[..., None], Bt.transpose(1, 2))
        return fused

    def index(self, names: list[str]) -> torch.Tensor:
        return torch.tensor([self.names.index(n) for n in names])


def peft_weighted_forward(peft_model, adapters: list[str], weights: list[float], *inputs,
                          combination_type: str = "cat"):
    """The official SemLA path, kept as a reference: build a weighted adapter with peft, activate it,
    run the model, delete it, and disable adapters (deleting the active adapter silently activates
    another one in peft)."""
    from peft.tuners.lora import LoraLayer
    peft_model.add_weighted_adapter(adapters, weights, "_fused", combination_type=combination_type)
    for layer in peft_model.modules():   # the adapters' scalings are folded into the new weights, so its own s
        if isinstance(layer, LoraLayer) and "_fused" in layer.scaling:   # is 1; peft 0.21 copies use_rslora and
            layer.scaling["_fused"] = 1.0                                 # sets sqrt(K r) (fixed by peft PR #3449)
    peft_model.set_adapter("_fused")
    peft_model.base_model.enable_adapter_layers()
    try:
        with torch.no_grad():
            return peft_model(*inputs)
    finally:
        with warnings.catch_warnings():    # "Adapter _fused was active which is now deleted": expected
            warnings.simplefilter("ignore", UserWarning)
            peft_model.delete_adapter("_fused")
        peft_model.base_model.disable_adapter_layers()
