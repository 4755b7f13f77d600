"""Scoring on one target domain: a segmenter's mIoU (`evaluate_model`), and every method's mIoU with one
selection record per image (`evaluate_target`). Leave-one-out excludes the target's own adapter from every
method but the oracle when the library holds it.
"""
from __future__ import annotations

import torch

from ..core.metrics import MIoU
from ..core.retrieval import DomainIndex
from ..core.runtime import model_device
from ..data.split import Split
from ..library.predictor import LibraryModel
from ..models.clip import Clip
from ..models.segmenter import class_text
from .config import EvalConfig, config_methods
from .methods import METHODS, check_methods, is_beyond, predict_batch


@torch.no_grad()
def evaluate_model(model, clip: Clip, data, batch_size: int = 64) -> float:
    """mIoU (0-100) of a segmenter (no adaptation) on a Split, with its own class names,
    computed on the model's device."""
    device = model_device(model)
    text = class_text(model, clip, data.class_names).to(device)
    meter = MIoU(len(data.class_names))
    for start in range(0, len(data.images), batch_size):
        x = data.images[start:start + batch_size].to(device).float().div(255)
        meter.update(model(x, text).argmax(1).cpu(), data.labels[start:start + batch_size].long())
    return meter.compute()["miou"]


def evaluate_target(engine: LibraryModel, clip: Clip, target: Split, methods=METHODS,
                    cfg: EvalConfig = EvalConfig(), image_confusions: dict | None = None, leave_one_out: bool = True,
                    embedder: tuple[Clip, torch.Tensor] | None = None) -> tuple[dict[str, float], list[dict]]:
    """mIoU per method on one target domain, and one selection record per image. Leave-one-out excludes
    the target's own adapter when the library holds it; without it, retrieval sees the whole library
    (deployment after adding a domain). With `image_confusions` (a dict), also fills it with each
    method's per-image confusion matrices (N, C, C) for the bootstrap. `embedder` = (CLIP, centroids (L, D)
    in library order) retrieves with another embedding model than `clip`, which still embeds the class
    names for the segmenter (notebook 03b's CLIP variants)."""
    methods = config_methods(methods, EvalConfig() if cfg.extra_method is None else cfg) if any(
        is_beyond(m) for m in methods) else check_methods(methods)
    names = engine.names
    exclude = [target.name] if leave_one_out and target.name in names else []
    text = class_text(engine.model, clip, target.class_names)
    meters = {m: MIoU(len(target.class_names), per_image=image_confusions is not None)
              for m in methods if m != "oracle" or target.name in names}
    records = []
    index = DomainIndex.from_library(engine.library, names) if embedder is None else None
    extra = cfg.extra_method if cfg.extra_method in meters else None
    for start in range(0, len(target.images), cfg.batch_size):
        x = target.images[start:start + cfg.batch_size]
        y = target.labels[start:start + cfg.batch_size].long()
        n = len(x)
        masks, batch, seconds = predict_batch(engine, clip, x, text, list(meters), cfg.paper_retrieval, cfg.fusion,
                                              own=target.name, exclude=exclude, embedder=embedder,
                                              beyond=cfg.retrieval if extra else None, index=index)
        ret, beyond = batch.retrieval, batch.beyond
        for m, mask in masks.items():
            meters[m].update(mask, y)
        for i in range(n):
            records.append({
                "image_id": target.ids[start + i], "target": target.name,
                "distances": {d: round(float(v), 5) for d, v in zip(names, ret.distances[i])},
                "chosen": [names[j] for j in ret.indices[i].tolist()],
                "weights": [round(float(w), 5) for w in ret.weights[i]],
                **({extra: {"chosen": [names[j] for j in beyond.indices[i].tolist()],
                            "weights": [round(float(w), 5) for w in beyond.weights[i]]}} if extra else {}),
                "ms": {"embed": 1000 * seconds["embed"] / n, "retrieve": 1000 * seconds["retrieve"] / n,
                       **{f"predict_{m}": 1000 * seconds[m] / n for m in masks}},
            })
    if image_confusions is not None:
        image_confusions.update({m: meter.image_confusions for m, meter in meters.items()})
    return {m: meter.compute()["miou"] for m, meter in meters.items()}, records
