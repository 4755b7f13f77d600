"""The `semla-lab` command line. Every subcommand runs on the embedded default unless told otherwise.

  semla-lab world       write domains as dataset folders, print their summary, or draw a preview
  semla-lab build       rebuild the shipped artifacts: clip | segmenter | library | all
  semla-lab zero-shot   the base segmenter's mIoU on every shipped domain
  semla-lab train-adapter / build-library / add-domain   grow adapter libraries
  semla-lab evaluate    the leave-one-out benchmark (the main job)
  semla-lab ablate      a grid over retrieval and fusion knobs
  semla-lab tune        choose knobs (tau, K) on held-out selection domains, report on the others
  semla-lab transfer    every adapter alone on every target: off-domain harm, uniform merge, retrieval regret
  semla-lab summarize   mean and spread over several evaluate runs (adapter seeds)
  semla-lab analyze     domain shift of your own images against a library: report.html, images.csv, figures
  semla-lab segment     one image's mask at its own resolution, an overlay PNG with a legend, the chosen domains
  semla-lab clip-variants   retrieval with an untrained tiny CLIP and one trained without condition words
  semla-lab add-prototypes   fit prototypes, coverage radii and vocabulary embeddings into a library
  semla-lab beyond      the options beyond the paper, leave-one-out and held-out, over adapter seeds
  semla-lab scale       grow libraries from a random domain pool: h-mean against library size, random and active orders
Adapter training and target evaluation run as Ray tasks with --ray (build, build-library, add-domain,
evaluate, ablate; see engine.py).
Bad arguments, paths or files (errors.SemlaError) print one line `semla-lab: error: ...` and exit with
status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core.errors import MissingFileError, SemlaError, UsageError


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _domains(args_domains):
    from .data.world.generate import get_domain, target_domains
    return [get_domain(d) for d in (args_domains or target_domains())]


def cmd_world(args):
    from .data.datasets import write_dataset
    from .data.world.generate import generate, shipped_domains
    specs = _domains(args.domains) if args.domains else list(shipped_domains().values())
    if args.preview:
        from .evaluation.plots import sample_grid
        fig = sample_grid([generate(s, "test", args.per_domain, args.size) for s in specs], args.per_domain)
        Path(args.preview).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.preview, dpi=args.dpi)
        print(f"wrote {args.preview}")
    if args.out:
        for spec in specs:
            samples = []
            for split in args.splits:
                data = generate(spec, split, args.count, args.size)
                samples += [{"id": data.ids[i], "image": data.images[i], "label": data.labels[i], "split": split,
                             "domain": spec.name} for i in range(len(data))]
            root = write_dataset(Path(args.out) / spec.name, spec.name, spec.class_names, samples)
            print(f"wrote {len(samples)} samples of {spec.name} to {root}")
    if args.summary or not (args.out or args.preview):
        print(world_summary(specs, args.count or 64).to_string())


def world_summary(specs, count: int = 64):
    """One row per domain: dataset, real domain played, scene kinds, style, factors, classes and the
    pixel share of each class on `count` test images."""
    import pandas as pd
    import torch
    from .data.world.generate import generate
    from .data.world.spec import factor_text
    rows = []
    for spec in specs:
        data = generate(spec, "test", count)
        counts = torch.bincount(data.labels.flatten().long(), minlength=256).float()
        shares = counts[: len(spec.class_names)] / counts.sum()
        top = sorted(zip(spec.class_names, shares.tolist()), key=lambda t: -t[1])
        rows.append({"domain": spec.name, "dataset": spec.dataset, "plays": spec.plays,
                     "scene": "+".join(spec.scene), "style": spec.style,
                     "factors": ",".join(factor_text(k, v) for k, v in spec.factors.items()) or "-",
                     "classes": len(spec.class_names),
                     "pixel shares": " ".join(f"{n}:{100 * s:.0f}%" for n, s in top[:5])})
    return pd.DataFrame(rows).set_index("domain")


def _engine(args):
    """Where the command's jobs run: serially, or as Ray tasks with --ray / --ray-address (engine.py), on
    workers that import the pipeline as they start."""
    from .core.engine import Engine
    from .workflows.pipeline import WORKER_PRELOAD
    return Engine(ray=args.ray, address=args.ray_address, num_cpus=args.num_cpus, preload=WORKER_PRELOAD)


def cmd_build(args):
    """Every stage builds into a staging folder; the artifacts are replaced once all stages are done."""
    from .library import assets
    from .workflows import pipeline
    from .core.runtime import assets_dir
    from .training.train import AdapterConfig, ClipTrainConfig, SegTrainConfig
    root = Path(args.out) if args.out else assets_dir()
    q, dev = args.quick, args.device
    stages = ["clip", "segmenter", "library"] if args.stage == "all" else [args.stage]
    with assets.staging(root, seed=root) as tmp, _engine(args) as engine:
        for stage in stages:
            if stage == "clip":
                cfg = ClipTrainConfig(steps=4, batch=16, corpus=64, seed=args.seed) if q else \
                    ClipTrainConfig(seed=args.seed)
                info = pipeline.build_clip(tmp, cfg, domains=["cityscapes", "nyu"] if q else None, device=dev,
                                           progress=not args.quiet)
            elif stage == "segmenter":
                cfg = SegTrainConfig(steps=3, batch=8, seed=args.seed) if q else SegTrainConfig(seed=args.seed)
                info = pipeline.build_segmenter_asset(tmp, cfg, domains=["source", "cityscapes"] if q else None,
                                                      device=dev, progress=not args.quiet)
            else:
                cfg = AdapterConfig(steps=2, batch=8, seed=args.seed) if q else AdapterConfig(seed=args.seed)
                info = pipeline.build_library(tmp, cfg, domains=["cityscapes", "acdc_fog"] if q else None, device=dev,
                                              progress=not args.quiet, engine=engine)
            print(json.dumps({stage: info}, indent=1, default=str))
        assets.commit(tmp, root)


def cmd_zero_shot(args):
    from .library.assets import load_segmenter
    from .models.clip import load_clip
    from .evaluation.scoring import evaluate_model
    from .core.metrics import harmonic_mean
    from .data.world.generate import SOURCE_DOMAIN, generate, shipped_domains
    clip = load_clip(device=args.device)
    seg = load_segmenter(clip=clip, device=args.device)
    scores = {name: evaluate_model(seg, clip, generate(spec, "test", args.max_images))
              for name, spec in shipped_domains().items()}
    for name, s in scores.items():
        print(f"{name:18s} {s:6.1f}")
    targets = [s for n, s in scores.items() if n != SOURCE_DOMAIN]
    print(f"{'h-mean (targets)':18s} {harmonic_mean(targets):6.1f}")


def _models(args, library=None):
    """The models a command names (pipeline.Models): the shipped tiny CLIP and segmenter unless --clip,
    --pretrained, --checkpoint or --segmenter say otherwise; a library's CLIP defaults to its embedder's."""
    from .workflows.pipeline import Models, library_pretrained
    clip = args.clip or (library.embedder.get("model") if library is not None else None) or Models.clip
    pretrained = args.pretrained or (library_pretrained(library) if library is not None and not args.clip
                                     and not args.checkpoint else None)
    return Models(clip=clip, pretrained=pretrained, checkpoint=args.checkpoint, segmenter=args.segmenter,
                  library=str(library.root) if library is not None else None, device=str(args.device))


def _library(args):
    """The library of --library (default: the shipped one); an official loradb folder is imported (once) with
    the official retrieval embedder, or the CLIP that --clip, --pretrained and --checkpoint name."""
    from .library.loradb import embedder_identity, open_library
    from .core.runtime import assets_dir
    named = {"name": args.clip, "pretrained": args.pretrained, "checkpoint": args.checkpoint} if args.clip else {}
    return open_library(args.library or assets_dir() / "library", embedder_identity(**named) if named else None)


def _bundle(args):
    """Segmenter, CLIP and library for the in-process commands (transfer): the shipped ones unless paths
    are given. The CLIP must be the library's embedding model."""
    from .workflows.pipeline import library_model, load_models
    models = _models(args, _library(args))
    clip, segmenter = load_models(models)
    return segmenter, clip, library_model(models).library


