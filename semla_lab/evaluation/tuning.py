"""Choosing SemLA's knobs on held-out domains: pick on a selection set, report on the rest.

Reading the best tau or K off the leave-one-out table one reports tunes on the test set, and the
score of the pick is then optimistic. The protocol here keeps the two apart:

  1. `split_domains` splits the target domains into a fixed, seeded *selection* set and a *report*
     set, stratified by scene kind (street-only, indoor-only, mixed): within each kind a seeded
     shuffle sends round-down(fraction x n) domains to selection and the rest to report, so the
     report set has every kind, even one with a single domain.
  2. Every configuration of the grid is scored leave-one-out on the selection domains only, on their
     **val** split (images no reported number uses); the best h-mean is the pick (ties: the default).
  3. The pick and the paper's defaults are scored on the report domains only, on their **test** split,
     per domain and in h-mean, with a paired bootstrap interval of pick - default over test images.

Scoring reuses `scoring.evaluate_target`, the benchmark's own leave-one-out code.
Notebook 06 applies it; `semla-lab tune` runs it.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

from tqdm.auto import tqdm

from ..core.errors import UsageError
from .config import EvalConfig
from .scoring import evaluate_target
from ..core.metrics import harmonic_mean, paired_bootstrap
from ..library.predictor import LibraryModel
from ..data.sources import load_target

KNOBS = ("k", "tau", "metric", "weighting", "fusion", "index", "fallback", "fallback_strength",
         "text_weight")                                    # what a selection can differ in


def scene_kind(scene: dict[str, float]) -> str:
    """"street", "indoor" or "park" for a one-kind domain, "mixed" for a mixture."""
    return next(iter(scene)) if len(scene) == 1 else "mixed"


@dataclass(frozen=True)
class HeldOutSplit:
    """Target domains for choosing knobs (`selection`) and for reporting the choice (`report`)."""
    selection: tuple[str, ...]
    report: tuple[str, ...]


def split_domains(scenes: dict[str, dict[str, float]], fraction: float = 0.5, seed: int = 0) -> HeldOutSplit:
    """Split domains (name -> scene mixture) into selection and report sets, stratified by `scene_kind`:
    per kind, a shuffle seeded by `seed` sends round-down(fraction x n) domains to selection. Both sets
    keep the input order."""
    if not 0 < fraction < 1:
        raise UsageError(f"fraction must be in (0, 1), got {fraction}")
    kinds: dict[str, list[str]] = {}
    for name, scene in scenes.items():
        kinds.setdefault(scene_kind(scene), []).append(name)
    chosen = set()
    for kind, names in sorted(kinds.items()):
        shuffled = sorted(names)
        random.Random(f"{seed}/{kind}").shuffle(shuffled)
        chosen.update(shuffled[:int(fraction * len(names))])
    if not chosen:
        raise UsageError(f"no selection domain: {len(scenes)} domains are too few to split at fraction {fraction}")
    return HeldOutSplit(tuple(n for n in scenes if n in chosen), tuple(n for n in scenes if n not in chosen))


def canonical(cfg: EvalConfig) -> EvalConfig:
    """The same configuration with tau set to the default where it cannot matter (K = 1, or uniform
    weights over the top K), so that a grid evaluates each distinct selection once."""
    if cfg.k == 1 or cfg.weighting == "uniform":
        return replace(cfg, tau=EvalConfig.tau)
    return cfg


def knobs(cfg: EvalConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k in KNOBS}


def _scores(engine, clip, targets, cfg: EvalConfig, confusions: dict | None = None) -> dict[str, float]:
    """SemLA mIoU per target (leave-one-out), with the config's options beyond the paper when any is on;
    fills `confusions[target]` with per-image confusions."""
    method = cfg.extra_method or "semla"
    out = {}
    for t in targets:
        store = {} if confusions is not None else None
        out[t.name] = evaluate_target(engine, clip, t, (method,), cfg, store)[0][method]
        if confusions is not None:
            confusions[t.name] = store[method]
    return out


def held_out_tuning(segmenter, clip, library, domains: list[str], configs: list[EvalConfig],
                    default: EvalConfig = EvalConfig(), selection_images: int = 50, report_images: int | None = None,
                    fraction: float = 0.5, seed: int = 0, resamples: int = 1000, image_size: int | None = None,
                    device=None, progress: bool = True) -> dict:
    """The held-out protocol (module docstring) over `configs` (e.g. `ablation.ablation_grid(k=..., tau=...)`),
    with `selection_images` val images per selection domain and `report_images` test images per report
    domain (None: the whole test split), rendered at `image_size` when given.

    Returns {"split": selection and report domains, "selection": one row per distinct configuration
    (knobs, h-mean, mean, per-domain mIoU on the selection val images), "pick", "default" (knobs),
    "report": {"pick"/"default": per-domain mIoU and h-mean on the report test images, "bootstrap":
    paired interval of pick - default (None when the pick is the default)}, "protocol": the settings}."""
    from ..data.world.generate import get_domain
    if not configs:
        raise UsageError("held_out_tuning needs at least one configuration")
    split = split_domains({d: dict(get_domain(d).scene) for d in domains}, fraction, seed)
    plain = lambda c: canonical(replace(c, max_images=None, image_size=None))     # this function loads the images
    base = plain(default)
    grid = list(dict.fromkeys(plain(c) for c in [default, *configs]))
    engine = LibraryModel(segmenter, library, device)
    selection = [load_target(d, selection_images, image_size, split="val") for d in split.selection]
    rows = []
    for cfg in tqdm(grid, desc="selection grid", disable=not progress):
        per = _scores(engine, clip, selection, cfg)
        rows.append({**knobs(cfg), "hmean": round(harmonic_mean(per.values()), 2),
                     "mean": round(sum(per.values()) / len(per), 2), "per_domain": {d: round(s, 2) for d, s in per.items()}})
    pick = grid[max(range(len(grid)), key=lambda i: (rows[i]["hmean"], grid[i] == base))]
    report = [load_target(d, report_images, image_size, split="test") for d in split.report]
    reported, confusions = {}, {}
    for name, cfg in (("default", base), ("pick", pick)):
        if name == "pick" and pick == base:
            reported["pick"] = reported["default"]
            continue
        confusions[name] = {}
        per = _scores(engine, clip, report, cfg, confusions[name])
        reported[name] = {"per_domain": {d: round(s, 2) for d, s in per.items()}, "hmean": round(harmonic_mean(per.values()), 2)}
    boot = paired_bootstrap(confusions["pick"], confusions["default"], resamples) if pick != base else None
    return {"split": asdict(split), "selection": rows, "pick": knobs(pick), "default": knobs(base),
            "report": {**reported, "bootstrap": boot},
            "protocol": {"selection_split": "val", "selection_images": selection_images, "report_split": "test",
                         "report_images": report_images, "fraction": fraction, "seed": seed, "stratified_by": "scene kind",
                         "configurations": len(grid)}}


def selection_table(result: dict):
    """The selection grid as a DataFrame (knobs, h-mean, mean), best first."""
    import pandas as pd
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "per_domain"} for r in result["selection"]])
    return table.sort_values("hmean", ascending=False, kind="stable").reset_index(drop=True)


def format_tuning(result: dict) -> str:
    """The split, the pick and its report-set scores next to the default's, as printable lines."""
    p, d, rep = result["pick"], result["default"], result["report"]
    def show(c):
        beyond = EvalConfig(**c).extra_method
        return f"K={c['k']}, tau={c['tau']:g}" + ("" if c["metric"] == "euclidean" else f", {c['metric']}") + \
            ("" if c["weighting"] == "softmax" else f", {c['weighting']} weights") + \
            ("" if c["fusion"] == "cat" else f", {c['fusion']}") + (f", {beyond}" if beyond else "")
    report_images = result["protocol"]["report_images"] or "all"
    lines = [f"selection domains ({result['protocol']['selection_images']} val images each): "
             + ", ".join(result["split"]["selection"]),
             f"report domains ({report_images} test images each): " + ", ".join(result["split"]["report"]),
             f"best of {result['protocol']['configurations']} configurations on the selection domains: {show(p)} "
             f"(h-mean {max(r['hmean'] for r in result['selection']):.2f})",
             f"report h-mean: pick {rep['pick']['hmean']:.2f}, default ({show(d)}) {rep['default']['hmean']:.2f}"]
    if rep["bootstrap"] is not None:
        b = rep["bootstrap"]["hmean"]
        lines.append(f"pick - default on the report domains: {b['delta']:+.2f} h-mean points, "
                     f"{100 * rep['bootstrap']['level']:.0f}% paired bootstrap [{b['low']:+.2f}, {b['high']:+.2f}]")
    else:
        lines.append("the pick is the default")
    return "\n".join(lines)
