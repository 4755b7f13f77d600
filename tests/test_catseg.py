"""CAT-Seg against the official code's outputs (tests/golden, made by make_catseg_golden.py from the official
modules with the same seeded weights), and its checkpoint loading."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from semla_lab.cli import main
from semla_lab.models.catseg import (
    CATSeg,
    CATSegConfig,
    CheckpointError,
    acting_targets,
    build_catseg,
    called_targets,
    catseg_scores,
    golden_differences,
    load_catseg,
    load_golden,
    lora_targets,
    stage_shapes,
)
from semla_lab.models.catseg.checkpoint import official_state_dict
from semla_lab.models.catseg.clip import ResidualAttentionBlock
from semla_lab.models.catseg.golden import golden_logits, golden_model
from semla_lab.models.catseg.model import prompts, tokenize

GOLDEN = Path(__file__).parent / "golden"
TOL = 1e-4


def fixture(variant: str):
    return load_golden(GOLDEN, variant)


@pytest.mark.parametrize("variant", ["B", "L"])
def test_logits_equal_the_official_model(variant):
    meta, t = fixture(variant)
    model = build_catseg(CATSegConfig.reduced(variant), meta["seed"])
    assert torch.equal(tokenize(prompts(meta["classes"])).int(), t["tokens"])
    diff = (golden_logits(model, t, meta["classes"]) - t["logits"]).abs().max()
    assert diff <= TOL, f"max |logit difference| {diff:.2e}"


@pytest.mark.parametrize("variant", ["B", "L"])
def test_per_image_fusion_equals_the_official_peft_path(variant):
    """Two images in one batch, each with its own adapter weights, against peft add_weighted_adapter(cat) run
    image by image on the official model."""
    meta, t = fixture(variant)
    model, fused = golden_model(meta)
    weights = torch.tensor(meta["adapter_weights"])
    with fused.select(torch.tensor([[0, 1]] * len(weights)), weights):
        out = golden_logits(model, t, meta["classes"])
    assert (t["fused_logits"] - t["logits"]).abs().max() > 100 * TOL      # the adapters matter
    diff = (out - t["fused_logits"]).abs().max()
    assert diff <= TOL, f"max |fused logit difference| {diff:.2e}"


@pytest.mark.parametrize("variant", ["B", "L"])
def test_golden_differences_measure_the_fixture(variant, monkeypatch):
    """The package's check (what notebook 09 runs) reports both differences within tolerance, and a large one
    once a layer of ours changes."""
    meta, t = fixture(variant)
    assert max(golden_differences(meta, t).values()) <= TOL
    monkeypatch.setattr(ResidualAttentionBlock, "forward_dense", ResidualAttentionBlock.forward)
    assert min(golden_differences(meta, t).values()) > 100 * TOL


def test_stage_shapes_follow_the_data_through_the_model():
    model = build_catseg(CATSegConfig.reduced("B"), seed=0)
    shapes = stage_shapes(model, torch.zeros(2, 3, 384, 384), ["road", "sky", "car"])
    assert shapes["dense CLIP tokens"] == (2, 1 + 24 * 24, 64)
    assert shapes["guidance block 2 tokens"] == (2, 1 + 24 * 24, 128)
    assert shapes["decoder guidance 1"] == (2, 256, 48, 48)
    assert shapes["cost volume (B*T, P, h, w)"] == (2 * 3, 1, 24, 24)
    assert shapes["aggregated cost (B, C, T, h, w)"] == (2, 32, 3, 24, 24)
    assert shapes["logits"] == (2, 3, 96, 96)
    assert not model.sem_seg_head.predictor.transformer.conv1._forward_hooks       # hooks removed


def test_called_targets_are_the_acting_ones():
    """A forward calls exactly the targets acting_targets names: CLIP's attn.{q,k,v}_proj never run."""
    model = build_catseg(CATSegConfig.reduced("B"), seed=0)
    targets = lora_targets(model)
    called = called_targets(model, targets, torch.zeros(1, 3, 384, 384), ["road", "sky"])
    assert called == acting_targets(targets) and len(called) < len(targets)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("variant", ["B", "L"])
def test_scores_equal_the_official_evaluation(variant):
    meta, t = fixture(variant)
    scores = load_file(str(GOLDEN / f"catseg_{variant}_scores.safetensors"))
    model = build_catseg(CATSegConfig.reduced(variant), meta["seed"])
    image = t["images"][0]
    for sliding, key in ((False, "scores"), (True, "scores_sliding")):
        ours = catseg_scores(model, image, meta["classes"], sliding_window=sliding, min_size=0)
        assert ours.shape == scores[key].shape
        assert (ours - scores[key]).abs().max() <= TOL, key


def test_inert_targets_are_those_of_the_official_model():
    """The official model never calls CLIP's attn.{q,k,v}_proj: a LoRA on all of them changes nothing, here
    as there; every other target acts, here as there."""
    from peft import LoraConfig, get_peft_model
    meta, t = fixture("B")
    model = build_catseg(CATSegConfig.reduced("B"), meta["seed"])
    targets = lora_targets(model)
    assert sorted(acting_targets(targets)) == meta["acting_targets"]
    inert = sorted(set(targets) - set(acting_targets(targets)))
    assert inert == meta["inert_targets"]
    base = golden_logits(model, t, meta["classes"])
    for names, acts in ((inert, False), (acting_targets(targets)[:1], True)):
        torch.manual_seed(0)
        peft_model = get_peft_model(build_catseg(CATSegConfig.reduced("B"), meta["seed"]),
                                    LoraConfig(r=4, lora_alpha=4, target_modules=names, init_lora_weights=False))
        change = (golden_logits(peft_model.base_model.model, t, meta["classes"]) - base).abs().max()
        assert (change > 0) == acts, (names[0], float(change))


