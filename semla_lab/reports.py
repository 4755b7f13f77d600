"""Reading and analysing benchmark outputs, growing libraries, and the real-data path (notebooks 07-09).

Benchmark outputs (written by `semla-lab evaluate --out` / experiments.run_benchmark):
  load_benchmark -> (results.json payload, selections.jsonl records); paper_comparison, per_domain_deltas,
  failure_cases; borrow_matrix (target x library domain: mean fusion weight), top_borrowed, retrieval_stats.
Live evaluation (leave-one-out optional): method_predictions, per_image_miou, evaluate_in_library.
Library growth: adapter_fingerprints, fingerprint_changes, write_spec, add_tensors_domain.
Real data: try_load_clip, real_data_status, missing_data_message, write_real_layout,
real_tensors, lora_targets, real_pipeline (the whole recipe on real datasets with any CLIP).
Notebooks: quiet_known_warnings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import MissingFileError, UnknownNameError, UsageError
from .metrics import MIoU

# Table 1 of the paper (20 domains, CAT-Seg ViT-B/16): harmonic mean of per-domain mIoU.
PAPER_HMEAN = {"zero_shot": 39.4, "uniform": 51.9, "semla": 54.2, "oracle": 61.1}


# ---- benchmark outputs ----------------------------------------------------------------------------

def read_selections(path: str | Path) -> list[dict]:
    """selections.jsonl -> one dict per test image (image_id, target, distances, chosen, weights, ms)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_benchmark(folder: str | Path) -> tuple[dict, list[dict]]:
    """The results.json payload and the selections.jsonl records of a benchmark folder."""
    folder = Path(folder)
    if not (folder / "results.json").is_file():
        raise MissingFileError(f"no results.json in {folder}; produce it with "
                                f"`semla-lab evaluate --out {folder.name}` (several minutes on a CPU)")
    payload = json.loads((folder / "results.json").read_text())
    sel = folder / "selections.jsonl"
    return payload, (read_selections(sel) if sel.is_file() else [])


def _results(payload_or_results: dict) -> dict:
    return payload_or_results.get("results", payload_or_results)


def paper_comparison(payload_or_results: dict) -> pd.DataFrame:
    """Per method: our h-mean and gap closed next to the paper's (NaN where the paper has none)."""
    from .experiments import gap_closed
    results = _results(payload_or_results)
    gaps = gap_closed(results)
    zs, orc = PAPER_HMEAN["zero_shot"], PAPER_HMEAN["oracle"]
    rows = {m: {"h-mean": r["hmean"], "h-mean (paper)": PAPER_HMEAN.get(m, np.nan),
                "gap closed": gaps.get(m, np.nan),
                "gap closed (paper)": (PAPER_HMEAN[m] - zs) / (orc - zs) if m in PAPER_HMEAN else np.nan}
            for m, r in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def per_domain_deltas(payload_or_results: dict, method: str = "semla") -> pd.DataFrame:
    """One row per domain: every method's mIoU, then `method` minus zero-shot and minus uniform, and
    oracle minus `method` (what is left), sorted by the gain over uniform (worst first)."""
    results = _results(payload_or_results)
    table = pd.DataFrame({m: r["per_domain"] for m, r in results.items()})
    out = table.copy()
    for base in ("zero_shot", "uniform"):
        if base in table and base != method:
            out[f"{method} - {base}"] = table[method] - table[base]
    if "oracle" in table:
        out[f"oracle - {method}"] = table["oracle"] - table[method]
    key = f"{method} - uniform" if f"{method} - uniform" in out else method
    return out.sort_values(key)


def failure_cases(payload_or_results: dict, method: str = "semla", baselines: Sequence[str] = ("uniform", "zero_shot"),
                  margin: float = 0.0) -> pd.DataFrame:
    """Domains where `method` scores below a baseline by more than `margin` mIoU points: the scores, the
    largest shortfall and which baselines beat it, worst first (empty frame if there is none)."""
    results = _results(payload_or_results)
    baselines = [b for b in baselines if b in results and b != method]
    rows = {}
    for d, score in results[method]["per_domain"].items():
        beaten_by = [b for b in baselines if results[b]["per_domain"].get(d, -np.inf) > score + margin]
        if beaten_by:
            short = max(results[b]["per_domain"][d] - score for b in beaten_by)
            rows[d] = {method: score, **{b: results[b]["per_domain"][d] for b in baselines},
                       "shortfall": round(short, 2), "beaten by": ", ".join(beaten_by)}
    cols = [method, *baselines, "shortfall", "beaten by"]
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols).sort_values("shortfall", ascending=False)


