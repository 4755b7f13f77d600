"""The leave-one-out benchmark (the paper's Table 1): one job per target (`benchmark_target`: load it, score
every method), run serially or on an engine.Engine, gathered into results.json and selections.jsonl.
`benchmark` is the runner; `run_benchmark` runs it in this process on loaded models (notebooks 07-09), and
workflows/pipeline.evaluate on models named by their files (`semla-lab evaluate`, Ray too).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..core.engine import Engine
from ..core.io import atomic_write_bytes, atomic_write_json
from ..data.sources import load_target
from ..library.predictor import LibraryModel
from ..models.clip import Clip
from .config import EvalConfig, config_methods
from .methods import METHODS
from .outputs import bootstrap_intervals, gap_closed, summarize
from .scoring import evaluate_target


@dataclass
class TargetResult:
    """One target's benchmark outcome: mIoU per method, selection records, image count, per-image
    confusions (for the bootstrap) and whether its own adapter was left out (False: the target is no
    library domain, so retrieval saw the whole library). Small enough to come back from a Ray task."""
    name: str
    scores: dict[str, float]
    records: list[dict]
    count: int
    confusions: dict[str, torch.Tensor]
    left_out: bool


def benchmark_target(model: LibraryModel, clip: Clip, source: str, methods=METHODS,
                     cfg: EvalConfig = EvalConfig()) -> TargetResult:
    """Load one target (a data source name, see sources.py) and evaluate it leave-one-out."""
    target = load_target(source, cfg.max_images, cfg.image_size)
    confusions = {}
    scores, records = evaluate_target(model, clip, target, methods, cfg, confusions)
    return TargetResult(target.name, scores, records, len(target.images), confusions, target.name in model.names)


def benchmark_payload(outcomes: list[TargetResult], library, targets: list[str], methods=METHODS,
                      cfg: EvalConfig = EvalConfig()) -> dict:
    """results.json: per-method results, gap closed, bootstrap intervals, whether each target's own adapter
    was left out (it is when the library holds the target's domain) and the run's configuration."""
    results = summarize({o.name: o.scores for o in outcomes}, {o.name: o.count for o in outcomes})
    return {"results": results, "gap_closed": gap_closed(results),
            "leave_one_out": {o.name: o.left_out for o in outcomes},
            "bootstrap": bootstrap_intervals({o.name: o.confusions for o in outcomes}),
            "config": {**asdict(cfg), "methods": list(methods), "targets": targets,
                       "library": {"root": Path(library.root).name, "domains": library.names(),
                                   "embedder": library.embedder, "base_model": library.base_model}}}


def write_benchmark(out_dir: str | Path, payload: dict, records: list[dict]) -> None:
    """results.json and selections.jsonl (one record per test image) into `out_dir`, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", payload)
    atomic_write_bytes(out / "selections.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())


def benchmark(targets: Sequence[str], job: Callable[..., TargetResult], library, methods=METHODS,
              cfg: EvalConfig = EvalConfig(), out_dir: str | Path | None = None, engine: Engine | None = None,
              gpus: float = 0.0, progress: bool = True) -> dict:
    """The benchmark runner: `job(source, methods=..., cfg=...)` -> TargetResult for each target, on `engine`
    (default: serially here; `gpus` per job on Ray), then results.json's payload (benchmark_payload), written
    with selections.jsonl to `out_dir` when given."""
    methods = tuple(config_methods(methods, cfg))
    runs = (engine or Engine()).map(partial(job, methods=methods, cfg=cfg), list(targets), gpus=gpus, ordered=True)
    outcomes = [r for _, r in tqdm(runs, total=len(targets), desc="targets", disable=not progress)]
    payload = benchmark_payload(outcomes, library, list(targets), methods, cfg)
    if out_dir is not None:
        write_benchmark(out_dir, payload, [r for o in outcomes for r in o.records])
    return payload


def run_benchmark(segmenter, clip: Clip, library, targets: list[str], methods=METHODS,
                  cfg: EvalConfig = EvalConfig(), out_dir: str | Path | None = None, device=None,
                  progress: bool = True) -> dict:
    """The leave-one-out benchmark of `methods` on `targets` in this process, with loaded models; writes
    results.json and selections.jsonl to `out_dir` when given. Returns the payload."""
    model = LibraryModel(segmenter, library, device)
    return benchmark(targets, partial(benchmark_target, model, clip), library, methods, cfg, out_dir,
                     progress=progress)