def _config_fields(args, config_class) -> dict:
    """The values of a config dataclass's fields that the command's flags hold (built by `_field_flags`)."""
    from dataclasses import fields
    return {f.name: getattr(args, f.name) for f in fields(config_class)}


def _eval_config(args):
    from .evaluation.config import EvalConfig
    return EvalConfig(**_config_fields(args, EvalConfig))


def cmd_evaluate(args):
    from .evaluation.config import config_methods
    from .evaluation.outputs import format_intervals, format_table
    from .evaluation.methods import METHODS
    from .workflows.pipeline import evaluate, library_model, load_models
    from .data.world.generate import target_domains
    cfg = _eval_config(args)
    methods = config_methods(args.methods or METHODS, cfg)
    models = _models(args, _library(args))
    load_models(models), library_model(models)          # a mismatched CLIP or library fails here, before any job
    with _engine(args) as engine:
        payload = evaluate(args.targets or target_domains(), models, methods, cfg, args.out, engine,
                           progress=not args.quiet)
    print(format_table(payload["results"]))
    whole = [t for t, left_out in payload["leave_one_out"].items() if not left_out]
    if whole:
        print(f"\nnot library domains, so nothing was left out (retrieval saw the whole library): {', '.join(whole)}")
    if payload["bootstrap"]:
        print("\n" + format_intervals(payload["bootstrap"]))
    gap = payload["gap_closed"].get("semla")
    if gap is not None:
        print(f"\nSemLA closes {100 * gap:.0f}% of the zero-shot -> oracle h-mean gap (paper: 68%)")
    if args.out:
        print(f"\nwrote {Path(args.out) / 'results.json'} and selections.jsonl")


