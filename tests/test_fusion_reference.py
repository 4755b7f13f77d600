"""fusion_reference.py: dW by hand, and the package's and peft's per-layer deltas agree with it."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from semla_lab.core.fusion_reference import (fuse_by_hand, fused_layer_delta, linear_cross_terms, lora_factors,
                                             lora_modules, peft_layer_delta)
from semla_lab.core.fusion import FusedAdapters
from semla_lab.models.segmenter import LORA_TARGETS


def _factors(k=3, r=2, d_in=5, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(r, d_in, generator=g) for _ in range(k)],
            [torch.randn(d_out, r, generator=g) for _ in range(k)])


def test_fuse_by_hand_and_linear_cross_terms():
    As, Bs = _factors()
    w, s = [0.5, 0.3, 0.2], 2.0
    cat = fuse_by_hand(As, Bs, w, s)
    loop = sum(wi * s * B.double() @ A.double() for wi, A, B in zip(w, As, Bs))
    assert torch.allclose(cat, loop)
    parts = linear_cross_terms(As, Bs, w, s)
    assert torch.allclose(parts["diagonal"], cat)
    assert torch.allclose(parts["linear"], fuse_by_hand(As, Bs, w, s, "linear"))
    explicit = sum((w[i] * w[j]) ** 0.5 * s * Bs[i].double() @ As[j].double()
                   for i in range(3) for j in range(3) if i != j)
    assert torch.allclose(parts["cross"], explicit)
    assert parts["cross"].norm() > 0.1 * cat.norm()
    one = linear_cross_terms(As[:1], Bs[:1], [1.0], s)         # a single adapter: no cross terms
    assert torch.count_nonzero(one["cross"]) == 0
    with pytest.raises(ValueError):
        fuse_by_hand(As, Bs, w, s, "svd")


@pytest.fixture(scope="module")
def lora_setup(tiny_segmenter):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    names = ["a0", "a1", "a2"]
    peft_model = get_peft_model(copy.deepcopy(tiny_segmenter), cfg, adapter_name=names[0])
    for n in names[1:]:
        peft_model.add_adapter(n, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval()
    states = {n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in names}
    fused = FusedAdapters(copy.deepcopy(tiny_segmenter), {n: (states[n], 2.0) for n in names})
    return peft_model, fused, states, names


@pytest.mark.parametrize("fusion", ["cat", "linear"])
def test_hand_package_and_peft_deltas_agree(lora_setup, fusion):
    peft_model, fused, states, names = lora_setup
    modules = lora_modules(states["a0"])
    assert modules == fused.modules
    module = "visual.transformer.resblocks.0.attn.out_proj"
    assert module in modules
    order, w = ["a2", "a0"], [0.8, 0.2]
    As, Bs = zip(*(lora_factors(states[n], module) for n in order))
    hand = fuse_by_hand(As, Bs, w, 2.0, fusion).float()
    ours = fused_layer_delta(fused, module, fused.index(order).tolist(), w, fusion)
    theirs = peft_layer_delta(peft_model, order, w, module, fusion)
    assert hand.shape == ours.shape == theirs.shape
    assert torch.allclose(ours, hand, atol=1e-5) and torch.allclose(theirs, hand, atol=1e-5)
    assert "_probe" not in peft_model.peft_config
    with pytest.raises(KeyError):
        lora_factors(states["a0"], "visual.no_such_layer")
