"""LoRA from scratch, and small tools to inspect and try out peft LoRA adapters.

`LoRALinear` is a minimal loralib-style layer: a frozen nn.Linear W plus a trainable low-rank
update, y = W x + (alpha / r) * B (A x), with A (r, in) Kaiming-uniform initialised (as in peft
and loralib) and B (out, r) zero, so a fresh adapter starts as the base layer. Everything else in
semla_lab uses peft's LoRA; notebook 02 checks that the two agree. The remaining helpers count
parameters, show why a LoRA target must be called as a module (nn.MultiheadAttention's dead
`out_proj`), and load / describe one adapter folder (notebook 03).
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from .segmenter import LORA_TARGETS


class LoRALinear(nn.Module):
    """A frozen Linear plus a rank-`r` update: y = W x + b + (alpha / r) * B (A x)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16):
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        self.base, self.r, self.alpha = base, r, alpha
        self.scaling = alpha / r
        for p in self.base.parameters():
            p.requires_grad_(False)                                              # only A and B train
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))            # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))           # (out, r): starts at 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))                   # peft's / loralib's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T

    def merge(self) -> torch.Tensor:
        """The merged weight W + (alpha / r) B A (out, in): one Linear, no extra inference cost."""
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A


def load_peft_factors(lora: LoRALinear, peft_layer: nn.Module, adapter_name: str = "default") -> LoRALinear:
    """Copy A, B (and check the scaling) from a peft lora.Linear layer into `lora`, in place."""
    A, B = peft_layer.lora_A[adapter_name].weight, peft_layer.lora_B[adapter_name].weight
    if A.shape != lora.lora_A.shape or B.shape != lora.lora_B.shape:
        raise ValueError(f"peft factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                         f"A {tuple(lora.lora_A.shape)}, B {tuple(lora.lora_B.shape)}")
    if not math.isclose(peft_layer.scaling[adapter_name], lora.scaling):
        raise ValueError(f"peft scaling {peft_layer.scaling[adapter_name]} != {lora.scaling}")
    with torch.no_grad():
        lora.lora_A.copy_(A)
        lora.lora_B.copy_(B)
    return lora


def lora_targets(model: nn.Module, target_modules: str = LORA_TARGETS) -> dict[str, nn.Linear]:
    """The Linear modules a peft regex `target_modules` selects (peft matches names with fullmatch)."""
    return {n: m for n, m in model.named_modules() if re.fullmatch(target_modules, n) and isinstance(m, nn.Linear)}


def parameter_counts(model: nn.Module, r: int = 8, target_modules: str = LORA_TARGETS) -> dict[str, int]:
    """Trainable parameters of LoRA vs full fine-tuning of a model's LoRA targets.

    Returns {"model": all parameters, "targets": number of target Linears, "target_weights": their
    weight entries (what full fine-tuning of those layers trains), "lora": r * (in + out) summed
    over targets (what one adapter trains and stores)}."""
    targets = lora_targets(model, target_modules)
    return {"model": sum(p.numel() for p in model.parameters()), "targets": len(targets),
            "target_weights": sum(m.weight.numel() for m in targets.values()),
            "lora": sum(r * (m.in_features + m.out_features) for m in targets.values())}


def lora_output_change(module: nn.Module, inputs: tuple, target_modules: list[str] | str, r: int = 4,
                       seed: int = 0) -> float:
    """Max |output change| when a peft LoRA with random non-zero A and B is put on `target_modules`
    of a copy of `module` (both in eval mode). 0.0 means the LoRA is dead: the module never calls the target as a
    module (nn.MultiheadAttention reads `out_proj.weight` directly)."""
    import warnings
    from peft import LoraConfig, get_peft_model

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    torch.manual_seed(seed)
    model = copy.deepcopy(module).eval()
    with torch.no_grad():
        base = first(model(*inputs))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Mm]ultihead[Aa]ttention.*")
            peft_model = get_peft_model(model, LoraConfig(
                r=r, lora_alpha=r, target_modules=target_modules, init_lora_weights=False)).eval()
        adapted = first(peft_model(*inputs))
    return float((adapted - base).abs().max())


def target_liveness(module: nn.Module, inputs: tuple, names: list[str], r: int = 4) -> dict[str, float | None]:
    """`lora_output_change` for each module name on its own; None where `name` is not an nn.Linear
    submodule (e.g. nn.MultiheadAttention's `in_proj_weight` is a bare Parameter: nothing to target)."""
    linears = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    return {n: lora_output_change(module, inputs, [n], r) if n in linears else None for n in names}


def called_fused_targets(fused, run) -> list[str]:
    """The LoRA targets of a FusedAdapters (core/fusion.py) that `run()` (a forward under a selection) calls as
    modules: the targets whose adapters act. A target whose weight the model reads directly (CAT-Seg's attention
    projections) is never called, so its adapters change nothing."""
    called: set[str] = set()
    hooks = [fused.model.get_submodule(path).register_forward_hook(lambda *_, path=path: called.add(path))
             for path in fused.layers]          # the module installed there (a wrapper of the fused layer, or it)
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return sorted(called)


def load_adapter(segmenter: nn.Module, adapter_dir: str | Path):
    """A peft model: a copy of `segmenter` with the adapter saved in `adapter_dir`, in eval mode."""
    from peft import PeftModel
    return PeftModel.from_pretrained(copy.deepcopy(segmenter), str(adapter_dir)).eval()


def describe_adapter(adapter_dir: str | Path) -> dict:
    """What one peft adapter folder holds: {"files": {name: bytes}, "config": adapter_config.json,
    "tensors": number of LoRA tensors, "parameters": their entries, "modules": adapted module count}.
    Weights are read from safetensors only."""
    from safetensors.torch import load_file
    adapter_dir = Path(adapter_dir)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {"files": {p.name: p.stat().st_size for p in sorted(adapter_dir.iterdir()) if p.is_file()},
            "config": json.loads((adapter_dir / "adapter_config.json").read_text()),
            "tensors": len(state), "parameters": sum(t.numel() for t in state.values()),
            "modules": len({k.rsplit(".lora_", 1)[0] for k in state})}


def lora_target_table(model: torch.nn.Module, pattern: str | None = None, r: int = 8) -> pd.DataFrame:
    """The nn.Linear modules a peft LoRA with regex `pattern` (default segmenter.LORA_TARGETS) would
    adapt: in/out features and the LoRA parameters r * (in + out) each."""
    import pandas as pd
    rows = [{"module": n, "in": m.in_features, "out": m.out_features, "lora params": r * (m.in_features + m.out_features)}
            for n, m in lora_targets(model, pattern or LORA_TARGETS).items()]
    return pd.DataFrame(rows, columns=["module", "in", "out", "lora params"])