def borrow_matrix(records: Iterable[dict], sources: Sequence[str] | None = None,
                  targets: Sequence[str] | None = None) -> pd.DataFrame:
    """Target x library domain: the mean fusion weight each target's images gave each library domain
    (0 when never retrieved). Rows sum to 1. Sources default to the library order of the records."""
    records = list(records)
    if not records:
        raise UsageError("borrow_matrix needs at least one selection record")
    sources = list(sources or records[0]["distances"])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for r in records:
        row = sums.setdefault(r["target"], np.zeros(len(sources)))
        for name, w in zip(r["chosen"], r["weights"]):
            row[sources.index(name)] += w
        counts[r["target"]] = counts.get(r["target"], 0) + 1
    targets = list(targets or sums)
    return pd.DataFrame([sums[t] / counts[t] for t in targets], index=pd.Index(targets, name="target"),
                        columns=pd.Index(sources, name="library domain"))


def top_borrowed(matrix: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """The `n` library domains each target leans on most, as 'name (weight)' strings."""
    rows = {t: [f"{s} ({w:.2f})" for s, w in row.sort_values(ascending=False).head(n).items() if w > 0]
            for t, row in matrix.iterrows()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"#{i + 1}" for i in range(n)])


def retrieval_stats(records: Iterable[dict]) -> pd.DataFrame:
    """Per target: mean distance to its own centroid (when the library holds it) and to the nearest
    retrieved one, mean top-1 weight, effective number of adapters 1/sum(w^2), and the most frequent
    top-1 domain with its share of images."""
    by_target: dict[str, list[dict]] = {}
    for r in records:
        by_target.setdefault(r["target"], []).append(r)
    rows = {}
    for t, recs in by_target.items():
        top1 = pd.Series([r["chosen"][0] for r in recs]).value_counts()
        w = [np.asarray(r["weights"]) for r in recs]
        rows[t] = {"d own": np.mean([r["distances"][t] for r in recs]) if t in recs[0]["distances"] else np.nan,
                   "d top-1": np.mean([r["distances"][r["chosen"][0]] for r in recs]),
                   "w top-1": np.mean([x[0] for x in w]),
                   "effective K": np.mean([1.0 / (x ** 2).sum() for x in w]),
                   "usual top-1": top1.index[0], "share": top1.iloc[0] / len(recs), "images": len(recs)}
    return pd.DataFrame.from_dict(rows, orient="index")


def records_from_retrieval(retrieval, target: str, ids: Sequence[str] | None = None) -> list[dict]:
    """selections.jsonl-style records for a retrieval.Retrieval of Q queries (for borrow_matrix etc.)."""
    q = retrieval.indices.shape[0]
    ids = list(ids) if ids is not None else [f"{target}/{i}" for i in range(q)]
    return [{"image_id": ids[i], "target": target,
             "distances": {n: float(d) for n, d in zip(retrieval.names, retrieval.distances[i])},
             "chosen": [retrieval.names[j] for j in retrieval.indices[i].tolist()],
             "weights": [float(w) for w in retrieval.weights[i]]} for i in range(q)]


# ---- live evaluation with the whole library (no leave-one-out) ----------------------------------