def cmd_ablate(args):
    from .evaluation.ablation import ablation_grid
    from .evaluation.config import EvalConfig
    from .workflows.pipeline import ablate, library_model, load_models
    from .data.world.generate import target_domains
    grid = ablation_grid(**_config_fields(args, EvalConfig))
    models = _models(args, _library(args))
    load_models(models), library_model(models)
    with _engine(args) as engine:
        table = ablate(args.targets or target_domains(), models, grid, args.methods, args.out, engine,
                       progress=not args.quiet)
    print(table.to_string(index=False))


def cmd_tune(args):
    from .core.io import atomic_write_json
    from .evaluation.ablation import ablation_grid
    from .evaluation.config import EvalConfig
    from .evaluation.tuning import format_tuning, held_out_tuning, selection_table
    from .data.world.generate import target_domains
    grid = ablation_grid(**_config_fields(args, EvalConfig))
    seg, clip, library = _bundle(args)
    result = held_out_tuning(seg, clip, library, args.targets or target_domains(), grid,
                             selection_images=args.selection_images, report_images=args.max_images,
                             fraction=args.fraction, seed=args.split_seed, image_size=args.image_size, device=args.device,
                             progress=not args.quiet)
    print(selection_table(result).head(10).to_string(index=False) + "\n\n" + format_tuning(result))
    if args.out:
        atomic_write_json(Path(args.out) / "tune.json", result)
        print(f"\nwrote {Path(args.out) / 'tune.json'}")


def cmd_transfer(args):
    from .evaluation.plots import transfer_heatmap
    from .evaluation.transfer import format_transfer, run_transfer, transfer_matrix
    from .data.world.generate import target_domains
    seg, clip, library = _bundle(args)
    payload = run_transfer(seg, clip, library, args.targets or target_domains(), args.split, args.max_images,
                           args.out, device=args.device, progress=not args.quiet)
    print(format_transfer(payload["summary"]))
    if args.out:
        transfer_heatmap(transfer_matrix(payload)).savefig(Path(args.out) / "transfer.png", dpi=110)
        print(f"\nwrote {Path(args.out) / 'transfer.json'} and transfer.png")


def cmd_summarize(args):
    from .evaluation.outputs import aggregate_runs, semla_wins
    payloads = []
    for run_dir in args.runs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise MissingFileError(f"no results.json in {run_dir} (write one with `semla-lab evaluate --out`)")
        payloads.append(json.loads(path.read_text()))
    print(aggregate_runs(payloads).to_string())
    wins = [semla_wins(p["results"]) for p in payloads if {"semla", "uniform"} <= set(p["results"])]
    if wins:
        print("SemLA > uniform on " + ", ".join(f"{w}/{n}" for w, n in wins) + " target domains")


def cmd_clip_variants(args):
    import tempfile
    from dataclasses import replace
    from .library.assets import load_segmenter
    from .models.clip import load_clip
    from .workflows.clip_variants import run_clip_variants
    from .core.io import atomic_write_json
    from .library.index import AdapterLibrary
    from .core.runtime import assets_dir
    from .training.train import ClipTrainConfig
    transfer_path = Path(args.transfer) if args.transfer else assets_dir() / "benchmark" / "transfer.json"
    if not transfer_path.is_file():
        raise MissingFileError(f"no transfer diagnostic at {transfer_path} (write one with `semla-lab transfer --out`)")
    cfg = replace(ClipTrainConfig(), **{k: v for k, v in (("steps", args.clip_steps), ("corpus", args.corpus)) if v})
    clip = load_clip(device=args.device)
    library = AdapterLibrary(assets_dir() / "library")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_clip_variants(load_segmenter(clip=clip, device=args.device), clip, library,
                                   json.loads(transfer_path.read_text()), args.targets, args.variants, cfg,
                                   args.max_images, args.weights or tmp, args.device, progress=not args.quiet)
    for name, v in result["variants"].items():
        print(f"{name:14s} nearest-centroid accuracy {v['nearest_centroid_accuracy']:.3f}  proxy regret "
              f"{v['proxy_regret']:5.2f}  SemLA h-mean {v['semla_hmean']:5.2f}")
    if args.out:
        atomic_write_json(Path(args.out), result)
        print(f"wrote {args.out}")


def _adapter_config(args, **fixed):
    """The shipped adapter recipe (train.AdapterConfig; on a CAT-Seg base, "catseg:FILE", the official SemLA one,
    train.CATSEG_RECIPE) with the command's --rank, --steps, --strength and --seed on top."""
    from dataclasses import replace
    from .models.segmenter_catseg import catseg_path
    from .training.train import CATSEG_RECIPE, AdapterConfig
    recipe = CATSEG_RECIPE if catseg_path(getattr(args, "segmenter", None)) else AdapterConfig()
    over = {**({"seed": args.seed} if args.seed is not None else {}), **({"steps": args.steps} if args.steps else {})}
    if getattr(args, "rank", None):
        over.update(r=args.rank, lora_alpha=2 * args.rank)
    if getattr(args, "strength", None) is not None:
        over["strength"] = args.strength
    return replace(recipe, **over, **fixed)


