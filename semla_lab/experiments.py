"""Experiments: the leave-one-out benchmark of the paper's Table 1, and ablations over its knobs.

Methods (leave-one-out: the target's own adapter is excluded from every method but the oracle):
  zero_shot      the base segmenter, no adapter
  oracle         the target domain's own adapter
  uniform        all other adapters merged with equal weights (cat)
  semla          per-image top-K retrieval, softmax(1/d / tau) weights, weight-level fusion
  semla_late     the same adapters and weights, mixing output probabilities instead
  uniform_late   all other adapters, equal weights, output-level
  semla+<opts>   SemLA with the options beyond the paper that the config turns on (index kmeans:P / gmm:P,
                 coverage fallback, text weight; retrieval.py), e.g. semla+kmeans:4+coverage1+text0.3;
                 added next to `semla` when any option is on (notebook 10)
Notebooks 06 and 07 present the results.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .clip import Clip, embed_class_names, embed_images
from .data import atomic_write_bytes, atomic_write_json
from .errors import UnknownNameError, UsageError
from .metrics import MIoU, harmonic_mean, paired_bootstrap
from .predictor import LibraryModel
from .retrieval import DomainIndex, RetrievalConfig
from .runtime import model_device

METHODS = ("zero_shot", "uniform", "semla", "semla_late", "uniform_late", "oracle")
FUSIONS = ("cat", "linear")


@dataclass(frozen=True)
class EvalConfig:
    """Every retrieval / fusion knob of the benchmark, with the paper's defaults."""
    k: int = 5
    tau: float = 0.05
    metric: str = "euclidean"     # or "cosine"
    weighting: str = "softmax"    # or "uniform" over the top-K
    fusion: str = "cat"           # weight-level fusion of `semla`: "cat" (paper) or "linear" (peft)
    batch_size: int = 50
    max_images: int | None = None  # per target domain; None = the whole test split
    image_size: int | None = None  # resize dataset-folder and real targets to this size
    index: str = "centroid"        # beyond the paper (retrieval.py): "kmeans:P" / "gmm:P" prototypes,
    fallback: str = "none"         # "coverage": the base model as a null adapter outside coverage,
    fallback_strength: float = 1.0  # its beta,
    text_weight: float = 0.0       # lambda of text-aware retrieval

    def __post_init__(self):
        self.retrieval   # validates
        if self.fusion not in FUSIONS:
            raise UsageError(f"unknown fusion {self.fusion!r}; expected one of {FUSIONS}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def retrieval(self) -> RetrievalConfig:
        return RetrievalConfig(self.k, self.tau, self.metric, self.weighting, self.index, self.fallback,
                               self.fallback_strength, self.text_weight)

    @property
    def paper_retrieval(self) -> RetrievalConfig:
        """The config's retrieval without the options beyond the paper (method `semla`)."""
        return RetrievalConfig(self.k, self.tau, self.metric, self.weighting)

    @property
    def extra_method(self) -> str | None:
        """The method name of SemLA with this config's options beyond the paper, None if none is on."""
        return None if self.retrieval.is_paper else self.retrieval.label


def check_methods(methods, cfg: EvalConfig) -> None:
    """UsageError naming methods that are neither in METHODS nor the config's extra method."""
    unknown = set(methods) - set(METHODS) - {cfg.extra_method}
    if unknown:
        raise UsageError(f"unknown method(s) {sorted(unknown)}; expected some of {list(METHODS)}")


@dataclass
class Target:
    """Test images of one target domain: uint8 images (N, 3, H, W), labels (N, H, W), class names."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    ids: list[str]
    scene: dict[str, float] = dataclasses.field(default_factory=dict)   # scene kind mixture, where known


def load_target(target: str, max_images: int | None = None, image_size: int | None = None,
                split: str = "test") -> Target:
    """A shipped domain name, a domain spec file (.yaml), a dataset folder with a manifest.json, or
    "real:<domain>" for a real dataset described in data_manifests/real/. Dataset and real images
    are resized to `image_size` when given. `split` picks a mini-world domain's split (the held-out
    "val" split serves tuning, "test" reporting)."""
    from .world.generate import generate, get_domain
    path = Path(target)
    if target.startswith("real:"):
        from .real_data import RealDataset, real_domains
        domain = target.removeprefix("real:")
        if domain not in real_domains():
            raise UnknownNameError(f"unknown real domain {domain!r}; known: {', '.join(real_domains())}")
        ds = RealDataset(real_domains()[domain][0], split="val", domain=domain, max_samples=max_images)
        return stack_items(domain, (ds[i] for i in range(len(ds))), ds.classes, image_size)
    if path.is_dir():
        from .data import SegmentationDataset
        ds = SegmentationDataset(path, split="test") if _has_split(path, "test") else SegmentationDataset(path)
        items = [ds[i] for i in range(min(len(ds), max_images or len(ds)))]
        return stack_items(ds.name, items, ds.classes, image_size)
    spec = get_domain(target)
    count = max_images if max_images is not None else spec.splits.get("test", 0)
    data = generate(spec, split, count, image_size)
    if len(data) == 0:
        raise UsageError(f"target domain {spec.name!r} has no {split} images (splits: {spec.splits})")
    return Target(spec.name, data.images, data.labels, spec.class_names, data.ids, dict(spec.scene))


def _has_split(path: Path, split: str) -> bool:
    from .data import read_manifest
    return any(s.get("split") == split for s in read_manifest(path)["samples"])


def stack_items(name: str, items, classes, size: int | None = None) -> Target:
    """Dataset items (see data.py) as one Target, resized to size x size when given (bilinear images,
    nearest labels) so that images of several sizes stack."""
    import torch.nn.functional as F
    images, labels, ids = [], [], []
    for it in items:
        img, lab = it["image"][None], it["label"][None, None].float()
        if size is not None:
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            lab = F.interpolate(lab, size=(size, size), mode="nearest")
        images.append((img[0].clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(lab[0, 0].long())
        ids.append(it["id"])
    if not images:
        raise UsageError(f"target {name!r} has no images")
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) != 1:
        raise UsageError(f"target {name!r} mixes image sizes {sorted(sizes)[:3]}; pass an image size to resize")
    return Target(name, torch.stack(images), torch.stack(labels), list(classes), ids)


@torch.no_grad()
def evaluate_model(model, clip: Clip, data, batch_size: int = 64) -> float:
    """mIoU (0-100) of a segmenter (no adaptation) on a DomainSplit or Target, with its own class names,
    computed on the model's device."""
    device = model_device(model)
    text = embed_class_names(clip, data.class_names).to(device)
    meter = MIoU(len(data.class_names))
    for start in range(0, len(data.images), batch_size):
        x = data.images[start:start + batch_size].to(device).float().div(255)
        meter.update(model(x, text).argmax(1).cpu(), data.labels[start:start + batch_size].long())
    return meter.compute()["miou"]