@torch.no_grad()
def method_predictions(engine, clip, images: torch.Tensor, class_names: Sequence[str],
                       methods: Sequence[str] = ("zero_shot", "uniform", "semla", "oracle"), cfg=None,
                       own: str | None = None, exclude: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], object]:
    """Predicted masks (N, H, W) per method for uint8 images (N, 3, H, W), and the SemLA Retrieval.
    Retrieval and the uniform merge use every library domain but `exclude` (pass the target's name for
    leave-one-out); "oracle" uses the domain `own` and is skipped when it is None or not in the library."""
    from .clip import embed_class_names, embed_images
    from .experiments import EvalConfig
    from .retrieval import retrieve
    cfg = cfg or EvalConfig()
    names = engine.names
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    text = embed_class_names(clip, list(class_names))
    emb = embed_images(clip, x, normalize=engine.library.embedder.get("normalize", True))
    ret = retrieve(emb, engine.library.centroids(names), names, cfg.retrieval, exclude=list(exclude))
    n = len(x)
    others = torch.tensor([i for i, d in enumerate(names) if d not in exclude]).expand(n, -1)
    out = {}
    for m in methods:
        if m == "zero_shot":
            logits = engine.logits(x, text)
        elif m == "uniform":
            logits = engine.logits(x, text, others, torch.full(others.shape, 1.0 / others.shape[1]))
        elif m == "semla":
            logits = engine.logits(x, text, ret.indices, ret.weights, cfg.fusion)
        elif m == "semla_late":
            logits = engine.late_logits(x, text, ret.indices, ret.weights)
        elif m == "oracle":
            if own is None or own not in names:
                continue
            logits = engine.logits(x, text, torch.full((n, 1), names.index(own)), torch.ones(n, 1))
        else:
            raise UsageError(f"unknown method {m!r}")
        out[m] = logits.argmax(1).cpu()
    return out, ret


def per_image_miou(predictions: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> pd.DataFrame:
    """Images x methods: the mIoU (0-100) of every predicted mask (N, H, W) against labels (N, H, W)."""
    rows = []
    for i in range(len(labels)):
        row = {}
        for m, masks in predictions.items():
            meter = MIoU(num_classes)
            meter.update(masks[i], labels[i].long())
            row[m] = meter.compute()["miou"]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(predictions))


def evaluate_in_library(engine, clip, target, methods: Sequence[str] = ("zero_shot", "semla", "oracle"),
                        cfg=None, exclude: Sequence[str] = ()) -> tuple[dict[str, float], list[dict]]:
    """mIoU per method on an experiments.Target with retrieval over the whole library (the target's own
    adapter included when present: deployment after adding a domain), plus selection records."""
    from .experiments import EvalConfig
    cfg = cfg or EvalConfig()
    meters: dict[str, MIoU] = {}
    records: list[dict] = []
    for start in range(0, len(target.images), cfg.batch_size):
        sl = slice(start, start + cfg.batch_size)
        preds, ret = method_predictions(engine, clip, target.images[sl], target.class_names, methods, cfg,
                                        own=target.name, exclude=exclude)
        for m, p in preds.items():
            meters.setdefault(m, MIoU(len(target.class_names))).update(p, target.labels[sl].long())
        records += records_from_retrieval(ret, target.name, target.ids[sl])
    return {m: meter.compute()["miou"] for m, meter in meters.items()}, records


# ---- growing a library ----------------------------------------------------------------------------

def adapter_fingerprints(library) -> pd.DataFrame:
    """Per domain of an AdapterLibrary: sha256 (first 12 hex digits) of its adapter weights, their
    modification time (ns) and size. Compare before/after a write with fingerprint_changes."""
    from .library import WEIGHTS
    rows = {}
    for name in library.names():
        path = library.adapter_path(name) / WEIGHTS
        st = path.stat()
        rows[name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12], "mtime_ns": st.st_mtime_ns,
                      "bytes": st.st_size}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["sha256", "mtime_ns", "bytes"])


def fingerprint_changes(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, list[str]]:
    """Which domains were added, removed, changed (hash or mtime) or left untouched between two
    adapter_fingerprints tables."""
    common = [n for n in before.index if n in after.index]
    changed = [n for n in common if (before.loc[n, ["sha256", "mtime_ns"]] != after.loc[n, ["sha256", "mtime_ns"]]).any()]
    return {"added": [n for n in after.index if n not in before.index],
            "removed": [n for n in before.index if n not in after.index],
            "changed": changed, "unchanged": [n for n in common if n not in changed]}


