"""LoRA from scratch (semla_lab.models.lora) against peft, merging, and the helpers of notebooks 02-03."""
import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from semla_lab.models.lora import (LoRALinear, describe_adapter, load_adapter, load_peft_factors,
                            lora_output_change, parameter_counts)
from semla_lab.models.segmenter import LiveAttention


class _Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("r, alpha, bias", [(1, 1, True), (4, 8, False), (8, 16, True)])
def test_lora_linear_equals_peft_lora_for_random_factors(r, alpha, bias):
    torch.manual_seed(r)
    base = nn.Linear(24, 40, bias=bias)
    peft_model = get_peft_model(_Wrap(copy.deepcopy(base)),
                                LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], init_lora_weights=False))
    ours = load_peft_factors(LoRALinear(copy.deepcopy(base), r, alpha), peft_model.base_model.model.lin)
    assert ours.lora_B.abs().sum() > 0                                  # non-trivial update
    x = torch.randn(5, 7, 24)
    with torch.no_grad():
        assert torch.allclose(ours(x), peft_model(x), atol=1e-6)
        assert not torch.allclose(ours(x), base(x), atol=1e-4)


def test_merge_equals_forward_and_zero_b_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert torch.equal(lora.lora_B, torch.zeros(12, 4))             # fresh adapter = base layer
        assert torch.allclose(lora(x), base(x), atol=0)
        lora.lora_B.normal_()
        merged = nn.functional.linear(x, lora.merge(), base.bias)
        assert torch.allclose(merged, lora(x), atol=1e-5)
        assert not torch.allclose(lora(x), base(x), atol=1e-3)


def test_only_lora_factors_train_and_init_matches_peft_shapes():
    lora = LoRALinear(nn.Linear(10, 3), r=2, alpha=4)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert lora.lora_A.shape == (2, 10) and lora.lora_B.shape == (3, 2) and lora.scaling == 2.0
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(10, 3), r=0)


def test_load_peft_factors_rejects_mismatched_rank():
    peft_model = get_peft_model(_Wrap(nn.Linear(8, 8)), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"]))
    with pytest.raises(ValueError, match="do not fit"):
        load_peft_factors(LoRALinear(nn.Linear(8, 8), r=4, alpha=4), peft_model.base_model.model.lin)


def test_parameter_counts_of_the_tiny_segmenter(tiny_segmenter):
    counts = parameter_counts(tiny_segmenter, r=8)
    width, layers = 96, 4                     # semla-tiny-clip: in_proj 96->288, out_proj 96->96, mlp 96<->384
    per_block = 8 * ((96 + 288) + (96 + 96) + (96 + 384) + (384 + 96))
    assert counts["targets"] == 4 * layers
    assert counts["lora"] == layers * per_block
    assert counts["target_weights"] == layers * width * (288 + 96 + 384 + 384)
    assert counts["lora"] < counts["target_weights"] < counts["model"]


def test_lora_on_multihead_attention_out_proj_is_dead_and_live_attention_fixes_it():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    assert lora_output_change(mha, (x, x, x), ["out_proj"]) == 0.0
    assert lora_output_change(LiveAttention(mha), (x, x, x), ["out_proj"]) > 1e-3


def test_describe_load_and_transfer_a_saved_adapter(tmp_path, tiny_segmenter, tiny_clip_random):
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny_segmenter), LoraConfig(
        r=2, lora_alpha=4, target_modules=r".*resblocks\.0\.attn\.out_proj", init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    info = describe_adapter(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(info["files"])
    assert info["modules"] == 1 and info["tensors"] == 2 and info["parameters"] == 2 * (96 + 96)
    assert info["config"]["r"] == 2
    x, text = torch.rand(1, 3, 64, 64), nn.functional.normalize(torch.randn(3, 64), dim=-1)
    with torch.no_grad():
        assert torch.allclose(load_adapter(tiny_segmenter, tmp_path)(x, text), model(x, text), atol=1e-5)
    from semla_lab.evaluation.transfer import adapter_transfer
    table = adapter_transfer(tiny_segmenter, tiny_clip_random, tmp_path, ["cityscapes"], max_images=2)
    assert list(table.columns) == ["zero_shot", "adapted", "gain"] and list(table.index) == ["cityscapes"]
    from semla_lab.evaluation.scoring import evaluate_model
    from semla_lab.data.world.generate import generate, get_domain
    data = generate(get_domain("cityscapes"), "test", 2)
    zero_shot = evaluate_model(tiny_segmenter, tiny_clip_random, data)
    adapted = evaluate_model(model, tiny_clip_random, data)
    assert abs(adapted - zero_shot) > 0.01, "the adapter must change the predictions"
    row = table.loc["cityscapes"]
    assert (row["zero_shot"], row["adapted"], row["gain"]) == pytest.approx((zero_shot, adapted, adapted - zero_shot))


def test_target_liveness_of_raw_open_clip_blocks_vs_the_segmenter(tiny_clip_random, tiny_segmenter):
    from semla_lab.models.lora import target_liveness
    x = torch.rand(1, 3, 64, 64)
    raw = target_liveness(tiny_clip_random.model.visual, (x,), ["transformer.resblocks.0.attn.out_proj",
                                                                  "transformer.resblocks.0.attn.in_proj",
                                                                  "transformer.resblocks.0.mlp.c_fc"])
    assert raw["transformer.resblocks.0.attn.out_proj"] == 0.0
    assert raw["transformer.resblocks.0.attn.in_proj"] is None
    assert raw["transformer.resblocks.0.mlp.c_fc"] > 1e-4
    text = nn.functional.normalize(torch.randn(2, 64), dim=-1)
    live = target_liveness(tiny_segmenter, (x, text), ["visual.transformer.resblocks.0.attn.out_proj",
                                                       "visual.transformer.resblocks.0.attn.in_proj"])
    assert all(v > 1e-4 for v in live.values())


def test_notebook_plot_helpers_draw_what_they_are_given():
    import matplotlib.pyplot as plt
    from semla_lab.evaluation import plots
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    fig = plots.image_grid({"a": [img, img.float() / 255], "b": [img]}, col_titles=["x", "y"])
    assert len(fig.axes) == 4 and fig.axes[0].get_title() == "x"
    fig2 = plots.domain_bars({"source": 40.0, "nyu": 20.0}, highlight=("source",))
    bars = fig2.axes[0].patches
    assert [b.get_height() for b in bars] == [40.0, 20.0] and bars[0].get_facecolor() != bars[1].get_facecolor()
    mask = torch.zeros(16, 16, dtype=torch.long)
    fig3 = plots.prediction_grid([("d1", img, {"gt": mask, "pred": mask}), ("d2", img, {"gt": mask, "pred": mask})])
    assert len(fig3.axes) == 6 and [ax.get_title() for ax in fig3.axes[:3]] == ["image", "gt", "pred"]
    plt.close("all")


def test_a_missing_adapter_folder_is_refused_not_looked_up_on_the_hub(tmp_path, tiny_segmenter, monkeypatch):
    from semla_lab.core.errors import MissingFileError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")              # old code took the name for a Hub id
    for missing in ("some-org/some-adapter", tmp_path / "gone"):
        with pytest.raises(MissingFileError, match="no adapter at .*adapter_config.json"):
            load_adapter(tiny_segmenter, missing)
