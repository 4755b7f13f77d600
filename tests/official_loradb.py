"""Writes the official SemLA files for tests: small libraries, loradb/<domain>/ peft folders (saved by peft's
save_pretrained with the domain as adapter name, as the official train_net.py saves them) and
<domain>_statistics.npz centroids (train_average_embedding (1, D), as generate_embeddings.py writes them);
and CAT-Seg checkpoints in detectron2's layout ({"model": state}, official key names)."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model


def official_peft_model(model: torch.nn.Module, targets: list[str], names: list[str], seed: int, std: float = 0.05):
    """A peft model around a copy of `model` with one rank-8, alpha-16 LoRA per name on `targets`, every factor
    random (lora_B too, so each adapter changes the output), drawn from `seed`."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.0, bias="none",
                     init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), cfg, adapter_name=names[0])
        for n in names[1:]:
            peft_model.add_adapter(n, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    return peft_model.eval()


def write_loradb(peft_model, root: Path, centroids: dict[str, np.ndarray], targets: list[str]) -> Path:
    """Save every adapter of `peft_model` to root/<name>/ and its centroid beside it. The configs list the full
    target names, as the official peft wrote them (newer peft shortens a long list to module-name suffixes)."""
    root = Path(root)
    peft_model.save_pretrained(str(root), selected_adapters=list(centroids), save_embedding_layers=False)
    for name, centroid in centroids.items():
        config = root / name / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": list(targets)}, indent=2))
        np.savez(root / name / f"{name}_statistics.npz",
                 train_average_embedding=np.asarray(centroid, dtype=np.float32).reshape(1, -1))
    return root


def write_detectron2_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """`model`'s weights as detectron2 saves the official CAT-Seg: {"model": state dict}, every attention's
    `attn.{q,k,v}_proj.weight` also under nn.MultiheadAttention's `attn.{q,k,v}_proj_weight` (tied in the official
    model)."""
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value
        for m in "qkv":
            if key.endswith(f".attn.{m}_proj.weight"):
                state[key.replace(f"{m}_proj.weight", f"{m}_proj_weight")] = value
    torch.save({"model": state, "iteration": 0}, path)
    return Path(path)
