"""Transfer diagnostic: every library adapter applied alone to every target domain.

For each target: zero-shot, each adapter alone (its own adapter = the oracle), the uniform merge of
all adapters but its own, and per-image top-1 retrieval (its own adapter excluded). The summary
states the properties that real LoRA libraries have and a stand-in library should share:

  harm     share of off-domain (target, adapter) pairs more than `margin` mIoU below zero-shot
  uniform  uniform merge minus zero-shot, per target (real: about zero or better), with a 95% paired
           bootstrap interval over the target's images (is a miss within the noise of the images?)
  regret   best other single adapter minus per-image top-1 retrieval, mean over targets
  first-choice regret  best other single adapter minus the adapter the target's images retrieve first
           most often, alone (issue 13's definition: "the one SemLA ranks first"); per-image regret
           also counts the images whose first choice differs from the majority's
  oracle   h-mean of each target's own adapter minus the zero-shot h-mean
  scene    indoor-only targets whose most retrieved domain is street-only (should be none)

Per class (`class_ious`, `vocabulary_effect`): the IoU change an adapter brings to each class of a
target, split by whether the adapter's own domain names that class's concept (the open-vocabulary
question: does an adapter trained on 9 class names help or hurt the other classes of a 23-class target?).

Notebook 07 draws the matrix and notebook 03b the per-class view; `semla-lab transfer` writes the matrix.
`adapter_transfer` is the same view for one adapter folder (notebook 03).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models.clip import embed_class_names
from ..core.io import atomic_write_json
from .scoring import evaluate_model
from ..models.lora import load_adapter
from ..core.metrics import MIoU, harmonic_mean, paired_bootstrap
from ..library.predictor import LibraryModel
from ..core.retrieval import DomainIndex, RetrievalConfig
from ..data.sources import load_split, load_target


# Val images per target by default: the mini world draws val on demand, so val has no "every image".
VAL_IMAGES = 50


@torch.no_grad()
def target_transfer(engine: LibraryModel, clip, target, batch_size: int = 50) -> dict:
    """mIoU of zero-shot, every adapter alone, the uniform merge of the others and per-image top-1
    retrieval on one target; `top1_domains` counts which domain each image retrieved; `uniform_interval`
    is the paired bootstrap interval of uniform minus zero-shot over the target's images."""
    names = engine.names
    others = [i for i, n in enumerate(names) if n != target.name]
    text = embed_class_names(clip, target.class_names)
    keys = ["zero_shot", "uniform", "top1", *names]
    meters = {k: MIoU(len(target.class_names), per_image=k in ("zero_shot", "uniform")) for k in keys}
    index, chosen = DomainIndex(engine.library.centroids(names), names), Counter()
    for start in range(0, len(target.images), batch_size):
        x = target.images[start:start + batch_size].float().div(255)
        y = target.labels[start:start + batch_size].long()
        n = len(x)
        emb = engine.embed(clip, x)
        top1 = index.search(emb, RetrievalConfig(k=1), exclude=[target.name] if target.name in names else []).indices
        chosen.update(names[i] for i in top1[:, 0].tolist())
        one = torch.ones(n, 1)
        selections = {"zero_shot": (None, None), "top1": (top1, one),
                      "uniform": (torch.tensor(others).expand(n, -1), torch.full((n, len(others)), 1 / len(others))),
                      **{name: (torch.full((n, 1), i), one) for i, name in enumerate(names)}}
        for key, (idx, w) in selections.items():
            meters[key].update(engine.logits(x, text, idx, w).argmax(1).cpu(), y)
    scores = {k: round(m.compute()["miou"], 2) for k, m in meters.items()}
    interval = paired_bootstrap({target.name: meters["uniform"].image_confusions},
                                {target.name: meters["zero_shot"].image_confusions})["per_domain"][target.name]
    return {"zero_shot": scores["zero_shot"], "uniform": scores["uniform"], "top1": scores["top1"],
            "adapters": {n: scores[n] for n in names}, "top1_domains": dict(chosen.most_common()),
            "num_images": len(target.images), "uniform_interval": interval}


