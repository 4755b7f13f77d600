"""Reference paths that tests and notebook 05 check core/fusion.py against: the weight delta of K LoRA
adapters on one Linear by hand from a peft state dict's factors (cat: dW = sum_i w_i s_i B_i A_i; peft's
linear combination with its cross terms), and the deltas that FusedAdapters and peft's add_weighted_adapter
actually apply on a layer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import UnknownNameError, UsageError
from .fusion import _module_path


def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths (e.g. 'visual.transformer.resblocks.0.attn.in_proj') of a peft LoRA state dict."""
    return sorted({_module_path(k)[0] for k in state})


def lora_factors(state: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of one module from a peft LoRA state dict."""
    found = {}
    for key, t in state.items():
        path, which = _module_path(key)
        if path == module:
            found[which] = t.float()
    if set(found) != {"A", "B"}:
        raise UnknownNameError(f"no LoRA factors for module {module!r}; modules: {lora_modules(state)[:4]} ...")
    return found["A"], found["B"]


def _stack(As, Bs, weights, scalings):
    A, B = torch.stack([a.double() for a in As]), torch.stack([b.double() for b in Bs])   # (K, r, in), (K, out, r)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(scalings, dtype=torch.float64).reshape(-1).expand_as(w)
    if not len(w) == len(A) == len(B):
        raise UsageError(f"got {len(A)} A's, {len(B)} B's and {len(w)} weights")
    return A, B, w * s


def fuse_by_hand(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights, scalings,
                 fusion: str = "cat") -> torch.Tensor:
    """Reference weight delta (out, in), float64, of K adapters on one Linear.
    cat (SemLA, peft "cat"): dW = sum_i w_i s_i B_i A_i.
    linear (peft "linear"): dW = (sum_i sqrt(w_i s_i) B_i) (sum_j sqrt(w_j s_j) A_j) (w_i s_i >= 0)."""
    A, B, c = _stack(As, Bs, weights, scalings)
    if fusion == "cat":
        return torch.einsum("k,kor,kri->oi", c, B, A)
    if fusion == "linear":
        root = c.abs().sqrt()
        return torch.einsum("k,kor->or", root, B) @ torch.einsum("k,kri->ri", root * c.sign(), A)
    raise UsageError(f"unknown fusion {fusion!r}; expected 'cat' or 'linear'")


def linear_cross_terms(As, Bs, weights, scalings) -> dict[str, torch.Tensor]:
    """Split peft's linear delta into its 'diagonal' part sum_i w_i s_i B_i A_i (= cat) and the cross
    terms sum_{i != j} sqrt(w_i s_i w_j s_j) B_i A_j that cat does not have: {'diagonal', 'cross',
    'linear'} (out, in) each, with linear = diagonal + cross."""
    A, B, c = _stack(As, Bs, weights, scalings)
    root = c.sqrt()
    pair = torch.einsum("aor,bri->aboi", B, A)                                # (K, K, out, in): B_a A_b
    coef = root[:, None] * root[None, :]                                      # (K, K)
    eye = torch.eye(len(c), dtype=torch.bool)
    diagonal = torch.einsum("ab,aboi->oi", coef * eye, pair)
    cross = torch.einsum("ab,aboi->oi", coef * ~eye, pair)
    return {"diagonal": diagonal, "cross": cross, "linear": diagonal + cross}


def fused_layer_delta(fused, module: str, indices: Sequence[int], weights: Sequence[float],
                      fusion: str = "cat") -> torch.Tensor:
    """The weight delta (out, in) that the package's FusedAdapters applies on one layer for one image
    with adapters `indices` (K,) and `weights` (K,): the layer is probed with the identity matrix,
    dW^T = layer(I) - base(I)."""
    layer = fused.model.get_submodule(module)
    eye = torch.eye(layer.base.in_features, device=layer.A.device)[None]       # (1, in, in)
    idx = torch.as_tensor(list(indices)).view(1, -1)
    w = torch.as_tensor(list(weights), dtype=torch.float32).view(1, -1)
    with fused.select(idx, w, fusion), torch.no_grad():
        delta = layer(eye) - layer.base(eye)                                  # (1, in, out)
    return delta[0].T.cpu()


def peft_layer_delta(peft_model, adapters: Sequence[str], weights: Sequence[float], module: str,
                     combination_type: str = "cat") -> torch.Tensor:
    """peft's own weight delta (out, in) on one layer after add_weighted_adapter(adapters, weights,
    combination_type); the temporary adapter is deleted again."""
    name = "_probe"
    peft_model.add_weighted_adapter(list(adapters), [float(w) for w in weights], name,
                                    combination_type=combination_type)
    try:
        with torch.no_grad():
            return peft_model.base_model.model.get_submodule(module).get_delta_weight(name).detach().cpu()
    finally:
        peft_model.delete_adapter(name)
