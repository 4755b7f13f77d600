"""CLIP loading paths, embeddings, the OV segmenter, and live LoRA targets."""
import copy
import pickle
import re

import open_clip
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from semla_lab.models.clip import ClipLoadError, embed_class_names, embed_images, load_clip, load_state_dict_file
from semla_lab.models.segmenter import LORA_TARGETS, LiveAttention, build_segmenter


def test_unknown_model_and_offline_tag_give_actionable_errors():
    with pytest.raises(ClipLoadError, match="unknown open_clip model"):
        load_clip("ViT-Nope-99")
    with pytest.raises(ClipLoadError, match="checkpoint="):
        load_clip("RN50", pretrained="openai")          # HF_HUB_OFFLINE=1 in conftest: fails fast


def test_local_checkpoint_safetensors_and_weights_only(tmp_path, tiny_clip_random):
    state = tiny_clip_random.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    images = torch.rand(2, 3, 64, 64)
    ref = embed_images(tiny_clip_random, images)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        clip = load_clip(checkpoint=path, device="cpu")
        assert torch.allclose(embed_images(clip, images), ref, atol=1e-6)
    with pytest.raises(ClipLoadError, match="does not fit"):
        save_file({"bogus": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        load_clip(checkpoint=tmp_path / "bad.safetensors")


class Payload:
    def __reduce__(self):
        return (open, ("/tmp/semla_pwned_by_pickle", "w"))


def test_pickled_checkpoint_with_payload_is_refused_unexecuted(tmp_path):
    import os
    marker = "/tmp/semla_pwned_by_pickle"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    with pytest.raises(ClipLoadError, match="weights_only"):
        load_state_dict_file(path)
    assert not os.path.exists(marker)


def test_shipped_tiny_clip_loads_and_embeds_deterministically():
    clip = load_clip(device="cpu")
    x = torch.rand(5, 3, 64, 64)
    a, b = embed_images(clip, x), embed_images(clip, x, batch_size=2)
    assert a.shape == (5, clip.embed_dim) and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-5)
    raw = embed_images(clip, x, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5), atol=1e-3)
    t = embed_class_names(clip, ["road", "car", "sky"])
    assert t.shape == (3, clip.embed_dim)


@pytest.mark.parametrize("num_classes", [1, 7, 23])
def test_segmenter_shapes_any_class_count(tiny_segmenter, num_classes):
    text = torch.nn.functional.normalize(torch.randn(num_classes, 64), dim=-1)
    with torch.no_grad():
        out = tiny_segmenter(torch.rand(2, 3, 64, 64), text)
        big = tiny_segmenter(torch.rand(1, 3, 96, 80), text)
    assert out.shape == (2, num_classes, 64, 64)
    assert big.shape == (1, num_classes, 96, 80)


def test_live_attention_equals_multihead_attention():
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    live = LiveAttention(mha)
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        assert torch.allclose(live(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6)


def _target_names(model):
    return [n for n, _ in model.named_modules() if re.fullmatch(LORA_TARGETS, n)]


def test_every_lora_target_is_live(tiny_segmenter):
    """A LoRA with non-zero B on any single targeted module must change the output (open_clip's
    nn.MultiheadAttention would silently ignore a LoRA on out_proj)."""
    names = _target_names(tiny_segmenter)
    assert len(names) == 4 * len(tiny_segmenter.visual.transformer.resblocks)
    x, text = torch.rand(1, 3, 64, 64), torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    with torch.no_grad():
        base = tiny_segmenter(x, text)
    for name in names:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(tiny_segmenter),
                               LoraConfig(r=2, lora_alpha=2, target_modules=[name], init_lora_weights=False))
        with torch.no_grad():
            assert (model(x, text) - base).abs().max() > 1e-4, f"LoRA on {name} has no effect"


def _class_token_equals_open_clip(seg, size):
    """Our public-attribute token path, class token through ln_post and proj == open_clip's own visual(x)."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    v = seg.visual.eval()
    with torch.no_grad():
        ours = v.ln_post(seg.transformer_tokens(x)[:, 0]) @ v.proj
        stock = v((x - seg.mean) / seg.std)
    assert ours.shape == stock.shape and stock.abs().max() > 0.1
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()


def test_dense_features_use_the_stock_open_clip_embedding(tiny_segmenter):
    _class_token_equals_open_clip(tiny_segmenter, 64)
    assert tiny_segmenter.dense_features(torch.rand(1, 3, 64, 64)).shape == (1, 64, 8, 8)


@pytest.mark.parametrize("arch, layers, width", [("ViT-B-16", 12, 768)])
def test_real_architecture_builds_with_the_same_targets(arch, layers, width):
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    seg = build_segmenter(model)
    names = _target_names(seg)
    assert len(names) == 4 * layers
    assert seg.visual.transformer.resblocks[0].attn.in_proj.in_features == width
    with torch.no_grad():
        out = seg(torch.rand(1, 3, 64, 64), torch.nn.functional.normalize(torch.randn(4, 512), dim=-1))
    assert out.shape == (1, 4, 64, 64)
    _class_token_equals_open_clip(seg, 224)


def test_resolve_device_names_a_device_this_machine_lacks(monkeypatch):
    from semla_lab.core.runtime import resolve_device
    monkeypatch.delenv("SEMLA_DEVICE", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'cdua' is not a torch device"):
        resolve_device("cdua")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu"), "the default falls back to the CPU"
    with pytest.raises(ValueError, match=r"device 'cuda:1' asks for CUDA, but .* sees no GPU"):
        resolve_device("cuda:1")
    monkeypatch.setenv("SEMLA_DEVICE", "cuda")
    with pytest.raises(ValueError, match=r"\$SEMLA_DEVICE 'cuda'"):
        resolve_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        resolve_device("cuda:1")
