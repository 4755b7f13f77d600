"""Adaptation overhead per image: what SemLA adds to a segmenter forward, against the base forward and
against the official SemLA code path.

Per model (tiny segmenter at 64 px, ViT-B/16-sized at 224 px) and batch (1, 16), T = 19 classes, a library
of 20 random LoRA adapters (r=8, alpha=16 on every attention / MLP Linear of the vision tower), K = 5:

  base      segmenter forward, no adapters
  SemLA     embed the batch with a separate tiny CLIP (64 px) + retrieve top-5 of 20 centroids + ONE
            fused forward in which every image has its own 5 adapters (semla_lab.core.fusion.FusedAdapters)
  official  per image, as the official code does: embed one image + retrieve + peft
            add_weighted_adapter(cat) + set_adapter + forward + delete_adapter

Then the fusion step alone: building each image's fused `cat` adapter for every LoRA target
(FusedAdapters.fused_lora, the factors the fused forward gathers) against peft's add_weighted_adapter(cat)
+ set + delete for the same images; and, like for like, (fused forward - base forward) against the
official merges plus their LoRA compute. Matmul FLOP counts (torch.utils.flop_counter) give each row's
ratio if time followed FLOPs: a floor for a model whose time is its matmuls (ViT-B/16: ~80% addmm), only a
guide for the tiny one (convolutions, upsampling and small ops take much of its time). When SemLA misses
1.10x the base forward at batch 16: a profile and measured candidate fixes (cheaper embedding, reusing the
segmenter's encoder, smaller K).

    python benchmarks/bench_adaptation.py [--quick] [--device cuda] [--json out.json] [--models tiny vitb16]
"""
from __future__ import annotations

from dataclasses import dataclass

from common import (MODELS, T_CLASSES, count_flops, fmt_s, fmt_x, inputs, measure, measure_interleaved,
                    paired_difference, paired_ratio, parser, payload, peft_merge_only, quiet_stderr, random_library,
                    segmenter, setup, sync, table, target_lines, tiny_clip, write_json)

import torch
import torch.nn.functional as F

from semla_lab.models.clip import Clip, embed_images
from semla_lab.core.fusion import peft_weighted_forward
from semla_lab.core.retrieval import RetrievalConfig, retrieve

LIBRARY_SIZE, K = 20, 5
BATCHES = (1, 16)
TARGET_TOTAL, TARGET_FUSION = 1.10, 10.0
EMBEDDER = "separate tiny CLIP (semla-tiny-clip, random weights) at 64 px, D=64"
CONFIG = RetrievalConfig(k=K, tau=0.05)


@dataclass
class Bench:
    kind: str
    seg: torch.nn.Module
    size: int
    dim: int
    lib: object            # common.RandomLibrary
    clip: Clip
    device: torch.device


@dataclass
class Plan:
    """Repeats for one (model, batch): timed runs, warm-up runs, passes of the official loop."""
    reps: int
    warmup: int
    official: int
    official_images: int | None = None   # time the official loop on this many of the batch's images, scale up
    fused_directly: bool = True   # False: fused forward = SemLA total - embed - retrieve (saves minutes on CPU)


def plan(kind: str, batch: int, device: torch.device, quick: bool) -> Plan:
    if device.type == "cuda":
        return Plan(reps=10, warmup=3, official=2)
    if kind == "tiny":
        return Plan(reps=3, warmup=1, official=1, official_images=2) if quick else Plan(reps=11, warmup=2, official=3)
    if batch == 1:                # ViT-B/16 on a CPU: ~0.6 s per image
        return Plan(reps=3, warmup=1, official=2)
    # batch 1 ran the same code (warm); the official loop is per image, so 4 of the 16 images tell its cost;
    # 5 interleaved pairs of ~10 s forwards: the ratio moves by ~0.1x between runs of 3 on a shared VM
    return Plan(reps=5, warmup=0, official=1, official_images=4, fused_directly=False)


# ---- the measured steps ------------------------------------------------------------------------------

def build(kind: str, device: torch.device, clip: Clip) -> Bench:
    seg, size, dim = segmenter(kind, device)
    return Bench(kind, seg, size, dim, random_library(seg, LIBRARY_SIZE, device), clip, device)


def base_forward(b: Bench, images, text):
    return b.seg(images, text)


def embed(b: Bench, images, clip: Clip | None = None):
    return embed_images(clip or b.clip, images)


def retrieval(b: Bench, emb):
    return retrieve(emb, b.lib.centroids, b.lib.names, CONFIG)


