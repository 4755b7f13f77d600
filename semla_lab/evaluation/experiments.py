"""Experiments: the leave-one-out benchmark of the paper's Table 1, and ablations over its knobs.

The methods compared (zero-shot, uniform, SemLA, late fusion, oracle) live in methods.py; leave-one-out
excludes the target's own adapter from every method but the oracle. Targets are data sources
(sources.py). A config with options beyond the paper (index, fallback, text weight) adds the method
`semla+<opts>` next to `semla` (methods.py; notebook 10). Notebooks 06 and 07 present the results.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models.clip import Clip
from ..models.segmenter import class_text
from ..core.io import atomic_write_bytes, atomic_write_json
from ..core.errors import UsageError
from ..core.fusion import FUSION_TYPES
from .methods import METHODS, check_methods, is_beyond, predict_batch
from ..core.metrics import MIoU, harmonic_mean, paired_bootstrap
from ..library.predictor import LibraryModel
from ..core.retrieval import DomainIndex, RetrievalConfig
from ..core.runtime import model_device
from ..data.sources import load_target
from ..data.split import Split


@dataclass(frozen=True)
class EvalConfig(RetrievalConfig):
    """A benchmark run: the retrieval knobs (RetrievalConfig's fields, the paper's defaults) plus how the
    retrieved adapters are fused and how many test images are read, in which batches and at what size."""
    fusion: str = "cat"            # weight-level fusion of `semla`: "cat" (paper) or "linear" (peft)
    batch_size: int = 50
    max_images: int | None = None  # per target domain; None = the whole test split
    image_size: int | None = None  # resize dataset-folder and real targets to this size

    def __post_init__(self):
        super().__post_init__()
        if self.fusion not in FUSION_TYPES:
            raise UsageError(f"unknown fusion {self.fusion!r}; expected one of {FUSION_TYPES}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def retrieval(self) -> RetrievalConfig:
        """The retrieval knobs alone."""
        return RetrievalConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RetrievalConfig)})

    @property
    def paper_retrieval(self) -> RetrievalConfig:
        """The config's retrieval without the options beyond the paper (method `semla`)."""
        return RetrievalConfig(self.k, self.tau, self.metric, self.weighting)

    @property
    def extra_method(self) -> str | None:
        """The method name of SemLA with this config's options beyond the paper, None if none is on."""
        return None if self.is_paper else self.label


def config_methods(methods, cfg: EvalConfig, replace_semla: bool = False) -> list[str]:
    """`methods` checked against the registry and `cfg`, with SemLA under the config's options beyond the
    paper added next to `semla` (or in its place with `replace_semla`, as ablations do) when any is on."""
    methods = check_methods(methods)
    wrong = [m for m in methods if is_beyond(m) and m != cfg.extra_method]
    if wrong:
        raise UsageError(f"method(s) {wrong} do not match the config's options (its method: {cfg.extra_method})")
    if cfg.extra_method and "semla" in methods and cfg.extra_method not in methods:
        at = methods.index("semla")
        methods = methods[:at + (not replace_semla)] + [cfg.extra_method] + methods[at + 1:]
    return methods


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


BOOTSTRAP_PAIRS = (("semla", "uniform"), ("semla", "zero_shot"))


def bootstrap_intervals(confusions: dict[str, dict[str, torch.Tensor]], resamples: int = 1000) -> dict:
    """95% paired bootstrap intervals over test images of SemLA - uniform and SemLA - zero-shot (those
    pairs present), per domain and in h-mean. `confusions[domain][method]` is (N, C, C)."""
    out = {}
    for a, b in BOOTSTRAP_PAIRS:
        domains = [d for d, c in confusions.items() if a in c and b in c]
        if domains:
            out[f"{a} - {b}"] = paired_bootstrap({d: confusions[d][a] for d in domains},
                                                 {d: confusions[d][b] for d in domains}, resamples)
    return out