def evaluate_target(engine: LibraryModel, clip: Clip, target: Target, methods=METHODS,
                    cfg: EvalConfig = EvalConfig(), image_confusions: dict | None = None
                    ) -> tuple[dict[str, float], list[dict]]:
    """mIoU per method on one target domain, and one selection record per image. With `image_confusions`
    (a dict), also fills it with each method's per-image confusion matrices (N, C, C) for the bootstrap."""
    names = engine.names
    in_library = target.name in names
    exclude = [target.name] if in_library else []
    others = torch.tensor([i for i, n in enumerate(names) if n not in exclude])
    normalize = engine.library.embedder.get("normalize", True)
    text = embed_class_names(clip, target.class_names)
    meters = {m: MIoU(len(target.class_names), per_image=image_confusions is not None)
              for m in methods if m != "oracle" or in_library}
    records = []
    index = DomainIndex.from_library(engine.library, names)
    extra = cfg.extra_method if cfg.extra_method in meters else None
    for start in range(0, len(target.images), cfg.batch_size):
        x = target.images[start:start + cfg.batch_size].float().div(255)
        y = target.labels[start:start + cfg.batch_size].long()
        n = len(x)
        t0 = time.perf_counter()
        emb = embed_images(clip, x, normalize=normalize)
        t1 = time.perf_counter()
        ret = index.search(emb, cfg.paper_retrieval, exclude=exclude)
        t2 = time.perf_counter()
        beyond = index.search(emb, cfg.retrieval, exclude, class_text=text) if extra else None
        all_idx = others.expand(n, -1)
        all_w = torch.full(all_idx.shape, 1.0 / len(others))
        timings = {}
        for m in meters:
            ts = time.perf_counter()
            if m == "zero_shot":
                out = engine.logits(x, text)
            elif m == "oracle":
                out = engine.logits(x, text, torch.full((n, 1), names.index(target.name)), torch.ones(n, 1))
            elif m == "uniform":
                out = engine.logits(x, text, all_idx, all_w)
            elif m == "semla":
                out = engine.logits(x, text, ret.indices, ret.weights, cfg.fusion)
            elif m == "semla_late":
                out = engine.late_logits(x, text, ret.indices, ret.weights)
            elif m == "uniform_late":
                out = engine.late_logits(x, text, all_idx, all_w)
            elif m == extra:
                out = engine.logits(x, text, beyond.indices, beyond.weights, cfg.fusion)
            else:
                raise UsageError(f"unknown method {m!r}; expected some of {METHODS}")
            meters[m].update(out.argmax(1).cpu(), y)
            timings[m] = time.perf_counter() - ts
        for i in range(n):
            records.append({
                "image_id": target.ids[start + i], "target": target.name,
                "distances": {d: round(float(v), 5) for d, v in zip(names, ret.distances[i])},
                "chosen": [names[j] for j in ret.indices[i].tolist()],
                "weights": [round(float(w), 5) for w in ret.weights[i]],
                **({extra: {"chosen": [names[j] for j in beyond.indices[i].tolist()],
                            "weights": [round(float(w), 5) for w in beyond.weights[i]]}} if extra else {}),
                "ms": {"embed": 1000 * (t1 - t0) / n, "retrieve": 1000 * (t2 - t1) / n,
                       **{f"predict_{m}": 1000 * t / n for m, t in timings.items()}},
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


def run_benchmark(segmenter, clip: Clip, library, targets: list[str], methods=METHODS,
                  cfg: EvalConfig = EvalConfig(), out_dir: str | Path | None = None, device=None,
                  progress: bool = True) -> dict:
    """Leave-one-out evaluation of `methods` on `targets`; writes results.json and selections.jsonl
    to `out_dir` when given. Returns the results dict."""
    check_methods(methods, cfg)
    if cfg.extra_method and "semla" in methods and cfg.extra_method not in methods:
        methods = [*methods, cfg.extra_method]
    engine = LibraryModel(segmenter, library, device)
    per_domain, counts, records, confusions = {}, {}, [], {}
    for name in tqdm(targets, desc="targets", disable=not progress):
        target = load_target(name, cfg.max_images, cfg.image_size)
        confusions[target.name] = {}
        per_domain[target.name], recs = evaluate_target(engine, clip, target, methods, cfg, confusions[target.name])
        counts[target.name] = len(target.images)
        records += recs
    results = summarize(per_domain, counts)
    payload = {"results": results, "gap_closed": gap_closed(results), "bootstrap": bootstrap_intervals(confusions),
               "config": {**asdict(cfg), "methods": list(methods), "targets": targets,
                          "library": {"root": Path(library.root).name, "domains": library.names(),
                                      "embedder": library.embedder, "base_model": library.base_model}}}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", payload)
        atomic_write_bytes(out / "selections.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
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


def run_ablation(segmenter, clip: Clip, library, targets: list[str], configs: list[EvalConfig],
                 methods=("semla",), out_dir: str | Path | None = None, device=None, progress=True) -> pd.DataFrame:
    """One row per (config, method): the knobs, h-mean and mean mIoU; also a tidy CSV of per-domain
    scores (`ablation_tidy.csv`) for plotting."""
    rows, tidy = [], []
    engine = LibraryModel(segmenter, library, device)
    loaded = {}
    for cfg in tqdm(configs, desc="ablation", disable=not progress):
        per_domain = {}
        run = [cfg.extra_method if m == "semla" and cfg.extra_method else m for m in methods]   # semla: with options
        for name in targets:
            key = (name, cfg.max_images, cfg.image_size)
            loaded.setdefault(key, load_target(name, cfg.max_images, cfg.image_size))
            per_domain[name], _ = evaluate_target(engine, clip, loaded[key], run, cfg)
        knobs = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "max_images", "image_size")}
        for m in run:
            scores = [per_domain[d][m] for d in targets if m in per_domain[d]]
            rows.append({**knobs, "method": m, "hmean": round(harmonic_mean(scores), 2),
                         "mean": round(sum(scores) / len(scores), 2)})
            tidy += [{**knobs, "method": m, "domain": d, "miou": round(per_domain[d][m], 2)}
                     for d in targets if m in per_domain[d]]
    table = pd.DataFrame(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "ablation.csv", table.to_csv(index=False).encode())
        atomic_write_bytes(out / "ablation_tidy.csv", pd.DataFrame(tidy).to_csv(index=False).encode())
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
