"""Centroid computation: CLIP image embeddings per second, batched (64, 256 images per call) against one
image per call (as the official SemLA code embeds), for the tiny CLIP (64 px) and a ViT-B/16-sized CLIP
(224 px). A centroid is the mean of a domain's embeddings; the timed step is embed_images + mean. The modes run in
turn (interleaved); speed-ups are medians of per-run ratios.

On a CPU the ViT-B/16 rows use N=16 images and one batch of 16 (~0.3 s per image there: 64- or 256-image
batches would take minutes); with --device cuda they use N=256 and batches of 64 and 256 like the tiny CLIP.

    python benchmarks/bench_embedding.py [--quick] [--device cuda] [--json out.json]
"""
from __future__ import annotations

from common import (MODELS, fmt_s, fmt_x, measure_interleaved, paired_ratio, parser, payload, setup, table,
                    write_json)

import torch

from semla_lab.models.clip import Clip, embed_images


def load(kind: str, device: torch.device) -> Clip:
    import open_clip
    from semla_lab.models.clip import load_clip
    torch.manual_seed(0)
    if kind == "tiny":
        return load_clip(pretrained="random", device=device)
    model = open_clip.create_model("ViT-B-16", pretrained=None).to(device).eval()
    return Clip(model, "ViT-B-16", "random", open_clip.get_tokenizer("ViT-B-16"), None)


def plan(kind: str, device: torch.device, quick: bool) -> tuple[int, list[int], int]:
    """(images N, batch sizes, timed runs)."""
    if device.type == "cuda":
        return (64, [64], 3) if quick else (256, [64, 256], 5)
    if kind == "tiny":
        return (32, [32], 2) if quick else (256, [64, 256], 5)
    return 16, [16], 1


def centroid_batched(clip: Clip, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return embed_images(clip, images, batch_size=batch_size).mean(0)


def centroid_one_per_call(clip: Clip, images: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([embed_images(clip, images[i:i + 1]) for i in range(len(images))]).mean(0)


def measure_model(kind: str, device: torch.device, quick: bool) -> list[dict]:
    clip = load(kind, device)
    n, batch_sizes, reps = plan(kind, device, quick)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, clip.image_size, clip.image_size, generator=g).to(device)
    warm = 0 if reps == 1 else 1
    if warm == 0:   # one short untimed call so first-call costs stay out of the single timed run
        embed_images(clip, images[:2])
    fns = {f"batched, {bs} images per call": (lambda bs=bs: centroid_batched(clip, images, bs, device))
           for bs in batch_sizes}
    fns["one image per call (official code)"] = lambda: centroid_one_per_call(clip, images, device)
    t = measure_interleaved(fns, device, reps, warm)     # modes in turn: load drifts hit them alike
    per_call = "one image per call (official code)"
    timings = {mode: t[mode].median for mode in fns}
    speedups = {mode: paired_ratio(t[per_call], t[mode]) for mode in fns}
    a = centroid_batched(clip, images, batch_sizes[0], device)
    b = centroid_one_per_call(clip, images, device)
    diff = (a - b).abs().max().item()
    return [{"model": kind, "image_size": clip.image_size, "n_images": n, "mode": mode, "total_s": secs,
             "images_per_s": n / secs, "speedup_vs_one_per_call": speedups[mode], "max_abs_diff_centroid": diff}
            for mode, secs in timings.items()]


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help="default: tiny and vitb16 (--quick on a CPU: tiny only)")
    args = p.parse_args(argv)
    device = setup(args)
    models = args.models or (["tiny"] if args.quick and device.type == "cpu" else ["tiny", "vitb16"])
    print(f"Centroid computation (embed + mean) on {device} ({torch.get_num_threads()} torch thread(s)), random "
          "weights, images at the model's input size; medians after warm-up.\n")
    rows = []
    for kind in models:
        part = measure_model(kind, device, args.quick)
        rows += part
        name = "tiny CLIP (semla-tiny-clip, 64 px)" if kind == "tiny" else "ViT-B-16 CLIP (224 px)"
        print(table(part, [("mode", f"{name}, N={part[0]['n_images']}", None), ("total_s", "total", fmt_s),
                           ("images_per_s", "images/s", lambda v: f"{v:.1f}"),
                           ("speedup_vs_one_per_call", "speed-up vs one per call", fmt_x)]))
        print(f"(batched and one-per-call centroids agree to {part[0]['max_abs_diff_centroid']:.1e})\n")
    out = payload("embedding", device, args.quick, rows)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
