"""The `semla-lab` command line. Every subcommand runs on the embedded default unless told otherwise.

  semla-lab world       write domains as dataset folders, print their summary, or draw a preview
  semla-lab build       rebuild the shipped artifacts: clip | segmenter | library | all
  semla-lab zero-shot   the base segmenter's mIoU on every shipped domain
  semla-lab train-adapter / build-library / add-domain   grow adapter libraries
  semla-lab evaluate    the leave-one-out benchmark (the main job)
  semla-lab ablate      a grid over retrieval and fusion knobs
Adapter training and target evaluation run as Ray tasks with --ray (build, build-library, add-domain,
evaluate, ablate; see engine.py).
  semla-lab transfer    every adapter alone on every target: off-domain harm, uniform merge, retrieval regret
  semla-lab summarize   mean and spread over several evaluate runs (adapter seeds)
  semla-lab scale       grow libraries from a random domain pool: h-mean against library size, random and active orders
Bad arguments, paths or files (errors.SemlaError) print one line `semla-lab: error: ...` and exit with
status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import MissingFileError, SemlaError


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _domains(args_domains):
    from .world.generate import get_domain, target_domains
    return [get_domain(d) for d in (args_domains or target_domains())]


def cmd_world(args):
    import torch
    from .data import write_dataset
    from .world.generate import generate, shipped_domains
    specs = _domains(args.domains) if args.domains else list(shipped_domains().values())
    if args.preview:
        from .plots import sample_grid
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
    from .world.generate import generate
    rows = []
    for spec in specs:
        data = generate(spec, "test", count)
        counts = torch.bincount(data.labels.flatten().long(), minlength=256).float()
        shares = counts[: len(spec.class_names)] / counts.sum()
        top = sorted(zip(spec.class_names, shares.tolist()), key=lambda t: -t[1])
        rows.append({"domain": spec.name, "dataset": spec.dataset, "plays": spec.plays,
                     "scene": "+".join(spec.scene), "style": spec.style,
                     "factors": ",".join(f"{k}={v:g}" for k, v in spec.factors.items()) or "-",
                     "classes": len(spec.class_names),
                     "pixel shares": " ".join(f"{n}:{100 * s:.0f}%" for n, s in top[:5])})
    return pd.DataFrame(rows).set_index("domain")


def _engine(args):
    """Where the command's jobs run: serially, or as Ray tasks with --ray / --ray-address (engine.py)."""
    from .engine import Engine
    return Engine(ray=args.ray, address=args.ray_address, num_cpus=args.num_cpus)


def cmd_build(args):
    """Every stage builds into a staging folder; the artifacts are replaced once all stages are done."""
    from . import assets, pipeline
    from .runtime import assets_dir
    from .train import AdapterConfig, ClipTrainConfig, SegTrainConfig
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
    from .assets import load_segmenter
    from .clip import load_clip
    from .experiments import evaluate_model
    from .metrics import harmonic_mean
    from .world.generate import SOURCE_DOMAIN, generate, shipped_domains
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
    from .pipeline import Models
    clip = args.clip or (library.embedder.get("model") if library is not None else None) or Models.clip
    return Models(clip=clip, pretrained=args.pretrained, checkpoint=args.checkpoint, segmenter=args.segmenter,
                  library=str(library.root) if library is not None else None, device=str(args.device))


def _library(args):
    from .library import AdapterLibrary
    from .runtime import assets_dir
    return AdapterLibrary(args.library or assets_dir() / "library")


def _bundle(args):
    """Segmenter, CLIP and library for the in-process commands (transfer): the shipped ones unless paths
    are given. The CLIP must be the library's embedding model."""
    from .pipeline import library_model, load_models
    models = _models(args, _library(args))
    clip, segmenter = load_models(models)
    return segmenter, clip, library_model(models).library


def _eval_config(args, **over):
    from .experiments import EvalConfig
    return EvalConfig(**{"k": args.k, "tau": args.tau, "metric": args.metric, "weighting": args.weighting,
                         "fusion": args.fusion, "batch_size": args.batch_size, "max_images": args.max_images,
                         "image_size": args.image_size, **over})


