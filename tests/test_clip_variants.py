"""Tiny-CLIP variants: captions without condition words, centroids as the library's, the retrieval figures,
training a variant once and reusing it, retrieval by another embedder in evaluate_target, the CLI."""
import json
import re

import pytest
import torch

from semla_lab.library.assets import load_segmenter
from semla_lab.cli import main
from semla_lab.models.clip import load_clip
from semla_lab.evaluation.embedding_space import domain_centroids, nearest_centroid_confusion
from semla_lab.workflows.clip_variants import proxy_regret, variant_clip
from semla_lab.core.errors import UsageError
from semla_lab.evaluation.scoring import evaluate_target
from semla_lab.data.sources import load_target
from semla_lab.library.index import AdapterLibrary
from semla_lab.library.predictor import LibraryModel
from semla_lab.core.runtime import assets_dir
from semla_lab.training.train import ClipTrainConfig
from semla_lab.data.world.generate import generate, get_domain, web_corpus

CONDITION = re.compile(r"\b(foggy|rainy|snowy|noisy|blurry|low-resolution|bright|dark|warm-toned|cool-toned|greenish)\b"
                       r"| at night| at dusk")


def test_no_condition_captions_are_the_full_ones_without_condition_words_same_images():
    images, full = web_corpus(96, seed=4)
    same, bare = web_corpus(96, seed=4, captions="no_conditions")
    assert torch.equal(images, same)
    assert sum(bool(CONDITION.search(c)) for c in full) > 48 and not any(CONDITION.search(c) for c in bare)
    strip = lambda c: re.sub(r"\s+", " ", CONDITION.sub("", c))
    assert [strip(c) for c in full] == bare
    with pytest.raises(UsageError, match="caption mode"):
        ClipTrainConfig(captions="none")


def test_retrieval_figures_on_hand_made_embeddings():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-0.8, 0.1]])
    accuracy, _ = nearest_centroid_confusion(queries, ["a"] * 3, centroids, ["a", "b", "c"])
    assert accuracy == pytest.approx(1 / 3)
    miou = {"a": 40.0, "b": 30.0, "c": 20.0}
    regret, chosen = proxy_regret(queries, centroids, ["a", "b", "c"], "a", miou)
    assert chosen == {"b": 2, "c": 1}                        # a's own centroid is never chosen
    assert regret == pytest.approx(30 - (30 + 30 + 20) / 3)


@pytest.fixture(scope="module")
def bundle():
    clip = load_clip(device="cpu")
    return load_segmenter(clip=clip, device="cpu"), clip, AdapterLibrary(assets_dir() / "library")


def test_centroids_are_computed_as_the_library_computes_them(bundle):
    _, clip, library = bundle
    names = ["acdc_fog", "nyu"]
    assert torch.allclose(domain_centroids(clip, names), library.centroids(names), atol=1e-5)


def test_evaluate_target_retrieves_with_the_given_embedder(bundle):
    seg, clip, library = bundle
    engine, target = LibraryModel(seg, library, "cpu"), load_target("acdc_fog", 4)
    base, records = evaluate_target(engine, clip, target, ("semla",))
    same, again = evaluate_target(engine, clip, target, ("semla",), embedder=(clip, library.centroids()))
    assert base == same and [r["chosen"] for r in records] == [r["chosen"] for r in again]
    torch.manual_seed(0)
    other = load_clip(pretrained="random", device="cpu")
    _, moved = evaluate_target(engine, clip, target, ("semla",), embedder=(other, domain_centroids(other, engine.names)))
    assert [r["chosen"] for r in moved] != [r["chosen"] for r in records]


def test_a_trained_variant_records_its_captions_and_is_reused(tmp_path, monkeypatch):
    cfg = ClipTrainConfig(steps=2, batch=8, corpus=32)
    monkeypatch.setattr("semla_lab.workflows.pipeline.target_domains", lambda: ["acdc_fog", "nyu"])   # quick accuracy check
    clip = variant_clip("no_conditions", cfg, tmp_path, "cpu", progress=False)
    manifest = json.loads((tmp_path / "no_conditions" / "manifest.json").read_text())
    assert manifest["tiny_clip"]["config"]["captions"] == "no_conditions"
    weights = tmp_path / "no_conditions" / "tiny_clip.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = variant_clip("no_conditions", cfg, tmp_path, "cpu", progress=False)
    assert weights.stat().st_mtime_ns == stamp                 # same recipe: reused, not retrained
    x = generate(get_domain("nyu"), "test", 2).images
    assert torch.equal(clip.model.encode_image(x.float() / 255), again.model.encode_image(x.float() / 255))
    with pytest.raises(UsageError, match="unknown CLIP variant"):
        variant_clip("sharp", cfg, tmp_path)


def test_cli_clip_variants_measures_shipped_and_untrained(capsys, tmp_path):
    out = tmp_path / "cv.json"
    code = main(["clip-variants", "--variants", "shipped", "untrained", "--targets", "acdc_fog", "nyu",
                 "--max-images", "4", "--out", str(out), "--quiet"])
    assert code == 0 and "untrained" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved["variants"]) == {"shipped", "untrained"}
    for v in saved["variants"].values():
        assert set(v["per_target"]) == {"acdc_fog", "nyu"} and 0 <= v["nearest_centroid_accuracy"] <= 1
        assert all(sum(p["top1_domains"].values()) == 4 for p in v["per_target"].values())
    assert "nyu" not in saved["variants"]["shipped"]["per_target"]["nyu"]["top1_domains"]   # leave-one-out
    assert saved["variants"]["untrained"]["training"] is None
    assert saved["variants"]["shipped"]["training"]["config"]["steps"] == 1200