def cmd_train_adapter(args):
    from .library.assets import base_model_id, load_segmenter
    from .models.clip import embed_class_names, load_clip
    from .workflows.pipeline import source_replay
    from .data.sources import load_split
    from .training.train import train_adapter
    clip = load_clip(device=args.device)
    data = load_split(args.domain, "train")
    cfg = _adapter_config(args)
    info = train_adapter(load_segmenter(clip=clip, device=args.device), embed_class_names(clip, data.class_names),
                         data.images, data.labels, args.out, base_model_id(), cfg, args.device,
                         progress=not args.quiet, replay=source_replay(clip) if cfg.replay else None)
    print(json.dumps(info, indent=1))


def _replay_source(args, sources):
    """What adapters replay: --replay-source, else the base-training source of the data (the mini world's
    source domain, or COCO-Stuff for real data)."""
    from .data.world.generate import SOURCE_DOMAIN
    if args.replay_source:
        return args.replay_source
    return "real:coco_stuff" if any(s.startswith("real:") for s in sources) else SOURCE_DOMAIN


def _grow(args, sources, out):
    """build-library and add-domain: train one adapter per source into the library at `out` (pipeline.add_domains)."""
    from .workflows.pipeline import add_domains
    cfg = _adapter_config(args)
    with _engine(args) as engine:
        return add_domains(sources, out, _models(args), cfg, engine,
                           replay_source=_replay_source(args, sources) if cfg.replay else None,
                           max_images=args.max_images, image_size=args.image_size, progress=not args.quiet)


def cmd_build_library(args):
    """A library for the named CLIP and segmenter (default: the shipped ones) at --out; rerunning the
    command on an interrupted build resumes it."""
    from .data.world.generate import target_domains
    sources = args.domains or target_domains()
    built = _grow(args, sources, Path(args.out))
    skipped = f" (kept {len(built['skipped'])} already there)" if built["skipped"] else ""
    print(f"wrote library of {len(sources)} domains to {args.out}{skipped}")


def cmd_add_domain(args):
    from .library.index import AdapterLibrary
    built = _grow(args, args.domains, Path(args.library))
    for name in built["skipped"]:
        print(f"{name} is already in {args.library}; left as is")
    print(f"added {', '.join(built['added']) or 'nothing'} to {args.library} ({len(AdapterLibrary(args.library))} domains)")


# ---- your own images: analyze and segment ----------------------------------------------------------------

def _own_images_predictor(args):
    from .library.predictor import SemLAPredictor
    from .core.retrieval import RetrievalConfig
    seg, clip, library = _bundle(args)
    return SemLAPredictor(seg, clip, library, RetrievalConfig(**_config_fields(args, RetrievalConfig)),
                          device=args.device, batch_size=args.batch_size)


def cmd_analyze(args):
    from .workflows.analyze import analyze_images
    from .evaluation.report_html import write_report
    from .data.user_images import find_files
    find_files(args.paths, args.out)          # a missing path or an empty selection: say so before loading models
    predictor = _own_images_predictor(args)
    analysis = analyze_images(args.paths, predictor, args.classes, args.labels, args.exclude, args.max_images,
                              sample=args.sample, ignore=args.out, progress=not args.quiet)
    written = write_report(analysis, predictor.library, args.out)
    print("\n".join(analysis.summary()))
    print(f"wrote {written['report']}, {written['csv']} and {len(list(written['figures'].glob('*.png')))} figures "
          f"in {written['figures']}")


def cmd_segment(args):
    import io
    from PIL import Image
    from .core.io import atomic_write_bytes
    from .data.datasets import read_image
    from .evaluation.plots import overlay_with_legend
    if len(args.classes) > 255:
        raise UsageError(f"at most 255 classes fit an 8-bit mask, got {len(args.classes)}")
    image = read_image(args.image)
    predictor = _own_images_predictor(args)
    predictor.set_image(image, exclude=args.exclude)
    mask = predictor.predict(args.classes)
    h, w = mask.shape
    for path, pixels in ((args.out, overlay_with_legend(image, mask, args.classes)),
                         (args.mask, mask.numpy().astype("uint8"))):
        if path:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            atomic_write_bytes(Path(path), buffer.getvalue())
    print(f"wrote {args.out}: {w}x{h} overlay of the {w}x{h} mask" + (f"; class ids in {args.mask}" if args.mask else ""))
    if args.explain:
        for name, distance, weight in predictor.explain():
            print(f"  {name:20s} distance {distance:.3f}  weight {weight:.3f}")


