"""Adapter training recipe: source replay enters the loss, is deterministic and is required when asked for; the
saved update is `strength` times the trained one."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from semla_lab.core.errors import SemlaError
from semla_lab.training.train import AdapterConfig, Replay, train_adapter
from semla_lab.data.world.generate import generate, get_domain


def _data(name, n=8):
    d = generate(get_domain(name), "train", n)
    return d.images, d.labels


def _train(seg, tmp, cfg, replay=None):
    images, labels = _data("nyu")
    text = F.normalize(torch.randn(len(get_domain("nyu").class_names), 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    info = train_adapter(seg, text, images, labels, tmp, "base", cfg, "cpu", progress=False, replay=replay)
    return info, load_file(str(tmp / "adapter_model.safetensors"))


def test_replay_changes_the_adapter_deterministically(tmp_path, tiny_segmenter):
    images, labels = _data("source", 16)
    text = F.normalize(torch.randn(23, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    replay = Replay(images, labels, text)
    cfg = AdapterConfig(steps=3, batch=4, replay=4)
    info, with_replay = _train(tiny_segmenter, tmp_path / "a", cfg, replay)
    _, again = _train(tiny_segmenter, tmp_path / "b", cfg, replay)
    _, without = _train(tiny_segmenter, tmp_path / "c", AdapterConfig(steps=3, batch=4, replay=0))
    assert info["config"]["replay"] == 4
    assert all(torch.equal(with_replay[k], again[k]) for k in with_replay), "same seed, same adapter"
    assert any(not torch.allclose(with_replay[k], without[k]) for k in with_replay), "replay must enter the loss"


def test_replay_without_data_is_one_clear_error(tmp_path, tiny_segmenter):
    with pytest.raises(SemlaError, match=r"AdapterConfig.replay=4 needs replay data"):
        _train(tiny_segmenter, tmp_path, AdapterConfig(steps=1, batch=4, replay=4))


def test_strength_scales_the_saved_update_and_nothing_else(tmp_path, tiny_segmenter):
    full_cfg = AdapterConfig(steps=3, batch=4, replay=0, strength=1.0)
    _, full = _train(tiny_segmenter, tmp_path / "full", full_cfg)
    info, part = _train(tiny_segmenter, tmp_path / "part", AdapterConfig(steps=3, batch=4, replay=0, strength=0.9))
    assert info["config"]["strength"] == 0.9 and AdapterConfig().strength == 0.9
    b_keys = [k for k in full if "lora_B" in k]
    assert b_keys and all(torch.allclose(part[k], 0.9 * full[k]) for k in b_keys), "dW = B A scaled by the strength"
    assert all(torch.equal(part[k], full[k]) for k in full if "lora_B" not in k), "A (and r, alpha) untouched"
    assert any(full[k].abs().max() > 0 for k in b_keys), "the adapter learned something to scale"


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_strength_outside_zero_to_one_is_one_clear_error(strength):
    with pytest.raises(SemlaError, match=rf"AdapterConfig.strength must be in \(0, 1\], got {strength}"):
        AdapterConfig(strength=strength)