@torch.no_grad()
def class_ious(models: dict, clip, target, batch_size: int = 50) -> pd.DataFrame:
    """IoU (%) of every class of `target` under each model (name -> segmenter, e.g. the base one and peft
    models from `lora.load_adapter`): rows = the target's class names, one column per model. NaN where a
    class is in neither the ground truth nor the prediction."""
    from ..core.runtime import model_device
    text = embed_class_names(clip, target.class_names)
    meters = {k: MIoU(len(target.class_names)) for k in models}
    for start in range(0, len(target.images), batch_size):
        x = target.images[start:start + batch_size].float().div(255)
        y = target.labels[start:start + batch_size].long()
        for key, model in models.items():
            device = model_device(model)
            meters[key].update(model(x.to(device), text.to(device)).argmax(1).cpu(), y)
    return pd.DataFrame({k: [float("nan") if v is None else v for v in m.compute()["iou"]] for k, m in meters.items()},
                        index=target.class_names)


def vocabulary_effect(ious: pd.DataFrame, target_vocabulary: dict[str, str],
                      adapter_vocabularies: dict[str, dict[str, str]], base: str = "zero_shot") -> pd.DataFrame:
    """One row per (adapter, target class) from a `class_ious` table with a `base` column: the class's
    concept, whether the vocabulary (concept -> name) the adapter was trained on has that concept
    (`in_vocabulary`) and under the same name (`same_name`), base and adapted IoU and their difference
    (`change`). Classes with NaN IoU are left out."""
    rows = []
    for adapter, vocab in adapter_vocabularies.items():
        for concept, name in target_vocabulary.items():
            zs, ad = ious.loc[name, base], ious.loc[name, adapter]
            if pd.isna(zs) or pd.isna(ad):
                continue
            rows.append({"adapter": adapter, "class": name, "concept": concept, "in_vocabulary": concept in vocab,
                         "same_name": vocab.get(concept) == name, "zero_shot": zs, "adapted": ad, "change": ad - zs})
    return pd.DataFrame(rows)


def summarize_transfer(payload: dict, margin: float = 2.0) -> dict:
    """The property figures of a transfer payload (see the module docstring)."""
    per = payload["targets"]
    scenes = payload.get("scenes", {})
    off = [(t, a, s - r["zero_shot"]) for t, r in per.items() for a, s in r["adapters"].items() if a != t]
    best_other = {t: max(s for a, s in r["adapters"].items() if a != t) for t, r in per.items()}
    regret = {t: round(best_other[t] - r["top1"], 2) for t, r in per.items()}
    first = {t: next(iter(r["top1_domains"]), None) for t, r in per.items()}   # most often retrieved first
    first_regret = {t: round(best_other[t] - per[t]["adapters"][a], 2) for t, a in first.items() if a is not None}
    uniform = {t: round(r["uniform"] - r["zero_shot"], 2) for t, r in per.items()}
    own = [t for t in per if t in per[t]["adapters"]]
    street_only = {n for n, s in scenes.items() if set(s) == {"street"}}
    crossed = {t: a for t, a in first.items() if set(scenes.get(t, {})) == {"indoor"} and a in street_only}
    out = {"harm": round(sum(d < -margin for *_, d in off) / max(len(off), 1), 3), "harm_margin": margin,
           "off_domain_pairs": len(off), "uniform_minus_zero_shot": uniform,
           "worst_uniform": min(uniform.items(), key=lambda kv: kv[1]),
           "uniform_interval": {t: r["uniform_interval"] for t, r in per.items() if "uniform_interval" in r},
           "regret": round(sum(regret.values()) / len(regret), 2), "regret_per_target": regret,
           "first_choice": first, "first_choice_regret_per_target": first_regret,
           "first_choice_regret": round(sum(first_regret.values()) / max(len(first_regret), 1), 2),
           "indoor_to_street": crossed,
           "zero_shot_hmean": round(harmonic_mean(r["zero_shot"] for r in per.values()), 2)}
    if own:
        out["oracle_hmean"] = round(harmonic_mean(per[t]["adapters"][t] for t in own), 2)
        out["oracle_gain"] = round(out["oracle_hmean"] - harmonic_mean(per[t]["zero_shot"] for t in own), 2)
    return out


