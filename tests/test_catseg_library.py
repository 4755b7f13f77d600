"""SemLA on CAT-Seg: an official loradb imported onto a (reduced) CAT-Seg base retrieves as the official
orchestrator and fuses per image, batched, exactly as the official per-image peft path."""
import numpy as np
import pytest
import torch

from semla_lab.core.fusion import peft_weighted_forward
from semla_lab.library.loradb import embedder_identity, import_official, is_loradb, open_library
from semla_lab.library.predictor import LibraryModel
from semla_lab.models.catseg import CATSegConfig, build_catseg
from semla_lab.models.catseg.targets import OFFICIAL_LORA_TARGETS, acting_targets, lora_targets
from semla_lab.models.clip import load_clip
from semla_lab.models.segmenter_catseg import CATSegSegmenter
from official_loradb import official_peft_model, write_loradb

NAMES = ["acdc_fog", "acdc_night", "cityscapes", "idd"]
CLASSES = ["road", "sky", "car, automobile", "person"]
EMBEDDER = embedder_identity("semla-tiny-clip", "random")      # retrieval CLIP of these tests (official: ViT-L-14)


@pytest.fixture(scope="module")
def catseg():
    return CATSegSegmenter.wrap(build_catseg(CATSegConfig.reduced("B"), seed=0))


@pytest.fixture(scope="module")
def official(catseg, tmp_path_factory):
    """(peft model with the four adapters on every official target, imported library)."""
    peft_model = official_peft_model(catseg, lora_targets(catseg), NAMES, seed=1)
    g = np.random.default_rng(0)
    root = write_loradb(peft_model, tmp_path_factory.mktemp("official") / "loradb",
                        {n: g.normal(size=64) for n in NAMES}, list(OFFICIAL_LORA_TARGETS))
    library = import_official(root, tmp_path_factory.mktemp("lib") / "lib", EMBEDDER)
    return peft_model, library, root


def test_fused_batch_equals_official_per_image_peft_path(catseg, official):
    peft_model, library, _ = official
    model = LibraryModel(catseg, library, "cpu")
    images = torch.rand(3, 3, 80, 120, generator=torch.Generator().manual_seed(2))
    text = catseg.class_text(CLASSES)
    choices = [(["acdc_fog", "idd", "cityscapes"], [0.6, 0.3, 0.1]), (["idd", "acdc_night"], [0.5, 0.5]),
               (["cityscapes", "acdc_fog", "acdc_night"], [0.2, 0.2, 0.6])]
    ref = torch.cat([peft_weighted_forward(peft_model, n, w, images[i:i + 1], text)
                     for i, (n, w) in enumerate(choices)])
    k = max(len(n) for n, _ in choices)         # pad to K with zero-weight repeats of the first adapter
    idx = torch.stack([model.fused.index(n + n[:1] * (k - len(n))) for n, _ in choices])
    w = torch.tensor([ws + [0.0] * (k - len(ws)) for _, ws in choices])
    out = model.logits(images, text, idx, w)
    base = model.logits(images, text)
    assert (ref - base).abs().max() > 1e-2, "the adapters must change the logits"
    assert (out - ref).abs().max() <= 1e-4
    per_image = model.logits_per_image(list(images), text, idx, w)
    assert max(float((a - b).abs().max()) for a, b in zip(per_image, out)) <= 1e-4


def test_official_libraries_open_with_the_official_embedder(official, tmp_path, monkeypatch):
    _, library, loradb = official
    assert library.embedder["normalize"] is False and library.embedder["preprocess"] == "resize-shorter-crop"
    assert embedder_identity() == {"model": "ViT-L-14", "pretrained": "openai", "image_size": 224, "normalize": False,
                                   "dim": 768, "preprocess": "resize-shorter-crop"}
    assert library.names() == sorted(NAMES) and library.lora_config["target_modules"] == list(OFFICIAL_LORA_TARGETS)
    clip = load_clip("semla-tiny-clip", pretrained="random")
    assert {**clip.identity(normalize=False), "preprocess": "resize-shorter-crop"} == library.embedder
    # a loradb folder given where a library is expected is imported once into the cache, then reused
    monkeypatch.setenv("SEMLA_CACHE", str(tmp_path / "cache"))
    assert is_loradb(loradb) and not is_loradb(library.root)
    first, again = open_library(loradb, EMBEDDER), open_library(loradb, EMBEDDER)
    assert first.root == again.root and first.root.parent == tmp_path / "cache"
    assert torch.equal(first.centroids(), library.centroids())