def write_spec(spec, path: str | Path) -> Path:
    """Write a DomainSpec as a YAML spec file (vocabulary inline), loadable by world.generate.get_domain
    and usable as a benchmark target (`semla-lab evaluate --targets path.yaml`)."""
    import yaml
    from .world.spec import to_dict
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(spec), sort_keys=False))
    return path


def add_tensors_domain(library, name: str, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                       segmenter, clip, cfg=None, metadata: dict | None = None, device=None, progress: bool = False,
                       replay=None) -> dict:
    """assets.add_domain for data that is not a mini-world spec (e.g. a real dataset): train an adapter
    on uint8 images (N, 3, H, W) and labels (N, H, W), and add it with its centroid to `library`.
    `replay` (train.Replay: source images the adapter keeps seeing) is used when the recipe asks for it;
    without it the default recipe replays nothing."""
    from .clip import embed_class_names, embed_images
    from .train import AdapterConfig, train_adapter
    lora = library.lora_config
    cfg = cfg or AdapterConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"],
                               **({} if replay is not None else {"replay": 0}))
    text = embed_class_names(clip, list(class_names))
    with tempfile.TemporaryDirectory() as tmp:
        info = train_adapter(segmenter, text, images, labels, tmp, library.base_model, cfg, device, progress, replay)
        centroid = embed_images(clip, images, normalize=library.embedder["normalize"]).mean(0)
        library.add(name, tmp, centroid, num_images=len(images), metadata=metadata or {})
    return info


# ---- the real-data path ---------------------------------------------------------------------------

def try_load_clip(name: str, pretrained: str | None = None, checkpoint: str | Path | None = None,
                  offline: bool = True, device=None):
    """(Clip, "loaded ...") when the weights are available (offline: local cache or checkpoint only),
    else (None, the ClipLoadError message telling what to do). open_clip's own log lines are muted."""
    from .clip import ClipLoadError, load_clip, muted_open_clip_logs
    try:
        with muted_open_clip_logs():
            clip = load_clip(name, pretrained=pretrained, checkpoint=checkpoint, device=device, offline=offline)
    except ClipLoadError as e:
        return None, str(e)
    return clip, f"loaded {name} ({clip.pretrained}): image size {clip.image_size}, embedding dim {clip.embed_dim}"


def _display_path(path: Path) -> str:
    """A path relative to the working folder when it lies inside it (stable notebook output)."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def real_data_status(datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per real dataset (default: the 10 of the benchmark): its domains, the env var of its
    root, the folder looked in (relative to the working folder when inside it) and whether it exists."""
    from .real_data import TARGET_DATASETS, dataset_root, load_real_spec
    rows = {}
    for name in datasets or TARGET_DATASETS:
        spec = load_real_spec(name)
        root = dataset_root(spec)
        rows[name] = {"domains": ", ".join(spec.domains), "classes": len(spec.classes), "env var": spec.root_env,
                      "looked in": _display_path(root), "present": root.is_dir()}
    return pd.DataFrame.from_dict(rows, orient="index")


def missing_data_message(dataset: str, domain: str | None = None, split: str = "val") -> str | None:
    """The MissingDataError message a user sees when `dataset` is absent (None when it loads), with the
    working folder shown as '.'."""
    from .real_data import MissingDataError, RealDataset
    try:
        RealDataset(dataset, split=split, domain=domain, max_samples=1)
    except MissingDataError as e:
        return str(e).replace(str(Path.cwd().absolute()), ".")
    return None


def _raw_ids(spec) -> tuple[dict[int, int], int]:
    """class id -> a raw label id that converts to it, and a raw id that converts to ignore."""
    from .data import IGNORE_INDEX
    n = len(spec.classes)
    if spec.conversion == "identity":
        return {c: c for c in range(n)}, IGNORE_INDEX
    if spec.conversion == "minus_one":
        return {c: c + 1 for c in range(n)}, 0
    inverse: dict[int, int] = {}
    for raw, cls in spec.id_map.items():
        if cls != IGNORE_INDEX:
            inverse.setdefault(cls, raw)
    ignore = next(i for i in range(256) if spec.id_map.get(i, IGNORE_INDEX) == IGNORE_INDEX)
    return inverse, ignore


