"""Golden outputs of the official CAT-Seg, for tests/test_catseg.py.

    python tests/golden/make_catseg_golden.py OFFICIAL_CHECKOUT [--variants B L] [--out DIR] [--checkpoint-dir DIR]

OFFICIAL_CHECKOUT is a checkout of rezaqorbani/SemLA: the CAT-Seg in its catseg/ folder, whose attention has the
q/k/v Linear modules the official LoRA targets name. The official modules are imported from it at run time
(never copied); detectron2, which is not installable here, is replaced by stubs of the few names the model
imports, and `clip.load` by a constructor (no download).

For each reduced configuration (semla_lab CATSegConfig.reduced): the weights are semla_lab's seeded
`build_catseg(cfg, SEED)` state dict written in the official key layout (optionally saved as a detectron2
checkpoint, `{"model": state}`, under --checkpoint-dir) and loaded strictly into the official model. Recorded:
the CLIP tokens of the prompts; the head's logits for a batch of two images; the official scores (sigmoid,
postprocessed) with and without the sliding window; per image, the logits under peft
`add_weighted_adapter(combination_type="cat")` of two seeded random adapters on the official LoRA targets (the
text cache reset before each image); and, per official target, whether a LoRA on it alone changes the logits.
The official `clip.load` rounds CLIP's matrices to fp16 before the checkpoint overwrites them; here the
complete state dict is loaded after construction, so no rounding is involved. The fixture holds seeds and
outputs only: catseg_<variant>.json, catseg_<variant>.safetensors (inputs,
logits) and catseg_<variant>_scores.safetensors (official scores), each well under 1 MB.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from semla_lab.models.catseg import CATSegConfig, build_catseg
from semla_lab.models.catseg.checkpoint import official_state_dict
from semla_lab.models.catseg.model import prompts
from semla_lab.models.catseg.targets import lora_targets, random_lora_state

HERE = Path(__file__).parent
SEED = 0
ADAPTER_SEEDS = (1, 2)
ADAPTER_WEIGHTS = ((0.7, 0.3), (0.2, 0.8))      # per image
RANK, ALPHA = 8, 16
CLASSES = ["road", "sky, heaven", "car"]
INERT_BELOW = 1e-5          # a LoRA that is never called changes nothing; the rest is float noise (MKL may
                            # sum in another order from one allocation to the next)
IMAGE_SIZE = (100, 150)                          # above 96 px: the official postprocess crop is a no-op


def images() -> torch.Tensor:
    """Two fixed uint8 RGB images (2, 3, 100, 150): smooth gradients plus seeded noise."""
    g = torch.Generator().manual_seed(123)
    h, w = IMAGE_SIZE
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, 1 - yy * xx]) * 200
    out = [base + 40 * torch.rand(3, h, w, generator=g), base.flip(-1) + 40 * torch.rand(3, h, w, generator=g)]
    return torch.stack(out).clamp(0, 255).to(torch.uint8)


# ---- the official modules, with detectron2 stubbed -------------------------------------------------------
def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class ImageList:
    """detectron2.structures.ImageList.from_tensors: zero-pad a list of (C, H, W) to one batch whose sides are
    multiples of size_divisibility; image_sizes keeps each unpadded size."""

    def __init__(self, tensor, image_sizes):
        self.tensor, self.image_sizes = tensor, image_sizes

    @staticmethod
    def from_tensors(tensors, size_divisibility=0, pad_value=0.0):
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        H, W = (max(s[i] for s in sizes) for i in (0, 1))
        if size_divisibility > 1:
            H, W = (-(-H // size_divisibility) * size_divisibility, -(-W // size_divisibility) * size_divisibility)
        batch = torch.stack([F.pad(t, (0, W - t.shape[-1], 0, H - t.shape[-2]), value=pad_value) for t in tensors])
        return ImageList(batch, sizes)


def sem_seg_postprocess(result, img_size, output_height, output_width):
    """detectron2.modeling.postprocessing.sem_seg_postprocess: crop to the input size, resize to the output."""
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]


def import_official(checkout: Path):
    root = checkout / "catseg" / "cat_seg" if (checkout / "catseg").exists() else checkout / "cat_seg"
    registry = types.SimpleNamespace(register=lambda *a, **k: (lambda obj: obj))
    _module("detectron2")
    _module("detectron2.config", configurable=lambda f: f, CfgNode=dict)
    _module("detectron2.layers", Conv2d=torch.nn.Conv2d, ShapeSpec=object, get_norm=None)
    _module("detectron2.modeling", META_ARCH_REGISTRY=registry, SEM_SEG_HEADS_REGISTRY=registry,
            build_backbone=None, build_sem_seg_head=None)
    _module("detectron2.modeling.backbone", Backbone=torch.nn.Module)
    _module("detectron2.modeling.postprocessing", sem_seg_postprocess=sem_seg_postprocess)
    _module("detectron2.structures", ImageList=ImageList)
    _module("detectron2.data", MetadataCatalog=None)
    _module("detectron2.utils")
    _module("detectron2.utils.memory", _ignore_torch_cuda_oom=None)
    _module("fvcore")
    _module("fvcore.nn", weight_init=None)
    _module("fvcore.nn.weight_init")
    for pkg, folder in [("cat_seg", root), ("cat_seg.modeling", root / "modeling"),
                        ("cat_seg.modeling.transformer", root / "modeling" / "transformer"),
                        ("cat_seg.modeling.heads", root / "modeling" / "heads"),
                        ("cat_seg.third_party", root / "third_party")]:
        _module(pkg, __path__=[str(folder)])

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    ns = types.SimpleNamespace()
    ns.clip = load("cat_seg.third_party.clip", root / "third_party" / "clip.py")
    ns.model_vpt = sys.modules["cat_seg.third_party.model_vpt"]
    ns.predictor = load("cat_seg.modeling.transformer.cat_seg_predictor",
                        root / "modeling" / "transformer" / "cat_seg_predictor.py")
    ns.head = load("cat_seg.modeling.heads.cat_seg_head", root / "modeling" / "heads" / "cat_seg_head.py")
    ns.meta = load("cat_seg.cat_seg_model", root / "cat_seg_model.py")
    return ns


def official_model(ns, cfg: CATSegConfig, tmp: Path):
    """The official CATSeg meta-architecture for `cfg`, built as its configs do (weights still unset)."""
    def fake_load(name, device=None, jit=False, prompt_depth=0, prompt_length=0):
        clip = ns.model_vpt.CLIP(cfg.embed_dim, cfg.clip_size, cfg.vision_layers, cfg.vision_width, cfg.patch_size,
                                 cfg.context_length, cfg.vocab_size, cfg.text_width, cfg.text_heads, cfg.text_layers)
        for p in clip.parameters():
            p.data.zero_()
        return clip, None

    ns.clip.load = fake_load
    classes = tmp / "classes.json"
    classes.write_text(json.dumps(CLASSES))
    name = "ViT-B/16" if cfg.variant == "B" else "ViT-L/14@336px"
    predictor = ns.predictor.CATSegPredictor(
        train_class_json=str(classes), test_class_json=str(classes), clip_pretrained=name,
        prompt_ensemble_type="single", text_guidance_dim=cfg.embed_dim,
        text_guidance_proj_dim=cfg.text_guidance_proj_dim, appearance_guidance_dim=cfg.embed_dim,
        appearance_guidance_proj_dim=cfg.appearance_guidance_proj_dim, prompt_depth=0, prompt_length=0,
        decoder_dims=list(cfg.decoder_dims), decoder_guidance_dims=list(cfg.decoder_guidance_dims),
        decoder_guidance_proj_dims=list(cfg.decoder_guidance_proj_dims), num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, hidden_dims=cfg.hidden_dim, pooling_sizes=list(cfg.pooling_size),
        feature_resolution=[cfg.feature_resolution] * 2, window_sizes=cfg.window_size, attention_type="linear")
    head = ns.head.CATSegHead(num_classes=len(CLASSES), ignore_value=255,
                              feature_resolution=[cfg.feature_resolution] * 2, transformer_predictor=predictor)
    model = ns.meta.CATSeg(
        backbone=None, sem_seg_head=head, size_divisibility=32, pixel_mean=[123.675, 116.280, 103.530],
        pixel_std=[58.395, 57.120, 57.375], clip_pixel_mean=[122.7709383, 116.7460125, 104.09373615],
        clip_pixel_std=[68.5005327, 66.6321579, 70.3231630], train_class_json=str(classes),
        test_class_json=str(classes), sliding_window=False, clip_finetune="attention", backbone_multiplier=0.0,
        clip_pretrained=name)
    # CATSeg hard-codes the in-channels of upsample1/2 for the full CLIPs; a reduced CLIP is narrower
    model.upsample1 = torch.nn.ConvTranspose2d(cfg.proj_dim, cfg.decoder_guidance_dims[0], kernel_size=2, stride=2)
    model.upsample2 = torch.nn.ConvTranspose2d(cfg.proj_dim, cfg.decoder_guidance_dims[1], kernel_size=4, stride=4)
    return model.eval()


# ---- running it ------------------------------------------------------------------------------------------
def run(model, imgs, sliding=False):
    """The official eval forward on a batch: (head logits (B, T, 96, 96), sem_seg of image 0 (T, H, W))."""
    captured = []
    handle = model.sem_seg_head.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    model.sem_seg_head.predictor.cache = None                 # the official eval caches text for good
    model.sliding_window = sliding
    try:
        with torch.no_grad():
            out = model([{"image": im, "height": im.shape[-2], "width": im.shape[-1]} for im in imgs])
    finally:
        handle.remove()
    return captured[0], out[0]["sem_seg"]


def fused_logits(peft_model, imgs):
    """The official SemLA per-image path: add_weighted_adapter(cat), set it, forward, delete; per image."""
    rows = []
    for img, weights in zip(imgs, ADAPTER_WEIGHTS):
        peft_model.add_weighted_adapter(["a0", "a1"], list(weights), "merged", combination_type="cat")
        peft_model.set_adapter("merged")
        rows.append(run(peft_model.base_model.model, img[None])[0])
        peft_model.delete_adapter("merged")
    return torch.cat(rows)


def liveness(new_model, imgs, targets):
    """Max |logit change| on the first image with a random LoRA on each target alone (0.0: inert)."""
    from peft import LoraConfig, get_peft_model
    base = run(new_model(), imgs[:1])[0]         # the same batch as below: batching changes the last bits
    change = {}
    for name in targets:
        torch.manual_seed(0)
        peft_model = get_peft_model(new_model(), LoraConfig(r=4, lora_alpha=4, target_modules=[name],
                                                            init_lora_weights=False))
        change[name] = float((run(peft_model.base_model.model, imgs[:1])[0] - base).abs().max())
    return change


def make(ns, variant: str, out: Path, checkpoint_dir: Path | None, with_liveness: bool) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    cfg = CATSegConfig.reduced(variant)
    ours = build_catseg(cfg, SEED)
    state = official_state_dict(ours)    # SemLA's layout: with the tied q/k/v duplicates

    def new_model():      # a fresh one each time: the official hooks of a deepcopy feed the original's list
        with tempfile.TemporaryDirectory() as tmp:
            model = official_model(ns, cfg, Path(tmp))
        differ = set(model.state_dict()) ^ set(state)
        assert not differ, f"key layouts differ: {sorted(differ)[:5]}"
        model.load_state_dict(state, strict=True)
        return model

    model = new_model()
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict()}, checkpoint_dir / f"catseg_{variant}_reduced.pth")

    imgs = images()
    tokens = ns.clip.tokenize(prompts(CLASSES))
    logits, scores = run(model, imgs)
    _, scores_sliding = run(model, imgs[:1], sliding=True)

    targets = lora_targets(ours)
    peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(new_model(), peft_cfg, adapter_name="a0")
    peft_model.add_adapter("a1", peft_cfg)
    for name, seed in zip(("a0", "a1"), ADAPTER_SEEDS):
        result = set_peft_model_state_dict(peft_model, random_lora_state(ours, targets, RANK, seed), adapter_name=name)
        assert not [k for k in result.unexpected_keys if "lora_" in k], result.unexpected_keys
    peft_model.eval()
    fused = fused_logits(peft_model, imgs)

    meta = {"variant": variant, "config": "CATSegConfig.reduced", "seed": SEED, "classes": CLASSES,
            "adapter_seeds": list(ADAPTER_SEEDS), "adapter_weights": [list(w) for w in ADAPTER_WEIGHTS],
            "rank": RANK, "alpha": ALPHA, "targets": len(targets),
            "peft": __import__("peft").__version__, "torch": torch.__version__}
    if with_liveness:
        change = liveness(new_model, imgs, targets)
        meta["acting_targets"] = sorted(n for n, c in change.items() if c > INERT_BELOW)
        meta["inert_targets"] = sorted(n for n, c in change.items() if c <= INERT_BELOW)
        meta["largest_inert_change"] = max([c for c in change.values() if c <= INERT_BELOW], default=None)
        meta["smallest_acting_change"] = min(c for c in change.values() if c > INERT_BELOW)
    tensors = {"images": imgs, "tokens": tokens.to(torch.int32), "logits": logits, "fused_logits": fused}
    scores = {"scores": scores, "scores_sliding": scores_sliding}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"catseg_{variant}.safetensors"))
    save_file({k: v.contiguous() for k, v in scores.items()}, str(out / f"catseg_{variant}_scores.safetensors"))
    tensors.update(scores)
    (out / f"catseg_{variant}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(variant, {k: tuple(v.shape) for k, v in tensors.items()},
          f"acting {len(meta.get('acting_targets', []))} / {len(targets)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkout", type=Path)
    p.add_argument("--variants", nargs="+", default=["B", "L"])
    p.add_argument("--out", type=Path, default=HERE, help="fixture folder (default: tests/golden)")
    p.add_argument("--checkpoint-dir", type=Path, help="also write each reduced model as a detectron2 checkpoint")
    p.add_argument("--no-liveness", action="store_true", help="skip the per-target liveness sweep (slow)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ns = import_official(args.checkout)
    for variant in args.variants:
        make(ns, variant, args.out, args.checkpoint_dir, not args.no_liveness)


if __name__ == "__main__":
    main()