def transfer_matrix(payload: dict) -> pd.DataFrame:
    """(targets x adapters) mIoU of each adapter alone minus the target's zero-shot mIoU."""
    per = payload["targets"]
    return pd.DataFrame({t: {a: s - r["zero_shot"] for a, s in r["adapters"].items()} for t, r in per.items()}).T


def run_transfer(segmenter, clip, library, targets: list[str], split: str = "test", max_images: int | None = None,
                 out_dir: str | Path | None = None, device=None, progress: bool = True) -> dict:
    """The diagnostic on `targets` (names, spec files, dataset folders or real:<domain>, as `evaluate`
    takes), on the first `max_images` of each (default: every test image, as `evaluate` reads; VAL_IMAGES
    val images, which the mini world draws on demand); writes transfer.json to `out_dir` when given."""
    if max_images is None and split == "val":
        max_images = VAL_IMAGES
    engine = LibraryModel(segmenter, library, device)
    per, scenes = {}, {n: library.get(n).metadata.get("scene", {}) for n in library.names()}
    for name in tqdm(targets, desc="transfer", disable=not progress):
        target = load_target(name, max_images, split=split)
        per[target.name] = target_transfer(engine, clip, target)
        scenes.setdefault(target.name, target.scene)
    payload = {"targets": per, "scenes": scenes, "config": {"split": split, "max_images": max_images,
                                                            "library": library.names()}}
    payload["summary"] = summarize_transfer(payload)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "transfer.json", payload)
    return payload


def format_transfer(summary: dict) -> str:
    """The summary figures as a few printable lines."""
    worst = summary["worst_uniform"]
    ci = summary.get("uniform_interval", {}).get(worst[0])
    lines = [f"off-domain harm: {100 * summary['harm']:.0f}% of {summary['off_domain_pairs']} pairs more than "
             f"{summary['harm_margin']:g} mIoU below zero-shot",
             f"uniform merge - zero-shot: worst {worst[1]:+.1f} ({worst[0]}"
             + (f"; 95% paired bootstrap over its images {ci['low']:+.1f} to {ci['high']:+.1f})" if ci else ")"),
             f"retrieval regret (best other adapter - top-1 retrieved): {summary['regret']:.2f} mIoU mean per image, "
             f"{summary['first_choice_regret']:.2f} for the adapter each target retrieves first most often",
             f"indoor-only targets retrieving a street-only domain first: {summary['indoor_to_street'] or 'none'}"]
    if "oracle_gain" in summary:
        lines.append(f"own adapter h-mean {summary['oracle_hmean']:.1f} = zero-shot {summary['oracle_gain']:+.1f}")
    return "\n".join(lines)


def adapter_transfer(segmenter: torch.nn.Module, clip, adapter_dir: str | Path, domains: list[str],
                     max_images: int = 40, batch_size: int = 40):
    """mIoU of the base segmenter and of base + one adapter on the test split of each domain
    (first `max_images` images). Returns a DataFrame indexed by domain: zero_shot, adapted, gain."""
    adapted = load_adapter(segmenter, adapter_dir)
    rows = {}
    for name in domains:
        data = load_split(name, "test", max_images)
        zs = evaluate_model(segmenter, clip, data, batch_size)
        ad = evaluate_model(adapted, clip, data, batch_size)
        rows[name] = {"zero_shot": zs, "adapted": ad, "gain": ad - zs}
    return pd.DataFrame.from_dict(rows, orient="index")