def cmd_add_prototypes(args):
    """Regenerate each domain's training split, embed it with the library's CLIP, and store its profile."""
    from .models.clip import check_embedder, load_clip
    from .library.index import AdapterLibrary
    from .workflows.pipeline import fit_domain_profiles
    library = AdapterLibrary(args.library)
    emb = library.embedder
    clip = load_clip(args.clip or emb.get("model", "semla-tiny-clip"), pretrained=args.pretrained,
                     checkpoint=args.checkpoint, device=args.device)
    check_embedder(clip, emb, f"library {library.root}")
    fitted = fit_domain_profiles(library, clip, args.index, args.domains, args.quantile, progress=not args.quiet)
    for name, prof in fitted.items():
        radii = ", ".join(f"{k} {v:.3f}" for k, v in prof.coverage.items())
        print(f"{name:18s} {prof.num_images} images; coverage radius: {radii}")
    print(f"stored profiles of {len(fitted)} domains in {library.root}")


def _variant(text: str) -> dict:
    """'index=kmeans:4,fallback=coverage,fallback_strength=2' -> EvalConfig fields."""
    fields = {"index": str, "fallback": str, "fallback_strength": float, "text_weight": float}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in fields or not value:
            raise UsageError(f"bad variant part {part!r}; use comma-separated key=value with keys {list(fields)}")
        try:
            out[key] = fields[key](value)
        except ValueError:
            raise UsageError(f"bad value in variant part {part!r}") from None
    return out


def cmd_beyond(args):
    """Every variant leave-one-out and on the held-out domains, for each library (adapter seed)."""
    from .library.assets import load_segmenter
    from .evaluation.retrieval_options import beyond_table, study
    from .models.clip import load_clip
    from .evaluation.config import EvalConfig
    from .library.index import AdapterLibrary
    from .core.manifests import manifests_dir
    from .data.world.generate import target_domains
    variants = {}
    for text in args.variant:
        cfg = EvalConfig(**_variant(text))
        if cfg.extra_method is None:
            raise UsageError(f"variant {text!r} turns no option beyond the paper on")
        variants[cfg.extra_method] = cfg
    libraries = {str(i): AdapterLibrary(path) for i, path in enumerate(args.libraries)}
    heldout = args.heldout if args.heldout is not None else sorted(str(p) for p in
                                                                   (manifests_dir() / "heldout").glob("*.yaml"))
    clip = load_clip(device=args.device)
    payload = study(load_segmenter(clip=clip, device=args.device), clip, libraries, args.targets or target_domains(),
                    heldout, variants, args.max_images, args.out, device=args.device, progress=not args.quiet)
    for split in ("loo", "heldout"):
        table = beyond_table(payload, split).round(1).T.to_string()
        print(f"\n{split} (mean over {len(libraries)} libraries):\n{table}")
    if args.out:
        print(f"\nwrote {args.out}")

def cmd_scale(args):
    """The library-scaling study (scaling.run_scale) in --out; reruns reuse what is there."""
    from dataclasses import replace
    from .evaluation.config import EvalConfig
    from .evaluation.plots import scaling_curves
    from .workflows.scaling import ScaleConfig, run_scale, scaling_table
    cfg = ScaleConfig(sizes=tuple(args.sizes), pool_size=args.pool_size or max(args.sizes), pool_seed=args.pool_seed,
                      random_orders=args.orders, active=not args.no_active, oracle=not args.no_oracle,
                      query_images=args.query_images)
    adapter = _adapter_config(args)
    eval_cfg = replace(EvalConfig(), max_images=args.max_images, k=args.k)
    payload = run_scale(args.out, cfg, args.targets, adapter, eval_cfg, _engine(args), device=args.device,
                        progress=not args.quiet)
    table = scaling_table(payload)
    curves = table.pivot_table(index="size", columns=["method", "kind"], values="hmean", aggfunc="mean")
    print(curves.round(1).to_string())
    scaling_curves(table, payload["oracle"]["hmean"] if payload["oracle"] else None).savefig(
        Path(args.out) / "scaling.png", dpi=110)
    t = payload["timing"]
    print(f"\n{t['adapters_trained']} adapters trained, {t['evaluations_run']} evaluations, {t['total_wall_s']:.0f} s "
          f"({t['engine']}); wrote {Path(args.out) / 'scaling.json'} and scaling.png")


# ---- the parser: each option group is defined once and shared through argparse's `parents=` --------------

FIELD_HELP = {      # the flags generated from RetrievalConfig and EvalConfig fields; defaults come from the fields
    "k": "adapters retrieved and fused per image",
    "tau": "softmax temperature of the fusion weights softmax((1/d)/tau)",
    "metric": "distance to the centroids: euclidean (paper) or cosine",
    "weighting": "fusion weights: softmax (paper) or uniform over the top K",
    "index": "domain index: centroid (paper), kmeans:P or gmm:P (needs `add-prototypes`)",
    "fallback": "none (paper) or coverage: the base model as a null adapter outside coverage",
    "fallback_strength": "beta of the coverage fallback: w_k * exp(-beta * max(0, d_k / r_k - 1))",
    "text_weight": "lambda in [0, 1]: share of the class-name text distance (0 = paper)",
    "fusion": "weight-level fusion: cat (paper) or linear (peft)",
    "batch_size": "test images per batch",
    "max_images": "test images per target (default: all)",
    "image_size": "resize dataset-folder and real targets to this size",
}
TYPES = {"int": int, "float": float, "str": str}


