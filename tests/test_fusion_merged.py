"""Per-image fusion by merged weights (fusion_merged.py): for layers that see many rows per image, each image
with its own adapters, both paths equal peft's per-image path."""
import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from semla_lab.core.fusion import FusedAdapters, peft_weighted_forward
from semla_lab.core.fusion_merged import MergedPerImageLinear, merge_where_cheaper

NAMES = ["a0", "a1", "a2", "a3"]


class ClassFoldedToy(nn.Module):
    """x (B, T, L, D) -> (B, T, L, D): one layer sees (B, T*L, D), the next (B*T, L, D), image b owning T rows."""

    def __init__(self, d: int):
        super().__init__()
        self.tokens, self.rows = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B, T, L, D = x.shape
        h = torch.tanh(self.tokens(x.reshape(B, T * L, D)))
        return self.rows(h.reshape(B * T, L, D)).reshape(B, T, L, D)


@pytest.fixture(scope="module", params=[8, 64], ids=["merged", "low-rank"])
def setup(request):
    """Width 8: each image's 20 rows outnumber in*out/(in+out) = 4, so the layers merge per image; width 64
    (threshold 32): they add the low-rank terms."""
    torch.manual_seed(0)
    base = ClassFoldedToy(request.param).eval()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["tokens", "rows"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=NAMES[0])
    for n in NAMES[1:]:
        peft_model.add_adapter(n, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    states = {n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in NAMES}
    return base, peft_model.eval(), states


def test_each_image_gets_its_own_adapters_on_both_paths(setup):
    base, peft_model, states = setup
    model = copy.deepcopy(base)
    fused = FusedAdapters(model, {n: (s, 2.0) for n, s in states.items()})
    merge_where_cheaper(fused)
    assert isinstance(model.rows, MergedPerImageLinear) and torch.equal(model.rows.weight, base.rows.weight)
    x = torch.randn(3, 5, 4, base.rows.in_features, generator=torch.Generator().manual_seed(1))
    choices = [(["a0", "a1"], [0.7, 0.3]), (["a2", "a3"], [0.1, 0.9]), (["a3", "a1"], [0.5, 0.5])]
    idx = torch.stack([fused.index(n) for n, _ in choices])
    w = torch.tensor([ws for _, ws in choices])
    ref = torch.cat([peft_weighted_forward(peft_model, n, ws, x[i:i + 1]) for i, (n, ws) in enumerate(choices)])
    with fused.select(idx, w), torch.no_grad():
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    with torch.no_grad():
        assert torch.equal(model(x), base(x)), "outside a selection the layers are the base layers"
        assert (out - base(x)).abs().max() > 1e-2, "the adapters must change the output"
