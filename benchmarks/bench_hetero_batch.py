"""Heterogeneous batches: N images, each with its own top-K adapters and weights, in ONE fused forward,
against the same fused code one image at a time, and against the official peft path one image at a time
(add_weighted_adapter(cat) + set_adapter + forward + delete_adapter per image).

Library of 20 random LoRA adapters (r=8, alpha=16), K=5, T=19 classes. Retrieval is not timed here (see
bench_adaptation.py): every image gets a random distinct set of K adapters and softmax weights. The outputs
of the three paths are compared (max |difference|) so the speed-up is for the same result.

    python benchmarks/bench_hetero_batch.py [--quick] [--device cuda] [--json out.json] [--models tiny vitb16]
"""
from __future__ import annotations

from common import (MODELS, T_CLASSES, fmt_s, fmt_x, inputs, measure, parser, payload, random_library, segmenter,
                    setup, table, write_json)

import torch

from semla_lab.core.fusion import peft_weighted_forward

LIBRARY_SIZE, K = 20, 5


def selections(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) distinct random adapter indices per image and (N, K) softmax weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(LIBRARY_SIZE, generator=g)[:K] for _ in range(n)])
    w = torch.softmax(torch.randn(n, K, generator=g) * 2, dim=1)
    return idx, w


def fused_batch(lib, images, text, idx, w):
    with lib.fused.select(idx, w):
        return lib.fused_model(images, text)


def fused_one_by_one(lib, images, text, idx, w):
    return torch.cat([fused_batch(lib, images[i:i + 1], text, idx[i:i + 1], w[i:i + 1])
                      for i in range(images.shape[0])])


def official_one_by_one(lib, images, text, idx, w):
    return torch.cat([peft_weighted_forward(lib.peft_model, [lib.names[j] for j in idx[i].tolist()], w[i].tolist(),
                                            images[i:i + 1], text) for i in range(images.shape[0])])


def reps_for(kind: str, n: int, device: torch.device, quick: bool) -> tuple[int, int, int]:
    """(timed runs of the batched and per-image fused paths, passes of the slow official loop, images the
    official loop times: its time is scaled to N)."""
    if device.type == "cuda":            # peft's merge is CPU-bound (~0.1-0.5 s): 16 images tell its cost
        return 10, 2, min(n, 16)
    if quick:
        return 3, 1, min(n, 4)
    if kind != "tiny":
        return 1, 1, n
    return (9, 2, n) if n <= 16 else (5, 1, 16)   # the official loop is per image: 16 tell its cost


def measure_n(kind: str, lib, seg, size: int, dim: int, n: int, device: torch.device, quick: bool) -> list[dict]:
    images, text = inputs(n, size, dim, device, seed=n)
    idx, w = selections(n, seed=n)
    reps, official_reps, n_off = reps_for(kind, n, device, quick)
    out_batch = fused_batch(lib, images, text, idx, w)
    out_single = fused_one_by_one(lib, images, text, idx, w)
    check = min(n, 4)       # the official path is slow: compare its first images
    out_official = official_one_by_one(lib, images[:check], text, idx[:check], w[:check])
    base_out = seg(images, text)
    t_base = measure(lambda: seg(images, text), device, reps).median
    t_batch = measure(lambda: fused_batch(lib, images, text, idx, w), device, reps).median
    t_single = measure(lambda: fused_one_by_one(lib, images, text, idx, w), device, reps).median
    t_off = measure(lambda: official_one_by_one(lib, images[:n_off], text, idx[:n_off], w[:n_off]), device,
                    official_reps, 0 if official_reps == 1 else 1).median * n / n_off
    diff_single = (out_batch - out_single).abs().max().item()
    diff_off = (out_batch[:check] - out_official).abs().max().item()
    effect = (out_batch - base_out).abs().max().item()

    def r(method, seconds, diff=None):
        return {"model": kind, "n": n, "method": method, "total_s": seconds, "per_image_s": seconds / n,
                "images_per_s": n / seconds, "fused_batch_speedup": seconds / t_batch, "max_abs_diff": diff}
    return [r("base forward, whole batch, no adapters (reference)", t_base),
            r(f"fused, one forward for all {n} (each image its own {K} adapters)", t_batch, 0.0),
            r("fused, one image at a time (same code, batch 1)", t_single, diff_single),
            r("official peft, one image at a time (merge + forward + delete)" +
              ("" if n_off == n else f" [{n_off} timed, scaled]"), t_off, diff_off),
            {"model": kind, "n": n, "method": f"(adapters change the output by up to {effect:.2g})",
             "adapter_effect": effect}]


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="batch sizes N (default 16 64; --quick: 8)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help="default: tiny (and vitb16 on CUDA)")
    args = p.parse_args(argv)
    device = setup(args)
    sizes = args.sizes or ([8] if args.quick else [16, 64])
    models = args.models or (["tiny", "vitb16"] if device.type == "cuda" and not args.quick else ["tiny"])
    print(f"Heterogeneous batches on {device} ({torch.get_num_threads()} torch thread(s)): library of "
          f"{LIBRARY_SIZE} random LoRA adapters (r=8, alpha=16), K={K}, T={T_CLASSES}; medians after warm-up.\n")
    rows = []
    for kind in models:
        seg, size, dim = segmenter(kind, device)
        lib = random_library(seg, LIBRARY_SIZE, device)
        for n in sizes:
            part = measure_n(kind, lib, seg, size, dim, n, device, args.quick)
            rows += part
            print(table(part, [("method", f"{MODELS[kind]}, N={n}", None), ("total_s", "total", fmt_s),
                               ("per_image_s", "per image", fmt_s),
                               ("images_per_s", "images/s", lambda v: f"{v:.1f}"),
                               ("fused_batch_speedup", "fused-batch speed-up vs row", fmt_x),
                               ("max_abs_diff", "max |out - fused batch|", lambda v: f"{v:.1e}")]) + "\n")
    out = payload("hetero_batch", device, args.quick, [r for r in rows if "total_s" in r], k=K,
                  library_size=LIBRARY_SIZE, classes=T_CLASSES, notes=[r["method"] for r in rows if "total_s" not in r])
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