def fused_forward(b: Bench, images, text, r):
    with b.lib.fused.select(r.indices, r.weights):
        return b.lib.fused_model(images, text)


def semla_total(b: Bench, images, text, clip: Clip | None = None):
    return fused_forward(b, images, text, retrieval(b, embed(b, images, clip)))


def official(b: Bench, images, text):
    """The official per-image loop: embed one image, retrieve, build a peft cat adapter, forward, delete."""
    outs = []
    for i in range(images.shape[0]):
        r = retrieval(b, embed(b, images[i:i + 1]))
        names = [b.lib.names[j] for j in r.indices[0].tolist()]
        outs.append(peft_weighted_forward(b.lib.peft_model, names, r.weights[0].tolist(), images[i:i + 1], text))
    return outs


def fuse_only(b: Bench, r):
    return b.lib.fused.fused_lora(r.indices, r.weights)


def merge_only(b: Bench, r):
    names = [b.lib.names[j] for j in r.indices[0].tolist()]
    peft_merge_only(b.lib.peft_model, names, r.weights[0].tolist())


# ---- tables ------------------------------------------------------------------------------------------

def row(b: Bench, batch: int, measured: str, seconds: float, ratio: float, cpu_ratio: float | None,
        flop_ratio: float | None, how: str = "measured") -> dict:
    return {"model": b.kind, "batch": batch, "measured": measured, "median_s": seconds,
            "per_image_s": seconds / batch, "ratio_to_base": ratio,
            "cpu_ratio_to_base": cpu_ratio if b.device.type == "cpu" else None, "flop_ratio_to_base": flop_ratio,
            "how": how}


def flop_ratios(b: Bench, images, text, r) -> dict:
    """FLOPs of embed and fused forward over FLOPs of the base forward (per image: the same at any batch)."""
    base = count_flops(lambda: base_forward(b, images, text))
    return {"embed": count_flops(lambda: embed(b, images)) / base,
            "fused": count_flops(lambda: fused_forward(b, images, text, r)) / base}