def write_real_layout(dataset: str, root: str | Path, images: torch.Tensor, labels: torch.Tensor,
                      class_names: Sequence[str], split: str = "val", domain: str | None = None,
                      prefix: str = "mini") -> list[tuple[str, str]]:
    """Write uint8 images (N, 3, H, W) and labels (N, H, W) (ids into `class_names`, 255 = ignore) under
    `root` in the official layout of a real dataset (data_manifests/real/<dataset>.yaml): file names
    from its glob and pairing regex, label ids in its raw encoding, classes matched by name (names
    the dataset lacks become ignore). Returns the (image, label) paths relative to `root`."""
    from PIL import Image
    from .data import IGNORE_INDEX
    from .real_data import load_real_spec
    spec = load_real_spec(dataset)
    domain = domain or next(iter(spec.domains))
    raw_of, ignore_raw = _raw_ids(spec)
    lut = np.full(256, ignore_raw, dtype=np.int64)
    for i, cname in enumerate(class_names):
        if cname in spec.classes:
            lut[i] = raw_of[spec.classes.index(cname)]
    root = Path(root)
    written = []
    for i in range(len(images)):
        parts = spec.patterns(split, domain)[0].split("*")
        if len(parts) < 2:
            raise UsageError(f"{dataset}: its glob {spec.globs[0]!r} has no '*' to name files after")
        listed = "".join(p + (f"{prefix}_{i:06d}" if j == len(parts) - 2 else prefix)
                         for j, p in enumerate(parts[:-1])) + parts[-1]
        other = spec.partner(listed)
        image_rel, label_rel = (other, listed) if spec.from_labels else (listed, other)
        raw = lut[labels[i].numpy().astype(np.int64)]
        raw[labels[i].numpy() == IGNORE_INDEX] = ignore_raw
        for rel in (image_rel, label_rel):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / image_rel, quality=95)
        Image.fromarray(raw.astype(np.uint8) if raw.max() < 256 else raw.astype(np.uint16)).save(root / label_rel)
        written.append((image_rel, label_rel))
    return written


def real_tensors(dataset: str, split: str = "train", domain: str | None = None, size: int | None = None,
                 max_samples: int | None = None, root: str | Path | None = None):
    """A real dataset split as an experiments.Target (uint8 images, labels, class names, ids), resized
    to size x size when given (bilinear images, nearest labels) so that images of any size stack."""
    from .experiments import stack_items
    from .real_data import RealDataset
    ds = RealDataset(dataset, split=split, domain=domain, root=root, max_samples=max_samples)
    return stack_items(domain or ds.domain or dataset, (ds[i] for i in range(len(ds))), ds.classes, size)


def lora_targets(model: torch.nn.Module, pattern: str | None = None, r: int = 8) -> pd.DataFrame:
    """The nn.Linear modules a peft LoRA with regex `pattern` (default segmenter.LORA_TARGETS) would
    adapt: in/out features and the LoRA parameters r * (in + out) each."""
    from .lora import lora_targets as target_modules
    from .segmenter import LORA_TARGETS
    rows = [{"module": n, "in": m.in_features, "out": m.out_features, "lora params": r * (m.in_features + m.out_features)}
            for n, m in target_modules(model, pattern or LORA_TARGETS).items()]
    return pd.DataFrame(rows, columns=["module", "in", "out", "lora params"])