def _field_flags(q, fields, grid: bool = False, **grid_defaults) -> None:
    """One flag per dataclass field (`--fallback-strength` for fallback_strength), typed and defaulted by the
    field; with `grid`, comma-separated values (ablate, tune), default: `grid_defaults`, else the field's
    default alone."""
    for f in fields:
        kind = TYPES[str(f.type).split(" |")[0]]
        default = grid_defaults.get(f.name, [f.default]) if grid else f.default
        shown = "" if f.default is None or f.name == "max_images" else \
            f" (default: {','.join(map(str, default)) if grid else default})"
        q.add_argument("--" + f.name.replace("_", "-"), type=_csv(kind) if grid else kind, default=default,
                       help=FIELD_HELP[f.name] + shown)


def _group(*adders) -> argparse.ArgumentParser:
    """An option group for `parents=`: each adder adds its flags to it."""
    q = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(q)
    return q


def _clip_flags(q):
    q.add_argument("--clip", help="open_clip model name (default: the library's embedding model, else the shipped "
                                  "tiny CLIP)")
    q.add_argument("--pretrained", help="open_clip pretrained tag, e.g. openai")
    q.add_argument("--checkpoint", help="local CLIP weights (.safetensors, or a weights-only torch file)")


def _segmenter_flag(q):
    q.add_argument("--segmenter", help="base segmenter weights (default: the shipped one)")


def _library_flag(q):
    q.add_argument("--library", help="adapter library folder (default: the shipped one)")


def _ray_flags(q):
    q.add_argument("--ray", action="store_true", help="run every adapter training / target evaluation as a Ray task "
                                                      "(a cluster of its own on 127.0.0.1 unless --ray-address)")
    q.add_argument("--ray-address", help="join a running Ray cluster: auto (the one `ray start` last started on this "
                                         "machine) or the address `ray start --head` printed, with RAY_AUTH_MODE=token; "
                                         "127.0.0.1:PORT only for a head started with --node-ip-address 127.0.0.1 "
                                         "(default: $RAY_ADDRESS); implies --ray")
    q.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")


def cmd_convert_catseg(args):
    """Check a CAT-Seg checkpoint strictly and write its weights as one safetensors file (no pickle)."""
    from .models.catseg import load_catseg, save_catseg_safetensors
    model = load_catseg(args.checkpoint)
    save_catseg_safetensors(model, args.out)
    print(f"CAT-Seg ({model.cfg.variant}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
          f"-> {args.out}")


def _training_flags(q):
    q.add_argument("--steps", type=int, help="adapter training steps (default: the shipped recipe's)")
    q.add_argument("--strength", type=float, help="share of the trained update each adapter keeps (default: the "
                                                  "shipped recipe's, 0.9)")
    q.add_argument("--seed", type=int, help="adapter training seed (default: the recipe's: 0, 250 on CAT-Seg)")


def _rank_flag(q):
    q.add_argument("--rank", type=int, help="LoRA rank r, with alpha = 2r (default: the shipped recipe's)")


def _growing_flags(q):
    q.add_argument("--image-size", type=int, help="resize dataset-folder and real images to this size")
    q.add_argument("--max-images", type=int, help="training images per domain (default: all)")
    q.add_argument("--replay-source", help="what adapters replay (default: source, or real:coco_stuff for real "
                                           "domains)")


def _targets_flag(q):
    q.add_argument("--targets", nargs="*", help="target domains: shipped domains, spec files, dataset folders or "
                                                "real:<domain> (default: every shipped target domain)")


def _common_flags(q):
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--threads", type=int, help="torch threads (default: $SEMLA_THREADS or 1)")
    q.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: $SEMLA_DEVICE, else CUDA if available)")


def _own_images_options(q):
    q.add_argument("--exclude", type=_csv(str), default=[], help="library domains retrieval may not use (a,b)")
    q.add_argument("--batch-size", type=int, default=32, help="images per embedding / segmentation batch")