def measure_batch(b: Bench, batch: int, quick: bool, single: dict | None = None) -> tuple[list[dict], dict]:
    """All rows of one (model, batch); `single` holds the batch-1 summary (per-image costs of the official loop).
    Base, fused and SemLA total run interleaved; their ratios and differences are medians of per-run pairs,
    in wall time and (on a CPU) in process CPU time."""
    p = plan(b.kind, batch, b.device, quick)
    images, text = inputs(batch, b.size, b.dim, b.device)
    emb = embed(b, images)
    r = retrieval(b, emb)
    timed = {"base": lambda: base_forward(b, images, text), "semla": lambda: semla_total(b, images, text)}
    if p.fused_directly:
        timed["fused"] = lambda: fused_forward(b, images, text, r)
    t = measure_interleaved(timed, b.device, p.reps, p.warmup)
    t_embed = measure(lambda: embed(b, images), b.device, max(p.reps, 5), 1)
    t_retr = measure(lambda: retrieval(b, emb), b.device, 20, 2)
    t_merge = measure(lambda: merge_only(b, r), b.device, 5 if p.official > 1 else 3, 1)
    t_fuse = measure(lambda: fuse_only(b, r), b.device, 20, 2)
    flops = single["flops"] if single else flop_ratios(b, images, text, r)
    n_off = batch if p.official_images is None else min(batch, p.official_images)
    t_off = measure(lambda: official(b, images[:n_off], text), b.device, p.official,
                    1 if batch == 1 else 0)                              # batch 1 warmed the loop up
    scale_off = batch / n_off
    base, base_cpu = t["base"].median, t["base"].cpu_median
    steps = t_embed.median + t_retr.median                               # what SemLA adds besides the fused forward
    steps_cpu = t_embed.cpu_median + t_retr.cpu_median
    semla = (paired_ratio(t["semla"], t["base"]), paired_ratio(t["semla"], t["base"], cpu=True))
    if p.fused_directly:
        fused_s = t["fused"].median
        fused = (paired_ratio(t["fused"], t["base"]), paired_ratio(t["fused"], t["base"], cpu=True))
        fusion_semla = paired_difference(t["fused"], t["base"])
        how_fused = "measured"
    else:
        fused_s = t["semla"].median - steps
        fused = (semla[0] - steps / base, semla[1] - steps_cpu / base_cpu)
        fusion_semla = paired_difference(t["semla"], t["base"]) - steps
        how_fused = "derived: SemLA total - embed - retrieve"
    flops_total = flops["embed"] + flops["fused"]
    rows = [
        row(b, batch, "base forward (no adapters)", base, 1.0, 1.0, 1.0),
        row(b, batch, "SemLA: embed (separate tiny CLIP, 64 px)", t_embed.median, t_embed.median / base,
            t_embed.cpu_median / base_cpu, flops["embed"]),
        row(b, batch, f"SemLA: retrieve top-{K} of {LIBRARY_SIZE} centroids", t_retr.median, t_retr.median / base,
            t_retr.cpu_median / base_cpu, None),
        row(b, batch, f"SemLA: fused forward (K={K}, per-image adapters)", fused_s, *fused, flops["fused"],
            how_fused),
        row(b, batch, "SemLA total: embed + retrieve + fused forward", t["semla"].median, *semla, flops_total),
        row(b, batch, "official: per image embed + retrieve + peft cat merge + forward + delete",
            t_off.median * scale_off, t_off.median * scale_off / base, t_off.cpu_median * scale_off / base_cpu,
            None, "measured" if n_off == batch else f"{n_off} of {batch} images timed, scaled"),
    ]
    fusion_semla = max(fusion_semla, 1e-6)     # guard: on a noisy machine the difference can vanish
    fusion_official = t_merge.median * batch
    one = single or {"embed": t_embed.median, "retrieve": t_retr.median, "base": base}   # batch-1 step costs
    fusion_official_all = t_off.median * scale_off - batch * (one["embed"] + one["retrieve"] + one["base"])
    fusion = [
        {"model": b.kind, "batch": batch, "measured": "fusion step, SemLA: every image's fused cat adapter, all "
         "LoRA targets (FusedAdapters.fused_lora)", "median_s": t_fuse.median, "speedup": 1.0},
        {"model": b.kind, "batch": batch, "measured": f"fusion step, official: peft add_weighted_adapter(cat) + set "
         f"+ delete, x{batch} images", "median_s": fusion_official, "speedup": fusion_official / t_fuse.median},
        {"model": b.kind, "batch": batch, "measured": "fusion + LoRA compute, SemLA: fused forward - base forward",
         "median_s": fusion_semla, "speedup": 1.0},
        {"model": b.kind, "batch": batch, "measured": "fusion + LoRA compute, official: its total - its embeds, "
         "retrievals and base forwards", "median_s": fusion_official_all,
         "speedup": fusion_official_all / fusion_semla},
    ]
    summary = {"base": base, "embed": t_embed.median, "retrieve": t_retr.median, "semla": t["semla"].median,
               "semla_ratio": semla[0], "semla_cpu_ratio": semla[1] if b.device.type == "cpu" else None,
               "fusion_semla": fusion_semla, "merge_per_image": t_merge.median, "fuse": t_fuse.median,
               "fusion_speedup": fusion_official / t_fuse.median,
               "like_for_like_speedup": fusion_official_all / fusion_semla, "flops": flops,
               "flop_ratio": flops_total, "fused_ratio": fused[0], "images": images, "text": text}
    return rows, summary | {"fusion_rows": fusion}


# ---- where the time goes, and candidate fixes ------------------------------------------------------------

def _self_time(evt, device: torch.device) -> float:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return getattr(evt, key, 0.0) / 1e6


def profile_ops(b: Bench, images, text, top: int = 10) -> list[dict]:
    """torch.profiler, one base forward and one SemLA total: ops by self time, with what SemLA adds."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.type == "cuda" else [])
    times = {}
    for name, fn in (("base", lambda: base_forward(b, images, text)), ("semla", lambda: semla_total(b, images, text))):
        with quiet_stderr(), profile(activities=acts) as prof:
            fn()
            sync(b.device)
        times[name] = {e.key: (_self_time(e, b.device), e.count) for e in prof.key_averages()}
    total = sum(t for t, _ in times["semla"].values())
    ranked = sorted(times["semla"].items(), key=lambda kv: -kv[1][0])[:top]
    return [{"model": b.kind, "op": op, "semla_self_s": t, "calls": n, "share": t / total,
             "base_self_s": times["base"].get(op, (0.0, 0))[0],
             "added_s": t - times["base"].get(op, (0.0, 0))[0]} for op, (t, n) in ranked]


def clip_at(size: int, device: torch.device) -> Clip:
    """The tiny CLIP architecture built for `size` px input (fewer patches; positional embedding for them)."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("semla-tiny-clip", pretrained=None, force_image_size=size).to(device).eval()
    return Clip(model, f"semla-tiny-clip@{size}px", "random", open_clip.get_tokenizer("semla-tiny-clip"), None)