def cmd_evaluate(args):
    from .experiments import format_intervals, format_table
    from .methods import METHODS, check_methods
    from .pipeline import evaluate, library_model, load_models
    from .world.generate import target_domains
    cfg, methods = _eval_config(args), check_methods(args.methods or METHODS)
    models = _models(args, _library(args))
    load_models(models), library_model(models)          # a mismatched CLIP or library fails here, before any job
    with _engine(args) as engine:
        payload = evaluate(args.targets or target_domains(), models, methods, cfg, args.out, engine,
                           progress=not args.quiet)
    print(format_table(payload["results"]))
    if payload["bootstrap"]:
        print("\n" + format_intervals(payload["bootstrap"]))
    gap = payload["gap_closed"].get("semla")
    if gap is not None:
        print(f"\nSemLA closes {100 * gap:.0f}% of the zero-shot -> oracle h-mean gap (paper: 68%)")
    if args.out:
        print(f"\nwrote {Path(args.out) / 'results.json'} and selections.jsonl")


def cmd_ablate(args):
    from .experiments import ablation_grid
    from .pipeline import ablate, library_model, load_models
    from .world.generate import target_domains
    grid = ablation_grid(k=args.k, tau=args.tau, metric=args.metric, weighting=args.weighting, fusion=args.fusion,
                         max_images=[args.max_images], batch_size=[args.batch_size], image_size=[args.image_size])
    models = _models(args, _library(args))
    load_models(models), library_model(models)
    with _engine(args) as engine:
        table = ablate(args.targets or target_domains(), models, grid, args.methods, args.out, engine,
                       progress=not args.quiet)
    print(table.to_string(index=False))


def cmd_transfer(args):
    from .plots import transfer_heatmap
    from .transfer import format_transfer, run_transfer, transfer_matrix
    from .world.generate import target_domains
    seg, clip, library = _bundle(args)
    payload = run_transfer(seg, clip, library, args.targets or target_domains(), args.split, args.max_images,
                           args.out, device=args.device, progress=not args.quiet)
    print(format_transfer(payload["summary"]))
    if args.out:
        transfer_heatmap(transfer_matrix(payload)).savefig(Path(args.out) / "transfer.png", dpi=110)
        print(f"\nwrote {Path(args.out) / 'transfer.json'} and transfer.png")


def cmd_summarize(args):
    from .experiments import aggregate_runs, semla_wins
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


def _adapter_config(args, **fixed):
    """The shipped adapter recipe (train.AdapterConfig) with the command's --rank, --steps and --seed on top."""
    from dataclasses import replace
    from .train import AdapterConfig
    over = {"seed": args.seed, **({"steps": args.steps} if args.steps else {})}
    if getattr(args, "rank", None):
        over.update(r=args.rank, lora_alpha=2 * args.rank)
    return replace(AdapterConfig(), **over, **fixed)


def cmd_train_adapter(args):
    from .assets import base_model_id, load_segmenter
    from .clip import embed_class_names, load_clip
    from .pipeline import source_replay
    from .sources import load_split
    from .train import train_adapter
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
    from .world.generate import SOURCE_DOMAIN
    if args.replay_source:
        return args.replay_source
    return "real:coco_stuff" if any(s.startswith("real:") for s in sources) else SOURCE_DOMAIN


def _grow(args, sources, out):
    """build-library and add-domain: train one adapter per source into the library at `out` (pipeline.add_domains)."""
    from .pipeline import add_domains
    cfg = _adapter_config(args)
    with _engine(args) as engine:
        return add_domains(sources, out, _models(args), cfg, engine,
                           replay_source=_replay_source(args, sources) if cfg.replay else None,
                           max_images=args.max_images, image_size=args.image_size, progress=not args.quiet)


def cmd_build_library(args):
    """A library for the named CLIP and segmenter (default: the shipped ones) at --out; rerunning the
    command on an interrupted build resumes it."""
    from .world.generate import target_domains
    sources = args.domains or target_domains()
    built = _grow(args, sources, Path(args.out))
    skipped = f" (kept {len(built['skipped'])} already there)" if built["skipped"] else ""
    print(f"wrote library of {len(sources)} domains to {args.out}{skipped}")


def cmd_add_domain(args):
    from .library import AdapterLibrary
    built = _grow(args, args.domain, Path(args.library))
    for name in built["skipped"]:
        print(f"{name} is already in {args.library}; left as is")
    print(f"added {', '.join(built['added']) or 'nothing'} to {args.library} ({len(AdapterLibrary(args.library))} domains)")