def build_parser() -> argparse.ArgumentParser:
    from dataclasses import fields
    from .core.retrieval import RetrievalConfig
    from .evaluation.config import EvalConfig
    retrieval_fields = fields(RetrievalConfig)
    fusion = [f for f in fields(EvalConfig) if f.name == "fusion"]
    run_fields = [f for f in fields(EvalConfig) if f.name in ("batch_size", "max_images", "image_size")]

    common = _group(_common_flags)
    models = _group(_library_flag, _clip_flags, _segmenter_flag)
    ray = _group(_ray_flags)
    training = _group(_training_flags)
    rank = _group(_rank_flag)
    growing = _group(_clip_flags, _segmenter_flag, _growing_flags)
    targets = _group(_targets_flag)
    retrieval = _group(lambda q: _field_flags(q, retrieval_fields))
    evaluation = _group(lambda q: _field_flags(q, [*retrieval_fields, *fusion, *run_fields]))

    def grid(**defaults):
        return _group(lambda q: _field_flags(q, [*retrieval_fields, *fusion], grid=True, **defaults),
                      lambda q: _field_flags(q, run_fields))

    p = argparse.ArgumentParser(prog="semla-lab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, *parents):
        q = sub.add_parser(name, help=help, parents=[*parents, common])
        q.set_defaults(func=func)
        return q

    w = command("world", cmd_world, "write, summarise or preview mini-world domains")
    w.add_argument("domains", nargs="*", help="shipped domain names or spec .yaml files (default: all)")
    w.add_argument("--out", help="write each domain as a dataset folder under this directory")
    w.add_argument("--splits", type=_csv(str), default=["train", "test"])
    w.add_argument("--count", type=int, help="samples per split (default: the spec's split sizes)")
    w.add_argument("--size", type=int, help="image size in pixels (default: the spec's, 64)")
    w.add_argument("--preview", help="write a PNG grid of samples with label overlays")
    w.add_argument("--per-domain", type=int, default=3)
    w.add_argument("--dpi", type=int, default=110)
    w.add_argument("--summary", action="store_true", help="print the domain summary table")

    b = command("build", cmd_build, "rebuild the shipped artifacts", ray)
    b.add_argument("stage", choices=["clip", "segmenter", "library", "all"])
    b.add_argument("--out", help="artifact folder (default: the package's assets/)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true", help="a few steps only (CI smoke test of the recipe)")

    z = command("zero-shot", cmd_zero_shot, "base segmenter mIoU on every shipped domain")
    z.add_argument("--max-images", type=int, help="test images per domain (default: all)")

    e = command("evaluate", cmd_evaluate, "leave-one-out benchmark (zero-shot, uniform, SemLA, late, oracle)",
                models, targets, evaluation, ray)
    e.add_argument("--methods", nargs="*", help="subset of the methods (default: all six)")
    e.add_argument("--out", help="output folder")

    a = command("ablate", cmd_ablate, "grid over retrieval/fusion knobs, comma-separated values", models, targets,
                grid(), ray)
    a.add_argument("--methods", nargs="*", default=["semla"])
    a.add_argument("--out", help="output folder")

    tu = command("tune", cmd_tune, "choose knobs on held-out selection domains (val split), report on the rest "
                 "(test)", models, targets, grid(k=[1, 3, 5, 10], tau=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]))
    tu.add_argument("--selection-images", type=int, default=50, help="val images per selection domain")
    tu.add_argument("--fraction", type=float, default=0.5, help="share of each scene kind used for selection")
    tu.add_argument("--split-seed", type=int, default=0, help="seed of the selection / report split")
    tu.add_argument("--out", help="output folder")

    tr = command("transfer", cmd_transfer, "every adapter alone on every target: harm, uniform merge, retrieval "
                 "regret", models, targets)
    tr.add_argument("--split", default="test", choices=["val", "test"], help="mini-world split (val: for tuning)")
    tr.add_argument("--max-images", type=int, help="images per target (default: every test image; 50 val images)")
    tr.add_argument("--out", help="output folder")

    sm = command("summarize", cmd_summarize, "mean and spread of several evaluate runs (e.g. adapter seeds)")
    sm.add_argument("runs", nargs="+", help="output folders of `semla-lab evaluate`")

    an = command("analyze", cmd_analyze, "domain shift of your own images: report.html, images.csv, figures",
                 models, retrieval)
    an.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or globs ('shots/*.jpg')")
    an.add_argument("--out", required=True, help="output folder (report.html, images.csv, figures/)")
    an.add_argument("--classes", type=_csv(str), help="class names, e.g. road,car,sky: also segment a sample")
    an.add_argument("--labels", help="folder of label masks named like the images (ids into --classes, 255 ignore)")
    an.add_argument("--max-images", type=int, help="analyse at most this many images")
    an.add_argument("--sample", type=int, default=4, help="images whose masks the report shows (with --classes)")
    _own_images_options(an)

    sg = command("segment", cmd_segment, "one image: mask at its resolution, overlay PNG with a legend", models,
                 retrieval)
    sg.add_argument("image")
    sg.add_argument("--classes", type=_csv(str), required=True, help="class names, e.g. road,car,sky")
    sg.add_argument("--out", required=True, help="overlay PNG to write (the image's size)")
    sg.add_argument("--mask", help="also write the class-id mask as an 8-bit PNG")
    sg.add_argument("--explain", action="store_true", help="print the chosen domains with distances and weights")
    _own_images_options(sg)

    cv = command("clip-variants", cmd_clip_variants, "retrieval with an untrained tiny CLIP and one trained on "
                 "captions without condition words, against the shipped one", targets)
    cv.add_argument("--out", help="result JSON file (the shipped one: semla_lab/assets/benchmark/clip_variants.json)")
    cv.add_argument("--variants", nargs="*", default=["shipped", "untrained", "no_conditions"])
    cv.add_argument("--max-images", type=int, help="test images per target (default: all)")
    cv.add_argument("--weights", help="folder that keeps trained variants (reused when their recipe matches)")
    cv.add_argument("--transfer", help="transfer.json with every adapter alone on every target (default: shipped)")
    cv.add_argument("--clip-steps", type=int, help="CLIP training steps (default: the shipped recipe's)")
    cv.add_argument("--corpus", type=int, help="image/caption pairs (default: the shipped recipe's)")

    t = command("train-adapter", cmd_train_adapter, "train one LoRA adapter on a domain (peft folder)", training, rank)
    t.add_argument("--domain", required=True, help="shipped domain name or spec .yaml file")
    t.add_argument("--out", required=True)

    bl = command("build-library", cmd_build_library, "train adapters for domains into a library folder (resumes "
                 "one)", growing, training, rank, ray)
    bl.add_argument("--out", required=True)
    bl.add_argument("--domains", nargs="*", help="shipped domains, spec files, dataset folders or real:<domain> "
                                                 "(default: every shipped target domain)")

    ad = command("add-domain", cmd_add_domain, "train adapters for new domains and add them to a library "
                 "(with its LoRA shape)", growing, training, ray)
    ad.add_argument("--library", required=True, help="adapter library folder")
    ad.add_argument("--domains", "--domain", dest="domains", required=True, nargs="+",
                    help="shipped domains, spec files, dataset folders or real:<domain>")

    pr = command("add-prototypes", cmd_add_prototypes, "fit prototypes, coverage radii and vocabulary embeddings of "
                 "a library's domains from their training data (mini-world domains are regenerated)",
                 _group(_clip_flags))
    pr.add_argument("--library", required=True, help="adapter library folder")
    pr.add_argument("--index", type=_csv(str), default=["kmeans:4", "gmm:4"], help="kinds, e.g. kmeans:4,gmm:4")
    pr.add_argument("--domains", nargs="*", help="default: every library domain")
    pr.add_argument("--quantile", type=float, default=0.95, help="coverage radius quantile of own-image distances")

    bb = command("beyond", cmd_beyond, "variants beyond the paper, leave-one-out and held-out, over adapter seeds",
                 targets)
    bb.add_argument("--libraries", nargs="+", required=True, help="one library per adapter seed")
    bb.add_argument("--variant", action="append", required=True,
                    help="options of one variant, e.g. index=kmeans:4,fallback=coverage,fallback_strength=2 (repeat)")
    bb.add_argument("--heldout", nargs="*", help="held-out targets (default: data_manifests/heldout/*.yaml)")
    bb.add_argument("--max-images", type=int, help="test images per target (default: all)")
    bb.add_argument("--out", help="write the JSON here (e.g. semla_lab/assets/benchmark/beyond.json)")

    sc = command("scale", cmd_scale, "grow libraries from a random domain pool; h-mean against library size",
                 training, rank, ray, _group(lambda q: _field_flags(q, [f for f in retrieval_fields if f.name == "k"])))
    sc.add_argument("--out", required=True, help="study folder (created; a rerun reuses its adapters and results)")
    sc.add_argument("--sizes", type=_csv(int), default=[5, 10, 20, 40, 80],
                    help="library sizes (default: 5,10,20,40,80)")
    sc.add_argument("--pool-size", type=int, help="domains in the pool (default: the largest size)")
    sc.add_argument("--pool-seed", type=int, default=0)
    sc.add_argument("--orders", type=int, default=3, help="random orders, seeds 0..n-1 (default: 3)")
    sc.add_argument("--no-active", action="store_true", help="skip active growth by target coverage")
    sc.add_argument("--no-oracle", action="store_true", help="skip training the targets' own adapters")
    sc.add_argument("--targets", nargs="*", help="target domains: mini-world domains or spec files (default: "
                                                 "data_manifests/heldout)")
    sc.add_argument("--max-images", type=int, default=100, help="test images per target (default: 100)")
    sc.add_argument("--query-images", type=int, default=50,
                    help="unlabelled training images per target that active growth sees (default: 50)")

    cc = command("convert-catseg", cmd_convert_catseg, "check a CAT-Seg checkpoint (detectron2 model_final.pth) "
                 "and write its weights as safetensors")
    cc.add_argument("checkpoint", help="model_final.pth (read without running any code) or a .safetensors file")
    cc.add_argument("--out", required=True, help="the .safetensors file to write")
    return p


def command_device(args):
    """The device a command runs on; one this machine lacks is an error before any work. With Ray, a CUDA device
    is the workers' (a job asks Ray for a GPU; the driver loads its models on the CPU: pipeline.placement), so a
    head without a GPU may name one."""
    import torch
    from .core.runtime import resolve_device
    on_ray = getattr(args, "ray", False) or getattr(args, "ray_address", None)
    if on_ray and str(args.device or "").startswith("cuda"):
        return torch.device(args.device)
    return resolve_device(args.device)


def main(argv: list[str] | None = None) -> int:
    from .core.runtime import configure_threads
    args = build_parser().parse_args(argv)
    try:
        args.device = command_device(args)
        configure_threads(args.threads)
        args.func(args)
    except SemlaError as e:
        print(f"semla-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