def semla_variant(b: Bench, images, text, embed_fn, k: int = K):
    """SemLA total with another embedding step and/or another K (softmax over the k nearest)."""
    r = retrieve(embed_fn(images), b.lib.centroids, b.lib.names, RetrievalConfig(k=k, tau=CONFIG.tau))
    return fused_forward(b, images, text, r)


def candidates(b: Bench, s: dict, quick: bool) -> list[dict]:
    """Measured alternatives: the base forward, the current SemLA total and every candidate SemLA total run
    interleaved, ratios are medians of per-run pairs. On a CPU the ViT-B/16 model gets the fused-layer
    candidate only (its embedding is < 1% of the time), at batch 4 of the 16 images (3 runs fit the time)."""
    heavy = b.kind != "tiny" and b.device.type == "cpu"
    few = heavy or quick          # --quick: the 32-px CLIP only
    images, text = (s["images"][:4] if heavy else s["images"]), s["text"]
    reps = 3 if few else 9
    to32 = lambda x: F.interpolate(x, size=32, mode="bilinear", antialias=True, align_corners=False)  # noqa: E731
    norm = lambda x: (x - b.seg.mean) / b.seg.std                                                     # noqa: E731
    clip32 = None if heavy else clip_at(32, b.device)
    embed32 = lambda x: embed(b, x, clip32)                                                           # noqa: E731
    fns = {"base forward (no adapters)": lambda: base_forward(b, images, text),
           f"current: separate tiny CLIP at 64 px, K={K}": lambda: semla_total(b, images, text)}
    if not few:
        fns["embed 32-px images with the 64-px CLIP (embed_images resizes them back to 64)"] = (
            lambda: semla_variant(b, images, text, lambda x: embed(b, to32(x))))
    if not heavy:
        fns["embed with the tiny CLIP built for 32 px (4x4 patches + CLS instead of 8x8 + CLS)"] = (
            lambda: semla_variant(b, images, text, embed32))
    if not few:
        fns["reuse the segmenter's encoder: a base pass of its vision tower gives the CLS embedding"] = (
            lambda: semla_variant(b, images, text, lambda x: F.normalize(b.seg.visual(norm(x)), dim=-1).cpu()))
    if not few:
        for k in (1, 2, 3):
            fns[f"K={k} instead of {K} (fewer adapters per image; softmax over the k nearest)"] = (
                lambda k=k: semla_variant(b, images, text, lambda x: embed(b, x), k))
        fns["combined: 32-px CLIP + K=2"] = lambda: semla_variant(b, images, text, embed32, 2)
    t = measure_interleaved(fns, b.device, reps, 1)
    flops = {name: count_flops(fn) for name, fn in fns.items()}
    base, current = list(fns)[:2]
    rows = []
    cpu = b.device.type == "cpu"
    for name in fns:
        rows.append({"model": b.kind, "batch": images.shape[0], "candidate": name, "semla_total_s": t[name].median,
                     "flop_ratio_to_base": flops[name] / flops[base],
                     "ratio_to_base": paired_ratio(t[name], t[base]),
                     "cpu_ratio_to_base": paired_ratio(t[name], t[base], cpu=True) if cpu else None,
                     "change_vs_current": paired_ratio(t[name], t[current]),
                     "cpu_change_vs_current": paired_ratio(t[name], t[current], cpu=True) if cpu else None,
                     "runs": reps})
    return rows


