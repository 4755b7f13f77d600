"""No hidden global state: loading, embedding, evaluating and the CLI leave the caller's logging,
environment, Hugging Face settings and models as they found them."""
import logging
import os

import pytest
import torch

from semla_lab import cli
from semla_lab.models.clip import try_load_clip
from semla_lab.models.clip import embed_class_names, embed_images, load_clip


@pytest.fixture
def user_logging():
    """A user's own logging setup (no handler yet: open_clip's logging.warning would add one), restored after
    the test."""
    root = logging.getLogger()
    level, handlers, disabled = root.level, list(root.handlers), logging.root.manager.disable
    root.handlers[:] = []
    logging.disable(logging.INFO)
    root.setLevel(logging.DEBUG)
    yield root
    logging.disable(disabled)
    root.setLevel(level)
    root.handlers[:] = handlers


def logging_state(root):
    return root.level, list(root.handlers), list(root.filters), logging.root.manager.disable


def test_load_clip_keeps_the_users_logging(user_logging):
    before = logging_state(user_logging)
    load_clip(pretrained="random", device="cpu")
    assert logging_state(user_logging) == before


def test_load_clip_mutes_only_open_clips_no_weights_line(caplog):
    with caplog.at_level(logging.WARNING):
        load_clip(pretrained="random", device="cpu")
        logging.warning("No pretrained weights loaded, said the user")
    assert [r.getMessage() for r in caplog.records] == ["No pretrained weights loaded, said the user"]


def test_try_load_clip_keeps_logging_and_hub_settings(user_logging):
    import huggingface_hub.constants as hub
    before, offline, env = logging_state(user_logging), hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    clip, msg = try_load_clip("ViT-B-16", pretrained="openai", device="cpu")   # not cached here
    assert clip is None and "could not load" in msg
    assert logging_state(user_logging) == before
    assert hub.HF_HUB_OFFLINE == offline and os.environ.get("HF_HUB_OFFLINE") == env
    import open_clip.pretrained
    assert getattr(open_clip.pretrained.hf_hub_download, "keywords", {}).get("local_files_only") is None


def test_embedding_leaves_the_model_where_it_is(tiny_clip_random):
    params = {n: p for n, p in tiny_clip_random.model.named_parameters()}
    state = {n: p.detach().clone() for n, p in params.items()}
    emb = embed_images(tiny_clip_random, torch.rand(2, 3, 32, 32))
    text = embed_class_names(tiny_clip_random, ["road", "sky"])
    assert emb.device.type == "cpu" and text.shape[0] == 2
    for n, p in tiny_clip_random.model.named_parameters():
        assert p is params[n] and p.device.type == "cpu" and torch.equal(p, state[n]), n


def test_evaluate_model_uses_the_models_device(tiny_clip_random, tiny_segmenter, monkeypatch):
    from semla_lab.evaluation.scoring import evaluate_model
    from semla_lab.data.world.generate import generate, get_domain
    monkeypatch.setenv("SEMLA_DEVICE", "cuda")          # would fail on this CPU machine if it were read
    miou = evaluate_model(tiny_segmenter, tiny_clip_random, generate(get_domain("nyu"), "test", 2))
    assert 0 <= miou <= 100


def test_cli_passes_the_device_without_the_environment(monkeypatch, capsys):
    monkeypatch.delenv("SEMLA_DEVICE", raising=False)
    threads = torch.get_num_threads()
    assert cli.main(["world", "nyu", "--count", "2", "--device", "cpu"]) == 0
    assert "SEMLA_DEVICE" not in os.environ
    torch.set_num_threads(threads)
