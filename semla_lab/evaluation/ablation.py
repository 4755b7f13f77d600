"""Ablations: a grid of EvalConfigs (`ablation_grid`), each scored on every target (`ablate_target`), as
tables (one row per config and method, and a tidy per-domain one) and sliced one knob at a time
(`one_at_a_time`). `ablation` is the runner; `run_ablation` runs it in this process on loaded models
(notebook 06), workflows/pipeline.ablate on models named by their files (`semla-lab ablate`, Ray too).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..core.engine import Engine
from ..core.errors import UsageError
from ..core.io import atomic_write_bytes
from ..core.metrics import harmonic_mean
from ..data.sources import load_target
from ..library.predictor import LibraryModel
from ..models.clip import Clip
from .config import EvalConfig, config_methods
from .methods import check_methods
from .scoring import evaluate_target


def ablation_grid(**axes) -> list[EvalConfig]:
    """Configs for every combination of the given knob values, e.g. k=[1, 3, 5], tau=[0.05, 0.2]."""
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    bad = set(axes) - fields
    if bad:
        raise UsageError(f"unknown knob(s) {sorted(bad)}; knobs: {sorted(fields)}")
    axes = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in axes.items()}   # scalars: one value
    keys = list(axes)
    return [EvalConfig(**dict(zip(keys, values))) for values in itertools.product(*(axes[k] for k in keys))]


def ablate_target(model: LibraryModel, clip: Clip, source: str, configs: list[EvalConfig],
                  methods=("semla",)) -> list[dict[str, float]]:
    """mIoU per method on one target for each config (the target loaded once per image count and size);
    `semla` runs with each config's options beyond the paper, when it has any."""
    loaded, out = {}, []
    for cfg in configs:
        key = (cfg.max_images, cfg.image_size)
        if key not in loaded:
            loaded[key] = load_target(source, cfg.max_images, cfg.image_size)
        out.append(evaluate_target(model, clip, loaded[key], config_methods(methods, cfg, replace_semla=True), cfg)[0])
    return out


def ablation_tables(per_target: dict[str, list[dict[str, float]]], configs: list[EvalConfig],
                    methods=("semla",)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per (config, method): the knobs, h-mean and mean mIoU over the targets; and the tidy
    per-domain table. `per_target[name][i]` holds the scores of config i."""
    rows, tidy = [], []
    for i, cfg in enumerate(configs):
        knobs = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "max_images", "image_size")}
        per_domain = {d: scores[i] for d, scores in per_target.items()}
        for m in config_methods(methods, cfg, replace_semla=True):
            scores = [per_domain[d][m] for d in per_domain if m in per_domain[d]]
            rows.append({**knobs, "method": m, "hmean": round(harmonic_mean(scores), 2),
                         "mean": round(sum(scores) / len(scores), 2)})
            tidy += [{**knobs, "method": m, "domain": d, "miou": round(per_domain[d][m], 2)}
                     for d in per_domain if m in per_domain[d]]
    return pd.DataFrame(rows), pd.DataFrame(tidy)


def write_ablation(out_dir: str | Path, table: pd.DataFrame, tidy: pd.DataFrame) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "ablation.csv", table.to_csv(index=False).encode())
    atomic_write_bytes(out / "ablation_tidy.csv", tidy.to_csv(index=False).encode())


def ablation(targets: Sequence[str], job: Callable[..., list[dict[str, float]]], configs: Sequence[EvalConfig],
             methods=("semla",), out_dir: str | Path | None = None, engine: Engine | None = None, gpus: float = 0.0,
             progress: bool = True) -> pd.DataFrame:
    """The ablation runner: `job(source, configs=..., methods=...)` -> one score dict per config for each
    target, on `engine` (default: serially here), then one row per (config, method): the knobs, h-mean and
    mean mIoU; with `out_dir`, also ablation.csv and a tidy CSV of per-domain scores (ablation_tidy.csv)."""
    methods = tuple(check_methods(methods))
    runs = (engine or Engine()).map(partial(job, configs=tuple(configs), methods=methods), list(targets), gpus=gpus,
                                    ordered=True)
    per_target = dict(tqdm(runs, total=len(targets), desc="ablation", disable=not progress))
    table, tidy = ablation_tables(per_target, list(configs), methods)
    if out_dir is not None:
        write_ablation(out_dir, table, tidy)
    return table


def run_ablation(segmenter, clip: Clip, library, targets: list[str], configs: list[EvalConfig],
                 methods=("semla",), out_dir: str | Path | None = None, device=None, progress=True) -> pd.DataFrame:
    """The ablation of `configs` on `targets` in this process, with loaded models (see `ablation`)."""
    model = LibraryModel(segmenter, library, device)
    return ablation(targets, partial(ablate_target, model, clip), configs, methods, out_dir, progress=progress)


def one_at_a_time(table: pd.DataFrame, knob: str | Sequence[str], defaults=None, method: str | None = None
                  ) -> pd.DataFrame:
    """Rows of a run_ablation table where every knob except `knob` (one name or several) keeps its
    default value (EvalConfig() unless given), sorted by the varied knob(s); optionally one method."""
    defaults = defaults or EvalConfig()
    varied = [knob] if isinstance(knob, str) else list(knob)
    knobs = [f.name for f in dataclasses.fields(defaults) if f.name not in ("batch_size", "max_images")]
    unknown = [k for k in varied if k not in knobs]
    if unknown:
        raise UsageError(f"unknown knob(s) {unknown}; knobs: {knobs}")
    keep = pd.Series(True, index=table.index)
    for k in knobs:
        if k not in varied and k in table:
            keep &= table[k] == getattr(defaults, k)
    if method is not None:
        keep &= table["method"] == method
    out = table[keep]
    numeric = [k for k in varied if pd.api.types.is_numeric_dtype(out[k])]
    if numeric:
        out = out.sort_values(numeric, kind="stable")
    return out.reset_index(drop=True)