@pytest.mark.parametrize("change", ["last block not dense", "official training guidance"])
def test_a_changed_layer_fails_the_comparison(change, monkeypatch):
    """The fixture catches a one-layer change: the last image block run as an ordinary block, or the second
    guidance map taken from the first guidance block (what the official training path does after peft)."""
    meta, t = fixture("B")
    if change == "last block not dense":
        monkeypatch.setattr(ResidualAttentionBlock, "forward_dense", ResidualAttentionBlock.forward)
    model = build_catseg(CATSegConfig.reduced("B"), meta["seed"])
    if change == "official training guidance":
        visual = model.clip_model.visual
        monkeypatch.setattr(visual, "forward", _duplicate_first_guidance(visual.forward))
    assert (golden_logits(model, t, meta["classes"]) - t["logits"]).abs().max() > 100 * TOL


def _duplicate_first_guidance(forward):
    def wrapped(images, guidance_layers):
        tokens, guidance = forward(images, guidance_layers)
        return tokens, [guidance[0], guidance[0]]
    return wrapped


@pytest.mark.parametrize("variant, keys, millions, targets, acting", [("B", 556, 154.3, 154, 82),
                                                                     ("L", 760, 433.7, 214, 106)])
def test_full_variants_have_the_official_structure(variant, keys, millions, targets, acting):
    """Key count (SemLA's layout), parameters and official LoRA targets of the full models, as measured on the
    official code (built on the meta device: no memory, no time)."""
    cfg = CATSegConfig.vit_b16() if variant == "B" else CATSegConfig.vit_l14()
    with torch.device("meta"):
        model = CATSeg(cfg)
    assert len(official_state_dict(model)) == keys
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    assert (len(lora_targets(model)), len(acting_targets(lora_targets(model)))) == (targets, acting)


# ---- checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reduced_b():
    return build_catseg(CATSegConfig.reduced("B"), seed=3)


@pytest.fixture(scope="module")
def checkpoint(reduced_b, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    torch.save({"model": official_state_dict(reduced_b, tied_duplicates=False), "iteration": 80000}, path)
    return path


def test_convert_catseg_writes_a_pickle_free_copy_that_loads_the_same_weights(checkpoint, reduced_b, tmp_path, capsys):
    out = tmp_path / "catseg_b.safetensors"
    assert main(["convert-catseg", str(checkpoint), "--out", str(out)]) == 0
    assert "CAT-Seg (B" in capsys.readouterr().out
    for path in (checkpoint, out):
        model = load_catseg(path)
        assert model.cfg == CATSegConfig.reduced("B")
        ref = reduced_b.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert load_catseg(out, semla_recipe=True).cfg.sliding_window


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def bad_checkpoints(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """The five kinds of bad file, with the words their error must contain."""
    state = torch.load(good, weights_only=True)["model"]
    made = {}
    truncated = folder / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    made["truncated"] = (truncated, "not a checkpoint")
    text = folder / "notes.pth"
    text.write_text("these are not weights\n")
    made["text"] = (text, "not a checkpoint")
    code = folder / "code.pth"
    code.write_bytes(pickle.dumps({"model": RunsCode()}))
    made["code"] = (code, "not a checkpoint")
    other = folder / "other_variant.pth"    # CAT-Seg (B) keys plus image blocks only a deeper variant has
    extra = {k.replace("resblocks.8.", "resblocks.9."): v for k, v in state.items() if "visual.transformer.resblocks.8." in k}
    torch.save({"model": {**state, **extra}}, other)
    made["wrong variant"] = (other, "unexpected key 'sem_seg_head.predictor.clip_model.visual.transformer.resblocks.9.")
    shape = folder / "bad_shape.pth"
    key = "sem_seg_head.predictor.transformer.conv1.weight"
    torch.save({"model": {**state, key: state[key][:, :, :3]}}, shape)
    made["wrong shape"] = (shape, f"key '{key}' has shape")
    return made


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_checkpoints_give_one_line_exit_2_and_write_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for kind, (path, words) in bad_checkpoints(checkpoint, tmp_path).items():
        out = tmp_path / f"{kind}.safetensors"
        assert main(["convert-catseg", str(path), "--out", str(out)]) == 2, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("semla-lab: error: ") and words in err, (kind, err)
        assert not out.exists(), kind
        with pytest.raises(CheckpointError):
            load_catseg(path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == []


def test_test_resize_follows_detectron2_resize_shortest_edge(reduced_b):
    from semla_lab.models.catseg.inference import test_resize_shape
    assert test_resize_shape(1024, 2048, 640, 2560) == (640, 1280)
    assert test_resize_shape(375, 500, 468, 500) == (375, 500)      # the longer side caps the scale
    assert test_resize_shape(480, 640, 0, 700) == (480, 640)        # min_size 0: no resize
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    scores = catseg_scores(reduced_b, image, ["road", "sky"], sliding_window=False, min_size=120, max_size=1000)
    assert scores.shape == (2, 50, 70) and 0 <= scores.min() and scores.max() <= 1