def format_intervals(bootstrap: dict) -> str:
    """Domains as rows, one column per compared pair: 'delta [low, high]'."""
    if not bootstrap:
        return ""
    cell = lambda r: f"{r['delta']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]"
    first = next(iter(bootstrap.values()))
    rows = {d: {pair: cell(b["per_domain"][d]) for pair, b in bootstrap.items()} for d in first["per_domain"]}
    rows["h-mean"] = {pair: cell(b["hmean"]) for pair, b in bootstrap.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    return (f"{100 * first['level']:.0f}% paired bootstrap intervals over test images ({first['resamples']} "
            f"resamples):\n" + table.to_string())


def summarize(per_domain: dict[str, dict[str, float]], counts: dict[str, int]) -> dict:
    """results.json body: per method, per-domain mIoU, mean, harmonic mean, image counts."""
    methods = {m for scores in per_domain.values() for m in scores}
    out = {}
    for m in [m for m in METHODS if m in methods] + sorted(methods - set(METHODS)):
        scores = {d: round(s[m], 2) for d, s in per_domain.items() if m in s}
        values = list(scores.values())
        out[m] = {"per_domain": scores, "mean": round(sum(values) / len(values), 2),
                  "hmean": round(harmonic_mean(values), 2), "num_images": {d: counts[d] for d in scores}}
    return out


def gap_closed(results: dict) -> dict[str, float]:
    """Fraction of the oracle - zero-shot h-mean gap that each method closes."""
    if "oracle" not in results or "zero_shot" not in results:
        return {}
    zs, orc = results["zero_shot"]["hmean"], results["oracle"]["hmean"]
    if orc == zs:
        return {}
    return {m: round((r["hmean"] - zs) / (orc - zs), 3) for m, r in results.items()}


def results_table(results: dict) -> pd.DataFrame:
    """Methods as rows, domains as columns, mean and h-mean last (the paper's Table 1 layout)."""
    rows = {m: {**r["per_domain"], "mean": r["mean"], "h-mean": r["hmean"]} for m, r in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def format_table(results: dict) -> str:
    """Domains as rows and methods as columns, then mean, h-mean and the share of the oracle - zero-shot
    h-mean gap each method closes (fits a 120-column terminal)."""
    table = results_table(results).T
    gaps = gap_closed(results)
    if gaps:
        table.loc["gap closed"] = pd.Series(gaps)
    with pd.option_context("display.width", 120, "display.max_columns", 20, "display.float_format", "{:.1f}".format):
        return table.to_string()


@dataclass
class TargetResult:
    """One target's benchmark outcome: mIoU per method, selection records, image count and per-image
    confusions (for the bootstrap). Small enough to come back from a Ray task."""
    name: str
    scores: dict[str, float]
    records: list[dict]
    count: int
    confusions: dict[str, torch.Tensor]


def benchmark_target(model: LibraryModel, clip: Clip, source: str, methods=METHODS,
                     cfg: EvalConfig = EvalConfig()) -> TargetResult:
    """Load one target (a data source name, see sources.py) and evaluate it leave-one-out."""
    target = load_target(source, cfg.max_images, cfg.image_size)
    confusions = {}
    scores, records = evaluate_target(model, clip, target, methods, cfg, confusions)
    return TargetResult(target.name, scores, records, len(target.images), confusions)


def benchmark_payload(outcomes: list[TargetResult], library, targets: list[str], methods=METHODS,
                      cfg: EvalConfig = EvalConfig()) -> dict:
    """results.json: per-method results, gap closed, bootstrap intervals and the run's configuration."""
    results = summarize({o.name: o.scores for o in outcomes}, {o.name: o.count for o in outcomes})
    return {"results": results, "gap_closed": gap_closed(results),
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


def run_benchmark(segmenter, clip: Clip, library, targets: list[str], methods=METHODS,
                  cfg: EvalConfig = EvalConfig(), out_dir: str | Path | None = None, device=None,
                  progress: bool = True) -> dict:
    """Leave-one-out evaluation of `methods` on `targets`, one after the other in this process (the
    pipeline runs the same steps as Ray tasks); writes results.json and selections.jsonl to `out_dir`
    when given. Returns the results dict."""
    methods = config_methods(methods, cfg)
    model = LibraryModel(segmenter, library, device)
    outcomes = [benchmark_target(model, clip, name, methods, cfg)
                for name in tqdm(targets, desc="targets", disable=not progress)]
    payload = benchmark_payload(outcomes, library, targets, methods, cfg)
    if out_dir is not None:
        write_benchmark(out_dir, payload, [r for o in outcomes for r in o.records])
    return payload


def ablation_grid(**axes) -> list[EvalConfig]:
    """Configs for every combination of the given knob values, e.g. k=[1, 3, 5], tau=[0.05, 0.2]."""
    import itertools
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


def run_ablation(segmenter, clip: Clip, library, targets: list[str], configs: list[EvalConfig],
                 methods=("semla",), out_dir: str | Path | None = None, device=None, progress=True) -> pd.DataFrame:
    """One row per (config, method): the knobs, h-mean and mean mIoU; also a tidy CSV of per-domain
    scores (`ablation_tidy.csv`) for plotting."""
    model = LibraryModel(segmenter, library, device)
    per_target = {name: ablate_target(model, clip, name, configs, methods)
                  for name in tqdm(targets, desc="ablation", disable=not progress)}
    table, tidy = ablation_tables(per_target, configs, methods)
    if out_dir is not None:
        write_ablation(out_dir, table, tidy)
    return table


def aggregate_runs(payloads: list[dict]) -> pd.DataFrame:
    """Mean and spread over runs (e.g. adapter training seeds) of each method's h-mean and mean mIoU,
    plus the number of target domains where SemLA beats uniform."""
    rows = []
    extra = sorted({m for p in payloads for m in p["results"]} - set(METHODS))
    for m in [*METHODS, *extra]:
        runs = [p["results"][m] for p in payloads if m in p["results"]]
        if not runs:
            continue
        h = torch.tensor([r["hmean"] for r in runs])
        mean = torch.tensor([r["mean"] for r in runs])
        rows.append({"method": m, "runs": len(runs), "h-mean": round(h.mean().item(), 1),
                     "h-mean std": round(h.std().item(), 1) if len(runs) > 1 else 0.0,
                     "h-mean min": round(h.min().item(), 1), "h-mean max": round(h.max().item(), 1),
                     "mean": round(mean.mean().item(), 1)})
    return pd.DataFrame(rows).set_index("method")


def semla_wins(results: dict, over: str = "uniform") -> tuple[int, int]:
    """(domains where SemLA beats `over`, domains compared)."""
    a, b = results["semla"]["per_domain"], results[over]["per_domain"]
    return sum(a[d] > b[d] for d in a), len(a)
