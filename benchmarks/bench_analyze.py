"""Analysing your own images: images per second of `semla-lab analyze`'s two workloads, embed + retrieve, and
embed + retrieve + masks (zero-shot and SemLA, each at the image's own size), batched
(SemLAPredictor.set_image_batch / predict_batch, 32 images per call) against one image per call (set_image /
predict), with the shipped tiny CLIP, segmenter and 20-adapter library, on images of mixed sizes (64x64 to
600x512, as world.photos writes them) held in memory. One image per call also embeds the class names on
every predict(), as a loop over the single-image API does. The modes run in turn (interleaved); speed-ups
are medians of per-run ratios; both modes' results are compared.

    python benchmarks/bench_analyze.py [--quick] [--device cuda] [--json out.json]
"""
from __future__ import annotations

from common import fmt_s, fmt_x, measure_interleaved, paired_ratio, parser, payload, setup, table, write_json

import torch
import torch.nn.functional as F

from semla_lab.library.predictor import SemLAPredictor
from semla_lab.data.world.generate import generate, get_domain
from semla_lab.data.world.photos import SIZES, vocabulary_classes

BATCH = 32
DOMAINS = ("cityscapes", "acdc_night", "muses_fog_day", "nyu")


def photos(n: int) -> list[torch.Tensor]:
    """n mini-world test images, (3, H, W) float, resized to the cycled photo sizes."""
    per = -(-n // len(DOMAINS))
    images = torch.cat([generate(get_domain(d), "test", per).float_images() for d in DOMAINS])[:n]
    return [F.interpolate(im[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
            for im, (w, h) in zip(images, SIZES * n)]


def batched(predictor: SemLAPredictor, images, classes):
    predictor.set_image_batch(images)
    masks = (predictor.predict_batch(classes, adapt=False), predictor.predict_batch(classes)) if classes else None
    return predictor.retrieval.weights, masks


def one_per_call(predictor: SemLAPredictor, images, classes):
    weights, zero_shot, semla = [], [], []
    for image in images:
        predictor.set_image(image)
        weights.append(predictor.retrieval.weights)
        if classes:
            zero_shot.append(predictor.predict(classes, adapt=False))
            semla.append(predictor.predict(classes))
    return torch.cat(weights), ((zero_shot, semla) if classes else None)


def agreement(a, b) -> tuple[float, float | None]:
    """Max |weight difference| and the share of mask pixels that agree (None without masks)."""
    diff = (a[0] - b[0]).abs().max().item()
    if a[1] is None:
        return diff, None
    same = total = 0
    for ma, mb in zip(a[1], b[1]):
        for x, y in zip(ma, mb):
            same, total = same + int((x == y).sum()), total + x.numel()
    return diff, same / total


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup(args)
    n, reps = (16, 2) if args.quick else (64, 5)
    predictor = SemLAPredictor.from_assets(device=device, batch_size=BATCH)
    images, classes = photos(n), vocabulary_classes("cityscapes")
    pixels = sum(im.shape[1] * im.shape[2] for im in images) / n
    print(f"Analysing your own images on {device} ({torch.get_num_threads()} torch thread(s)): shipped tiny CLIP, "
          f"segmenter and library, K=5; N={n} images of {len(set(im.shape for im in images))} sizes "
          f"(mean {pixels / 1e3:.0f} kpixels), {len(classes)} classes; medians after warm-up.\n")
    rows = []
    for task, names in (("embed + retrieve", None), ("embed + retrieve + masks (zero-shot and SemLA)", classes)):
        fns = {f"batched, {BATCH} images per call": lambda c=names: batched(predictor, images, c),
               "one image per call": lambda c=names: one_per_call(predictor, images, c)}
        t = measure_interleaved(fns, device, reps, 1)
        diff, same = agreement(fns[next(iter(fns))](), fns["one image per call"]())
        for mode in fns:
            rows.append({"task": task, "mode": mode, "n_images": n, "total_s": t[mode].median,
                         "images_per_s": n / t[mode].median,
                         "speedup_vs_one_per_call": paired_ratio(t["one image per call"], t[mode]),
                         "max_abs_diff_weights": diff, "mask_pixels_equal": same})
    print(table(rows, [("task", "task", None), ("mode", "mode", None), ("total_s", "total", fmt_s),
                       ("images_per_s", "images/s", lambda v: f"{v:.1f}"),
                       ("speedup_vs_one_per_call", "speed-up vs one per call", fmt_x)]))
    for task in dict.fromkeys(r["task"] for r in rows):
        r = next(r for r in rows if r["task"] == task)
        masks = "" if r["mask_pixels_equal"] is None else f", {100 * r['mask_pixels_equal']:.4f}% of mask pixels equal"
        print(f"({task}: batched and one-per-call weights agree to {r['max_abs_diff_weights']:.1e}{masks})")
    out = payload("analyze", device, args.quick, rows)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
