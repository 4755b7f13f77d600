"""What retrieval owes to the tiny CLIP's training: variants of the embedding model, measured.

Variants (VARIANTS): "shipped" (the tiny CLIP: captions name weather, camera and time of day),
"untrained" (the same architecture with seeded random weights) and "no_conditions" (the shipped
recipe, train.ClipTrainConfig, on the same images with captions that drop those words). Centroids come
from each domain's train split, as the library's do; queries are test images. Per variant:

  nearest-centroid accuracy  share of test images whose nearest centroid (of all targets) is their own
  proxy regret               per target: best other single adapter minus the mean, over its images, of the
                             adapter of the nearest *other* centroid (single-adapter mIoU from the shipped
                             transfer diagnostic, transfer.json); mean over targets
  SemLA h-mean               leave-one-out SemLA with the shipped segmenter and adapters, retrieval by the
                             variant (`scoring.evaluate_target(..., embedder=...)`)

The segmenter always embeds class names with the shipped CLIP: only retrieval changes.
`semla-lab clip-variants` writes assets/benchmark/clip_variants.json; notebook 03b reads it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.clip import TINY_CLIP, Clip, embed_images, load_clip
from ..core.errors import UsageError
from ..evaluation.config import EvalConfig
from ..evaluation.embedding_space import domain_centroids, nearest_centroid_confusion
from ..evaluation.scoring import evaluate_target
from ..core.metrics import harmonic_mean
from ..library.predictor import LibraryModel
from ..data.sources import load_target
from ..training.train import ClipTrainConfig

VARIANTS = ("shipped", "untrained", "no_conditions")


def proxy_regret(queries: torch.Tensor, centroids: torch.Tensor, names: list[str], target: str,
                 adapter_miou: dict[str, float]) -> tuple[float, dict[str, int]]:
    """Best other single adapter minus the mean single-adapter mIoU of each query's nearest other centroid
    (its own domain excluded), and how often each domain was that choice."""
    others = [i for i, n in enumerate(names) if n != target]
    choice = torch.cdist(queries, centroids[others]).argmin(1)
    picked = [names[others[i]] for i in choice.tolist()]
    best = max(adapter_miou[names[i]] for i in others)
    return best - sum(adapter_miou[n] for n in picked) / len(picked), dict(Counter(picked).most_common())


def variant_clip(variant: str, cfg: ClipTrainConfig = ClipTrainConfig(), weights_dir: str | Path | None = None,
                 device=None, progress: bool = True) -> Clip:
    """The CLIP of one variant. "no_conditions" is trained exactly as `pipeline.build_clip` trains the shipped
    one (same seed, steps and images) with `captions="no_conditions"`, saved under `weights_dir/no_conditions`
    and reused from there when its recorded training config matches."""
    from ..library.assets import read_manifest
    from .pipeline import build_clip
    if variant not in VARIANTS:
        raise UsageError(f"unknown CLIP variant {variant!r}; expected one of {VARIANTS}")
    if variant == "shipped":
        return load_clip(device=device)
    if variant == "untrained":
        torch.manual_seed(cfg.seed)
        return load_clip(TINY_CLIP, pretrained="random", device=device)
    if weights_dir is None:
        raise UsageError("the no_conditions variant needs a weights folder to train into")
    root, cfg = Path(weights_dir) / variant, replace(cfg, captions="no_conditions")
    if read_manifest(root).get("tiny_clip", {}).get("config") != asdict(cfg):
        root.mkdir(parents=True, exist_ok=True)
        build_clip(root, cfg, device=device, progress=progress)
    return load_clip(TINY_CLIP, checkpoint=root / "tiny_clip.safetensors", device=device)


def training_record(variant: str, weights_dir: str | Path | None = None) -> dict | None:
    """How a variant was trained (config, final loss, seconds, threads), from its manifest; None untrained."""
    from ..library.assets import read_manifest
    if variant == "untrained":
        return None
    return read_manifest(None if variant == "shipped" else Path(weights_dir) / variant).get("tiny_clip")


def measure_variant(clip: Clip, engine: LibraryModel, text_clip: Clip, targets: list[str], transfer: dict,
                    cfg: EvalConfig = EvalConfig(), max_images: int | None = None) -> dict:
    """The three figures of the module docstring for one retrieval CLIP, per target and overall.
    `transfer` is a transfer payload (transfer.json) holding every adapter alone on every target."""
    names = engine.names
    centroids = domain_centroids(clip, names)
    per = {}
    for name in targets:
        target = load_target(name, max_images)
        queries = embed_images(clip, target.images)
        accuracy, _ = nearest_centroid_confusion(queries, [name] * len(queries), centroids, names)
        regret, chosen = proxy_regret(queries, centroids, names, name, transfer["targets"][name]["adapters"])
        semla = evaluate_target(engine, text_clip, target, ("semla",), cfg, embedder=(clip, centroids))[0]["semla"]
        per[name] = {"nearest_centroid_accuracy": round(accuracy, 3), "proxy_regret": round(regret, 2),
                     "top1_domains": chosen, "semla": round(semla, 2), "num_images": len(target.images)}
    images = sum(p["num_images"] for p in per.values())
    return {"nearest_centroid_accuracy": round(sum(p["nearest_centroid_accuracy"] * p["num_images"]
                                                   for p in per.values()) / images, 3),
            "proxy_regret": round(sum(p["proxy_regret"] for p in per.values()) / len(per), 2),
            "semla_hmean": round(harmonic_mean(p["semla"] for p in per.values()), 2), "per_target": per}


def run_clip_variants(segmenter, text_clip: Clip, library, transfer: dict, targets: list[str] | None = None,
                      variants=VARIANTS, train_cfg: ClipTrainConfig = ClipTrainConfig(), max_images: int | None = None,
                      weights_dir: str | Path | None = None, device=None, progress: bool = True) -> dict:
    """Every variant measured on `targets` (default: the library's domains), leave-one-out."""
    targets = targets or library.names()
    engine = LibraryModel(segmenter, library, device)
    out = {}
    for variant in tqdm(variants, desc="CLIP variants", disable=not progress):
        t0 = time.time()
        clip = variant_clip(variant, train_cfg, weights_dir, device, progress)
        out[variant] = measure_variant(clip, engine, text_clip, targets, transfer, max_images=max_images)
        out[variant].update(seconds=round(time.time() - t0, 1), training=training_record(variant, weights_dir))
    return {"variants": out, "config": {"recipe": asdict(train_cfg), "retrieval": asdict(EvalConfig().retrieval),
                                        "targets": targets, "max_images": max_images,
                                        "transfer": transfer["config"], "threads": torch.get_num_threads()}}
