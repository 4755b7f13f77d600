"""Per-image fusion in layers whose images are not one row each along the first axis (fusion_layout.py):
a sequence-first tower and a class-folded batch, each image with its own adapters, equal peft's per-image path."""
import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from semla_lab.core.fusion import FusedAdapters, peft_weighted_forward
from semla_lab.core.fusion_layout import group_by_image

NAMES = ["a0", "a1", "a2", "a3"]
AXES = {"seq": 1, "rows": 0}


class SequenceFirstToy(nn.Module):
    """x (B, T, L, D) -> (B, T, L, D) through a sequence-first layer that sees (L, B*T, D) and a layer that sees
    (B*T, L, D): image b owns T consecutive columns, then T consecutive rows."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.seq, self.rows = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B, T, L, D = x.shape
        h = torch.tanh(self.seq(x.permute(2, 0, 1, 3).reshape(L, B * T, D)))              # (L, B*T, D)
        h = h.reshape(L, B, T, D).permute(1, 2, 0, 3).reshape(B * T, L, D)
        return self.rows(h).reshape(B, T, L, D)


@pytest.fixture(scope="module", params=[8, 64], ids=["merged per image", "low-rank"])
def setup(request):
    """Width 8: each image's rows outnumber in*out/(in+out), so the grouped layers merge each image's weight;
    width 64: they add the low-rank terms."""
    torch.manual_seed(0)
    base = SequenceFirstToy(request.param).eval()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(AXES), init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=NAMES[0])
    for n in NAMES[1:]:
        peft_model.add_adapter(n, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    states = {n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in NAMES}
    return base, peft_model.eval(), states


@pytest.mark.parametrize("grouped", [True, False])
def test_each_image_gets_its_own_adapters_in_every_layout(setup, grouped):
    base, peft_model, states = setup
    model = copy.deepcopy(base)
    fused = FusedAdapters(model, {n: (s, 2.0) for n, s in states.items()})
    if grouped:
        group_by_image(fused, lambda path: AXES[path])
    x = torch.randn(3, 5, 4, base.seq.in_features, generator=torch.Generator().manual_seed(1))
    choices = [(["a0", "a1"], [0.7, 0.3]), (["a2", "a3"], [0.1, 0.9]), (["a3", "a1"], [0.5, 0.5])]
    idx = torch.stack([fused.index(n) for n, _ in choices])
    w = torch.tensor([ws for _, ws in choices])
    ref = torch.cat([peft_weighted_forward(peft_model, n, ws, x[i:i + 1]) for i, (n, ws) in enumerate(choices)])
    if not grouped:    # the plain fused layers cannot tell the images apart in these layouts
        with pytest.raises(AssertionError), fused.select(idx, w), torch.no_grad():
            model(x)
        return
    with fused.select(idx, w), torch.no_grad():
        out = model(x)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    with torch.no_grad():
        assert torch.equal(model(x), base(x)), "outside a selection the grouped layers are the base layers"
        assert (out - base(x)).abs().max() > 1e-2, "the adapters must change the output"