def test_inert_targets_stay_inert_and_the_library_counts_acting_ones(catseg, official):
    _, library, _ = official
    model = LibraryModel(catseg, library, "cpu")
    targets = model.fused.modules   # the official names that exist here: 5 per CLIP block (9 image, 2 text), 34 in
    acting = acting_targets(targets)   # the aggregator; q/k/v_proj (3 per block) never run
    assert (len(targets), len(acting)) == (5 * 11 + 34, 2 * 11 + 34)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    text = catseg.class_text(CLASSES)
    called = model_called_targets(model, images, text)
    assert sorted(called) == sorted(acting)


def model_called_targets(model, images, text):
    from semla_lab.models.lora import called_fused_targets
    return called_fused_targets(model.fused, lambda: model.logits(images, text, torch.zeros(len(images), 1).long(),
                                                                  torch.ones(len(images), 1)))


@pytest.mark.slow
def test_evaluate_catseg_with_an_official_loradb_end_to_end(tmp_path, monkeypatch, capsys):
    """`semla-lab evaluate --segmenter catseg:FILE --library LORADB --targets real:...` on stand-in images in the
    Cityscapes and ACDC layouts: a random-weight CAT-Seg checkpoint in detectron2's format, an official-format
    loradb, leave-one-out retrieval with the loradb's centroids."""
    from semla_lab.cli import main
    from semla_lab.data.real_data import DATA_ROOT_ENV, load_real_spec, real_dataset_names
    from test_pipeline import write_fake_real_data
    from official_loradb import write_detectron2_checkpoint
    for name in real_dataset_names():
        monkeypatch.delenv(load_real_spec(name).root_env, raising=False)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    write_fake_real_data(tmp_path / "data", monkeypatch, train=1, val=1)
    monkeypatch.setenv("SEMLA_CACHE", str(tmp_path / "cache"))
    model = build_catseg(CATSegConfig.reduced("B"), seed=0)
    checkpoint = write_detectron2_checkpoint(model, tmp_path / "model_final.pth")
    domains = ["acdc_fog", "acdc_night", "cityscapes"]
    g = np.random.default_rng(1)
    loradb = write_loradb(official_peft_model(model, lora_targets(model), domains, seed=2), tmp_path / "loradb",
                          {d: g.normal(size=64) for d in domains}, list(OFFICIAL_LORA_TARGETS))
    out = tmp_path / "run"
    assert main(["evaluate", "--segmenter", f"catseg:{checkpoint}", "--library", str(loradb),
                 "--clip", "semla-tiny-clip", "--pretrained", "random", "--targets", "real:acdc_fog", "real:cityscapes",
                 "--methods", "zero_shot", "semla", "--k", "2", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    from semla_lab.evaluation.outputs import load_benchmark
    saved, records = load_benchmark(out)
    assert saved["results"]["semla"]["num_images"] == {"acdc_fog": 1, "cityscapes": 1}
    assert len(records) == 2 and all(r["target"] not in r["chosen"] and len(r["chosen"]) == 2 for r in records)
    table = capsys.readouterr().out.splitlines()[0].split()
    assert table == ["zero_shot", "semla"], table


@pytest.mark.slow
def test_build_and_grow_a_catseg_library_with_the_official_recipe(tmp_path, monkeypatch):
    """`build-library --segmenter catseg:FILE --domains real:...` trains with the official recipe by default
    (r 8, alpha 16, the official targets, seed 250, no replay, no shrink), and `add-domain` grows the library."""
    from semla_lab.cli import main
    from semla_lab.data.real_data import DATA_ROOT_ENV, load_real_spec, real_dataset_names
    from semla_lab.library.index import AdapterLibrary
    from test_pipeline import write_fake_real_data
    from official_loradb import write_detectron2_checkpoint
    for name in real_dataset_names():
        monkeypatch.delenv(load_real_spec(name).root_env, raising=False)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    write_fake_real_data(tmp_path / "data", monkeypatch, train=2, val=1)
    checkpoint = write_detectron2_checkpoint(build_catseg(CATSegConfig.reduced("B"), seed=0), tmp_path / "m.pth")
    common = ["--segmenter", f"catseg:{checkpoint}", "--clip", "semla-tiny-clip", "--pretrained", "random",
              "--steps", "2", "--quiet", "--device", "cpu"]
    lib = tmp_path / "lib"
    assert main(["build-library", "--out", str(lib), "--domains", "real:cityscapes", *common]) == 0
    assert main(["add-domain", "--library", str(lib), "--domain", "real:acdc_fog", *common]) == 0
    library = AdapterLibrary(lib)
    assert library.names() == ["cityscapes", "acdc_fog"]
    assert library.lora_config["r"] == 8 and library.lora_config["lora_alpha"] == 16
    assert library.lora_config["target_modules"] == list(OFFICIAL_LORA_TARGETS)
    assert library.embedder["normalize"] is False and library.embedder["preprocess"] == "resize-shorter-crop"
    state = library.load_adapter_state("acdc_fog")
    trained = {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight") for k, t in state.items()
               if k.endswith("lora_B.weight") and t.abs().max() > 0}
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state}
    assert len(modules) == 89 and trained == set(acting_targets(sorted(modules))), "inert targets never train"
    import json
    config = json.loads((library.adapter_path("acdc_fog") / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].startswith("catseg@")


@pytest.mark.slow
def test_sliding_window_evaluation_fuses_each_image_as_the_official_path(tmp_path):
    """With SemLA's evaluation protocol (sliding window: 5 crops per image), each image's crops run under that
    image's adapters: the batched call equals the per-image peft path through the official test-time code."""
    seg = CATSegSegmenter.wrap(build_catseg(CATSegConfig.reduced("B").with_semla_recipe(), seed=0))
    peft_model = official_peft_model(seg, lora_targets(seg), NAMES, seed=1)
    root = write_loradb(peft_model, tmp_path / "loradb", {n: np.zeros(64) + i for i, n in enumerate(NAMES)},
                        list(OFFICIAL_LORA_TARGETS))
    model = LibraryModel(seg, import_official(root, tmp_path / "lib", EMBEDDER), "cpu")
    images = torch.rand(2, 3, 90, 160, generator=torch.Generator().manual_seed(4))
    text = seg.class_text(CLASSES[:3])
    choices = [(["acdc_fog", "idd"], [0.8, 0.2]), (["cityscapes", "acdc_night"], [0.4, 0.6])]
    ref = torch.cat([peft_weighted_forward(peft_model, n, w, images[i:i + 1], text)
                     for i, (n, w) in enumerate(choices)])
    out = model.logits(images, text, torch.stack([model.fused.index(n) for n, _ in choices]),
                       torch.tensor([w for _, w in choices]))
    assert out.shape == (2, 3, 90, 160)
    assert (ref.sigmoid() - model.logits(images, text).sigmoid()).abs().max() > 1e-3, "adapters must act"
    assert (out.sigmoid() - ref.sigmoid()).abs().max() <= 1e-5


def test_predictor_segments_images_of_any_size_on_catseg(catseg, official):
    """SemLAPredictor (what `segment` and `analyze` use) on a CAT-Seg base: embed and retrieve once, then masks at
    each image's size, batched; the single-image path gives the same mask."""
    from semla_lab.library.predictor import SemLAPredictor
    from semla_lab.core.retrieval import RetrievalConfig
    _, library, _ = official
    clip = load_clip("semla-tiny-clip", pretrained="random")
    predictor = SemLAPredictor(catseg, clip, library, RetrievalConfig(k=2), device="cpu", batch_size=2)
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 70, 90, generator=g), torch.rand(3, 48, 64, generator=g)]
    retrieval = predictor.set_image_batch(images)
    assert retrieval.indices.shape == (2, 2)
    masks = predictor.predict_batch(CLASSES)
    assert [m.shape for m in masks] == [(70, 90), (48, 64)]
    predictor.set_image(images[1])
    assert torch.equal(predictor.predict(CLASSES), masks[1])