def cmd_scale(args):
    """The library-scaling study (scaling.run_scale) in --out; reruns reuse what is there."""
    from dataclasses import replace
    from .experiments import EvalConfig
    from .plots import scaling_curves
    from .scaling import ScaleConfig, run_scale, scaling_table
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semla-lab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="write, summarise or preview mini-world domains")
    w.add_argument("domains", nargs="*", help="shipped domain names or spec .yaml files (default: all)")
    w.add_argument("--out", help="write each domain as a dataset folder under this directory")
    w.add_argument("--splits", type=_csv(str), default=["train", "test"])
    w.add_argument("--count", type=int, help="samples per split (default: the spec's split sizes)")
    w.add_argument("--size", type=int, help="image size in pixels (default: the spec's, 64)")
    w.add_argument("--preview", help="write a PNG grid of samples with label overlays")
    w.add_argument("--per-domain", type=int, default=3)
    w.add_argument("--dpi", type=int, default=110)
    w.add_argument("--summary", action="store_true", help="print the domain summary table")
    w.set_defaults(func=cmd_world)

    b = sub.add_parser("build", help="rebuild the shipped artifacts")
    b.add_argument("stage", choices=["clip", "segmenter", "library", "all"])
    b.add_argument("--out", help="artifact folder (default: the package's assets/)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true", help="a few steps only (CI smoke test of the recipe)")
    b.set_defaults(func=cmd_build)

    z = sub.add_parser("zero-shot", help="base segmenter mIoU on every shipped domain")
    z.add_argument("--max-images", type=int)
    z.set_defaults(func=cmd_zero_shot)

    def knobs(q, multi: bool):
        many = (lambda kind: _csv(kind)) if multi else (lambda kind: kind)
        q.add_argument("--library", help="adapter library folder (default: the shipped one)")
        q.add_argument("--clip", help="open_clip model name (default: the library's embedding model)")
        q.add_argument("--pretrained", help="open_clip pretrained tag, e.g. openai")
        q.add_argument("--checkpoint", help="local CLIP weights (.safetensors, or a weights-only torch file)")
        q.add_argument("--segmenter", help="base segmenter weights (default: the shipped one)")
        q.add_argument("--image-size", type=int, help="resize dataset-folder and real targets to this size")
        q.add_argument("--targets", nargs="*", help="shipped domains, spec files, dataset folders or real:<domain>")
        q.add_argument("--k", type=many(int), default=[5] if multi else 5)
        q.add_argument("--tau", type=many(float), default=[0.05] if multi else 0.05)
        q.add_argument("--metric", type=many(str), default=["euclidean"] if multi else "euclidean")
        q.add_argument("--weighting", type=many(str), default=["softmax"] if multi else "softmax")
        q.add_argument("--fusion", type=many(str), default=["cat"] if multi else "cat")
        q.add_argument("--max-images", type=int, help="test images per target (default: all)")
        q.add_argument("--batch-size", type=int, default=50)
        q.add_argument("--out", help="output folder")

    e = sub.add_parser("evaluate", help="leave-one-out benchmark (zero-shot, uniform, SemLA, late, oracle)")
    knobs(e, multi=False)
    e.add_argument("--methods", nargs="*", help="subset of the methods (default: all six)")
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("ablate", help="grid over retrieval/fusion knobs, comma-separated values")
    knobs(a, multi=True)
    a.add_argument("--methods", nargs="*", default=["semla"])
    a.set_defaults(func=cmd_ablate)

    tr = sub.add_parser("transfer", help="every adapter alone on every target: harm, uniform merge, retrieval regret")
    for flag, text in (("--library", "adapter library folder (default: the shipped one)"),
                       ("--clip", "open_clip model name (default: the library's embedding model)"),
                       ("--pretrained", "open_clip pretrained tag"), ("--checkpoint", "local CLIP weights"),
                       ("--segmenter", "base segmenter weights (default: the shipped one)"), ("--out", "output folder")):
        tr.add_argument(flag, help=text)
    tr.add_argument("--targets", nargs="*", help="shipped domains, spec files, dataset folders or real:<domain>")
    tr.add_argument("--split", default="test", choices=["val", "test"], help="mini-world split (val: for tuning)")
    tr.add_argument("--max-images", type=int, default=50, help="images per target")
    tr.set_defaults(func=cmd_transfer)

    sm = sub.add_parser("summarize", help="mean and spread of several evaluate runs (e.g. adapter seeds)")
    sm.add_argument("runs", nargs="+", help="output folders of `semla-lab evaluate`")
    sm.set_defaults(func=cmd_summarize)

    t = sub.add_parser("train-adapter", help="train one LoRA adapter on a domain (peft folder)")
    t.add_argument("--domain", required=True, help="shipped domain name or spec .yaml file")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_train_adapter)

    bl = sub.add_parser("build-library", help="train adapters for domains into a library folder (resumes one)")
    bl.add_argument("--out", required=True)
    bl.add_argument("--domains", nargs="*", help="shipped domains, spec files, dataset folders or real:<domain> "
                                                 "(default: every shipped target domain)")
    bl.set_defaults(func=cmd_build_library)

    ad = sub.add_parser("add-domain", help="train adapters for new domains and add them to a library")
    ad.add_argument("--library", required=True)
    ad.add_argument("--domain", required=True, nargs="+",
                    help="shipped domain names, spec .yaml files, dataset folders or real:<domain>")
    ad.set_defaults(func=cmd_add_domain)
    sc = sub.add_parser("scale", help="grow libraries from a random domain pool; h-mean against library size")
    sc.add_argument("--out", required=True, help="study folder (created; a rerun reuses its adapters and results)")
    sc.add_argument("--sizes", type=_csv(int), default=[5, 10, 20, 40, 80],
                    help="library sizes (default: 5,10,20,40,80)")
    sc.add_argument("--pool-size", type=int, help="domains in the pool (default: the largest size)")
    sc.add_argument("--pool-seed", type=int, default=0)
    sc.add_argument("--orders", type=int, default=3, help="random orders, seeds 0..n-1 (default: 3)")
    sc.add_argument("--no-active", action="store_true", help="skip active growth by target coverage")
    sc.add_argument("--no-oracle", action="store_true", help="skip training the targets' own adapters")
    sc.add_argument("--targets", nargs="*", help="mini-world domains or spec files (default: data_manifests/heldout)")
    sc.add_argument("--max-images", type=int, default=100, help="test images per target (default: 100)")
    sc.add_argument("--query-images", type=int, default=50,
                    help="unlabelled training images per target that active growth sees (default: 50)")
    sc.add_argument("--k", type=int, default=5, help="adapters SemLA retrieves per image (default: 5)")
    sc.add_argument("--ray", action="store_true", help="run training and evaluation as Ray tasks")
    sc.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS); implies --ray")
    sc.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    sc.add_argument("--rank", type=int, help="LoRA rank r, with alpha = 2r (default: the shipped recipe's)")
    sc.add_argument("--steps", type=int, help="adapter training steps (default: the shipped recipe's)")
    sc.add_argument("--seed", type=int, default=0, help="adapter training seed")
    sc.set_defaults(func=cmd_scale)

    for q in (t, bl, ad):
        if q is not ad:
            q.add_argument("--rank", type=int, help="LoRA rank r, with alpha = 2r (default: the shipped recipe's)")
        q.add_argument("--steps", type=int, help="training steps (default: the shipped recipe's)")
        q.add_argument("--seed", type=int, default=0)
    for q in (bl, ad):
        q.add_argument("--clip", help="open_clip model name (default: the shipped tiny CLIP)")
        q.add_argument("--pretrained", help="open_clip pretrained tag, e.g. openai")
        q.add_argument("--checkpoint", help="local CLIP weights (.safetensors, or a weights-only torch file)")
        q.add_argument("--segmenter", help="base segmenter weights (default: the shipped one)")
        q.add_argument("--image-size", type=int, help="resize dataset-folder and real images to this size")
        q.add_argument("--max-images", type=int, help="training images per domain (default: all)")
        q.add_argument("--replay-source", help="what adapters replay (default: source, or real:coco_stuff for "
                                               "real domains)")
    for q in (b, e, a, bl, ad):
        q.add_argument("--ray", action="store_true", help="run every adapter training / target evaluation as a "
                                                          "Ray task (a local cluster unless --ray-address)")
        q.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS); implies --ray")
        q.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")

    for q in sub.choices.values():
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument("--threads", type=int, help="torch threads (default: $SEMLA_THREADS or 1)")
        q.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: $SEMLA_DEVICE, else CUDA if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .runtime import configure_threads, resolve_device
    args = build_parser().parse_args(argv)
    try:
        args.device = resolve_device(args.device)      # a device this machine lacks: say so before any work
        configure_threads(args.threads)
        args.func(args)
    except SemlaError as e:
        print(f"semla-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