# ---- main --------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help="default: tiny and vitb16 (--quick: tiny only)")
    args = p.parse_args(argv)
    device = setup(args)
    models = args.models or (["tiny"] if args.quick else ["tiny", "vitb16"])
    clip = tiny_clip(device)
    print(f"SemLA adaptation overhead on {device} ({torch.get_num_threads()} torch thread(s)); T={T_CLASSES} "
          f"classes, library of {LIBRARY_SIZE} random LoRA adapters (r=8, alpha=16), K={K}, tau=0.05.\n"
          f"Embedding model: {EMBEDDER}. Times are medians after warm-up.\n")
    rows, fusion_rows, targets, profile_rows, cand_rows = [], [], [], [], []
    for kind in models:
        b = build(kind, device, clip)
        single = None
        for batch in BATCHES:
            batch_rows, s = measure_batch(b, batch, args.quick, single)
            single = single or s
            rows += batch_rows
            fusion_rows += s["fusion_rows"]
            print(table(batch_rows, [("measured", f"{MODELS[kind]}, batch {batch}", None),
                                     ("median_s", "time", fmt_s), ("per_image_s", "per image", fmt_s),
                                     ("ratio_to_base", "x base", fmt_x),
                                     ("cpu_ratio_to_base", "x base, CPU time", fmt_x),
                                     ("flop_ratio_to_base", "x base, FLOPs", fmt_x), ("how", "how", None)]) + "\n")
            print(table(s["fusion_rows"], [("measured", "fusion step", None), ("median_s", "time", fmt_s),
                                           ("speedup", "SemLA faster by", fmt_x)]) + "\n")
            targets.append({"name": f"fusion step {kind} batch {batch}", "goal": f">= {TARGET_FUSION:.0f}x faster "
                            "than peft merge + set + delete", "measured": fmt_x(s["fusion_speedup"]) +
                            f" (with the LoRA compute both paths then run: {fmt_x(s['like_for_like_speedup'])})",
                            "value": s["fusion_speedup"], "value_like_for_like": s["like_for_like_speedup"],
                            "met": s["fusion_speedup"] >= TARGET_FUSION})
            if batch == 16:
                ratio = s["semla_ratio"]
                on = "CPU" if device.type == "cpu" else f"{device.type} (the target is stated for CPU)"
                cpu_ratio = s["semla_cpu_ratio"]
                targets.append({"name": f"SemLA total {kind} batch 16 on {on}", "goal": f"<= {TARGET_TOTAL:.2f}x base",
                                "measured": fmt_x(ratio) + ("" if cpu_ratio is None else
                                                            f" (in CPU time: {fmt_x(cpu_ratio)})")
                                + f"; matmul FLOPs {fmt_x(s['flop_ratio'])}",
                                "value": ratio, "value_cpu_time": cpu_ratio, "flop_ratio": s["flop_ratio"],
                                "met": ratio <= TARGET_TOTAL,
                                "met_in_cpu_time": None if cpu_ratio is None else cpu_ratio <= TARGET_TOTAL})
                if ratio > TARGET_TOTAL or (cpu_ratio or 0) > TARGET_TOTAL:
                    shares = [("embed", s["embed"]), ("retrieve", s["retrieve"]), ("fused - base", s["fusion_semla"])]
                    print(f"{kind} batch 16 misses {TARGET_TOTAL:.2f}x ({fmt_x(ratio)} wall"
                          + ("" if cpu_ratio is None else f", {fmt_x(cpu_ratio)} CPU time") + "). Time SemLA adds to the base "
                          "forward: " + ", ".join(f"{n} {fmt_s(t)} ({t / sum(x for _, x in shares):.0%})"
                                                  for n, t in shares)
                          + f". Matmul FLOPs: embed {fmt_x(s['flops']['embed'])}, fused forward "
                          f"{fmt_x(s['flops']['fused'])} of the base forward's."
                          + (f" The fused forward alone takes {fmt_x(s['fused_ratio'])}: no embedding, shared or "
                             f"separate, brings the total to {TARGET_TOTAL:.2f}x at K={K}, r=8 on this model"
                             if s["fused_ratio"] > TARGET_TOTAL else "") + "\n")
                    # ViT-B/16 on a CPU: profile 4 of the 16 images (op shares barely depend on the batch there)
                    n_prof = 4 if kind != "tiny" and device.type == "cpu" else 16
                    ops = profile_ops(b, s["images"][:n_prof], s["text"])
                    profile_rows += [o | {"batch": n_prof} for o in ops]
                    print(table(ops, [("op", f"torch.profiler, {kind} batch {n_prof}: one SemLA total", None),
                                      ("semla_self_s", "self time", fmt_s), ("calls", "calls", None),
                                      ("share", "share", lambda v: f"{v:.0%}"),
                                      ("base_self_s", "in base forward", fmt_s),
                                      ("added_s", "added (incl. embedding)", fmt_s)]) + "\n")
                    cand = candidates(b, s, args.quick)
                    cand_rows += cand
                    print(table(cand, [("candidate", f"candidates, {kind} batch {cand[0]['batch']} (all interleaved; "
                                       "time = SemLA total)", None), ("semla_total_s", "time", fmt_s),
                                       ("ratio_to_base", "x base", fmt_x),
                                       ("flop_ratio_to_base", "x base, FLOPs", fmt_x),
                                       ("change_vs_current", "vs current", fmt_x),
                                       ("cpu_ratio_to_base", "x base, CPU time", fmt_x),
                                       ("cpu_change_vs_current", "vs current, CPU time", fmt_x),
                                       ("runs", "runs", None)]) + "\n")
        del b
    print(target_lines(targets))
    out = payload("adaptation", device, args.quick, rows, targets, embedder=EMBEDDER, fusion=fusion_rows,
                  profile=profile_rows, candidates=cand_rows, library_size=LIBRARY_SIZE, k=K, classes=T_CLASSES)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