def real_pipeline(clip, targets: Sequence[str], out_dir: str | Path, source: str = "coco_stuff",
                  size: int | None = None, segmenter=None, seg_cfg=None, adapter_cfg=None, eval_cfg=None,
                  methods: Sequence[str] | None = None, max_source: int | None = None, max_train: int | None = None,
                  max_test: int | None = None, device=None, progress: bool = True) -> dict:
    """The SemLA recipe on real datasets with any CLIP (e.g. ViT-B/16 on a GPU):
    1. train a base segmenter around `clip` on the `source` train split (skipped when `segmenter` is given),
    2. train one adapter per target domain (real_data.real_domains() names) on its train split into a library,
    3. run the leave-one-out benchmark on the targets' val splits.
    Images are resized to size x size (default: the CLIP input size) so that any dataset stacks; max_*
    cap the images per split (everything is held in memory as uint8). Writes out_dir/segmenter.safetensors,
    out_dir/library/ and out_dir/benchmark/{results.json, selections.jsonl}; returns the results payload."""
    from safetensors.torch import save_file
    from .assets import file_digest
    from .data import atomic_write_bytes, atomic_write_json
    from .experiments import METHODS, EvalConfig, evaluate_target, gap_closed, summarize
    from .library import AdapterLibrary
    from .predictor import LibraryModel
    from .real_data import real_domains
    from .segmenter import build_segmenter
    from .clip import embed_class_names
    from .train import AdapterConfig, Replay, SegTrainConfig, train_base_segmenter
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = size or clip.image_size
    domains = real_domains()
    unknown = [t for t in targets if t not in domains]
    if unknown:
        raise UnknownNameError(f"unknown real domain(s) {unknown}; known: {', '.join(domains)}")
    cfg = adapter_cfg or AdapterConfig()
    src = None
    if segmenter is None or cfg.replay:
        from .real_data import MissingDataError
        try:
            src = real_tensors(source, "train", size=size, max_samples=max_source)
        except MissingDataError as e:
            why = "" if segmenter is None else (f" (adapters replay {cfg.replay} source images per step; "
                                                "AdapterConfig(replay=0) trains without them)")
            raise MissingDataError(f"{e}{why}") from None
    if segmenter is None:
        segmenter = build_segmenter(clip.model)
        train_base_segmenter(segmenter, clip, src.images, src.labels, [[c] for c in src.class_names],
                             seg_cfg or SegTrainConfig(), device, progress)
    save_file({k: v.detach().cpu().contiguous() for k, v in segmenter.state_dict().items()},
              str(out / "segmenter.safetensors"))
    base = f"{clip.name}-segmenter@{file_digest(out / 'segmenter.safetensors')}"
    replay = Replay(src.images, src.labels, embed_class_names(clip, src.class_names)) if cfg.replay else None
    library = AdapterLibrary.create(out / "library", embedder=clip.identity(True), base_model=base,
                                    lora={"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": cfg.target_modules})
    for name in targets:
        dataset, domain = domains[name]
        train = real_tensors(dataset, "train", domain, size, max_train)
        add_tensors_domain(library, name, train.images, train.labels, train.class_names, segmenter, clip, cfg,
                           metadata={"dataset": dataset, "size": size}, device=device, progress=progress,
                           replay=replay)
    eval_cfg = eval_cfg or EvalConfig()
    methods = list(methods or METHODS)
    engine = LibraryModel(segmenter, library, device)
    per_domain, counts, records = {}, {}, []
    for name in targets:
        target = real_tensors(domains[name][0], "val", domains[name][1], size, max_test)
        target.name = name
        per_domain[name], recs = evaluate_target(engine, clip, target, methods, eval_cfg)
        counts[name] = len(target.images)
        records += recs
    results = summarize(per_domain, counts)
    payload = {"results": results, "gap_closed": gap_closed(results),
               "config": {"clip": clip.identity(True), "source": source, "size": size, "targets": list(targets),
                          "methods": methods, "k": eval_cfg.k, "tau": eval_cfg.tau, "base_model": base}}
    atomic_write_json(out / "benchmark" / "results.json", payload)
    atomic_write_bytes(out / "benchmark" / "selections.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    return payload


def quiet_known_warnings() -> None:
    """Silence two known, harmless messages in notebooks: open_clip's log line when an architecture is
    built without pretrained weights (on purpose here), and peft's note that it replaced the adapter
    config's base model name (the library records the base model itself)."""
    import warnings
    warnings.filterwarnings("ignore", message=r"The PEFT config's `base_model_name_or_path` was renamed")
    root = logging.getLogger()
    if not any(isinstance(f, _KnownMessages) for f in root.filters):
        root.addFilter(_KnownMessages())


class _KnownMessages(logging.Filter):
    MESSAGES = ("No pretrained weights loaded for model",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in record.getMessage() for m in self.MESSAGES)
