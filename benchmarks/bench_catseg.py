"""SemLA on the paper's model: CAT-Seg (B), ViT-B/16 at 384 px, random weights, 19 class names, a library of 20
random LoRA adapters (r=8, alpha=16) on the official SemLA targets (154 of the 214 names exist in CAT-Seg (B);
82 act), K = 5 per image. Per batch (1, 8), measured side by side in one run (interleaved):

  base      CAT-Seg forward, no adapters (class text encoded once per call)
  SemLA     ONE forward in which every image has its own 5 adapters, fused per layer
            (LibraryModel's path: core.fusion + core.fusion_merged, the text encoded once per image)
  official  per image, as the official SemLA code does: peft add_weighted_adapter(cat) + set_adapter +
            forward + delete_adapter

Retrieval (embedding with CLIP ViT-L/14, top-5 of 20) is the same work on both paths and is not timed here.
`--quick` runs a reduced CAT-Seg (B) (same code, small widths) once.

    python benchmarks/bench_catseg.py [--quick] [--device cuda] [--reps 3] [--json out.json]
"""
from __future__ import annotations

import copy
import warnings

from common import fmt_s, fmt_x, measure_interleaved, paired_ratio, parser, payload, setup, table, target_lines, \
    write_json

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from semla_lab.core.fusion import FusedAdapters, peft_weighted_forward
from semla_lab.models.catseg import CATSegConfig, build_catseg
from semla_lab.models.catseg.targets import acting_targets, lora_targets, random_lora_state
from semla_lab.models.segmenter_catseg import CATSegSegmenter

LIBRARY_SIZE, K, BATCHES = 20, 5, (1, 8)
TARGET = 1.15        # SemLA fused forward over the base forward at batch 8
CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def build(cfg: CATSegConfig, device: torch.device):
    """(base CAT-Seg, the same with the library fused in, the same under peft with every adapter, names)."""
    base = CATSegSegmenter.wrap(build_catseg(cfg, seed=0)).to(device)
    targets = lora_targets(base)
    names = [f"domain{i:02d}" for i in range(LIBRARY_SIZE)]
    states = {n: random_lora_state(base, targets, r=8, seed=100 + i) for i, n in enumerate(names)}
    fused_model = copy.deepcopy(base)
    fused = FusedAdapters(fused_model, {n: (s, 2.0) for n, s in states.items()})
    fused_model.install_fusion(fused)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), lora, adapter_name=names[0])
        for n in names[1:]:
            peft_model.add_adapter(n, lora)
        for n, s in states.items():
            set_peft_model_state_dict(peft_model, s, adapter_name=n)
    return base, fused_model, fused, peft_model.eval(), names, targets


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="timed runs of each path per batch (after one warm-up)")
    args = p.parse_args(argv)
    device = setup(args)
    cfg = CATSegConfig.reduced("B") if args.quick else CATSegConfig.vit_b16()
    base, fused_model, fused, peft_model, names, targets = build(cfg, device)
    text = base.class_text(CLASSES)
    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in BATCHES:
        images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
        idx = torch.stack([torch.randperm(LIBRARY_SIZE, generator=g)[:K] for _ in range(batch)])
        w = torch.softmax(torch.randn(batch, K, generator=g) / 0.5, 1)

        def semla():
            with fused.select(idx, w):
                return fused_model(images, text)

        def official():
            return torch.cat([peft_weighted_forward(peft_model, [names[j] for j in idx[i]], w[i].tolist(),
                                                    images[i:i + 1], text) for i in range(batch)])

        with torch.no_grad():         # the warm-up run of each path also checks that they agree
            diff = float((semla() - official()).abs().max())
            base(images, text)
            t = measure_interleaved({"base": lambda: base(images, text), "semla": semla, "official": official},
                                    device, reps=1 if args.quick else args.reps, warmup=0)
        rows.append({"batch": batch, "base_s": t["base"].median / batch, "semla_s": t["semla"].median / batch,
                     "official_s": t["official"].median / batch, "semla_over_base": paired_ratio(t["semla"], t["base"]),
                     "official_over_base": paired_ratio(t["official"], t["base"]),
                     "official_over_semla": paired_ratio(t["official"], t["semla"]), "max_logit_diff": diff})
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if k != "batch"), flush=True)
    at8 = rows[-1]["semla_over_base"]
    targets_met = [{"name": "semla_fused_over_base_batch8", "goal": f"<= {TARGET}x", "measured": fmt_x(at8),
                    "value": at8, "met": at8 <= TARGET}]
    print(table(rows, [("batch", "batch", None), ("base_s", "base / image", fmt_s), ("semla_s", "SemLA / image", fmt_s),
                       ("official_s", "official / image", fmt_s), ("semla_over_base", "SemLA / base", fmt_x),
                       ("official_over_base", "official / base", fmt_x),
                       ("official_over_semla", "official / SemLA", fmt_x),
                       ("max_logit_diff", "max |SemLA - official|", lambda v: f"{v:.1e}")],
                title=f"CAT-Seg ({cfg.variant}) {cfg.image_size} px, {len(CLASSES)} classes, {LIBRARY_SIZE} adapters on "
                      f"{len(targets)} targets ({len(acting_targets(targets))} act), K={K}, {device}"))
    print(target_lines(targets_met))
    write_json(args.json, payload("catseg", device, args.quick, rows, targets_met,
                                  model={"variant": cfg.variant, "image_size": cfg.image_size,
                                         "targets": len(targets), "acting": len(acting_targets(targets))}))


if __name__ == "__main__":
    main()
