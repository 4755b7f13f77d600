"""The pipeline's building blocks on a tiny library trained in seconds (random tiny CLIP and segmenter):
training and committing adapters, the method registry, fingerprints, the real-data helpers and the whole
recipe on generated data written in real dataset layouts (notebooks 08-09)."""
import os

import pytest
import torch

from semla_lab.library import fingerprints
from semla_lab.evaluation import methods
from semla_lab.workflows import pipeline
from semla_lab.models.clip import try_load_clip
from semla_lab.evaluation.config import EvalConfig
from semla_lab.evaluation.scoring import evaluate_target
from semla_lab.library.index import AdapterLibrary
from semla_lab.models.lora import lora_target_table
from semla_lab.library.predictor import LibraryModel
from semla_lab.data.real_data import missing_data_message, real_data_status
from semla_lab.data.real_layout import write_real_layout
from semla_lab.evaluation.outputs import load_benchmark, records_from_retrieval
from semla_lab.core.runtime import quiet_known_warnings
from semla_lab.data.sources import load_split
from semla_lab.training.train import AdapterConfig
from semla_lab.data.world.spec import write_spec


def add_split(library, split, segmenter, clip, cfg, tmp_path):
    """Train and commit one adapter the way every build does (pipeline.train_staged + commit_staged)."""
    folder = tmp_path / f"{split.name}-staged"
    folder.mkdir()
    pipeline.commit_staged(library, pipeline.train_staged(segmenter, clip, split, folder, library.base_model,
                                                          library.embedder, cfg, device="cpu"))


# ---- a tiny real library (random tiny CLIP + segmenter, adapters trained for 2 steps) ---------------

@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory, tiny_segmenter, tiny_clip_random):
    from semla_lab.data.world.generate import generate, get_domain
    root = tmp_path_factory.mktemp("lib") / "library"
    lib = AdapterLibrary.create(root, embedder=tiny_clip_random.identity(True), base_model="tiny-test",
                                lora={"r": 2, "lora_alpha": 4, "target_modules": AdapterConfig().target_modules})
    cfg = AdapterConfig(r=2, lora_alpha=4, steps=2, batch=4, lr=5e-2, replay=0)
    data = {}
    for name in ("cityscapes", "acdc_night", "nyu"):
        split = generate(get_domain(name), "train", 8)
        add_split(lib, split, tiny_segmenter, tiny_clip_random, cfg, tmp_path_factory.mktemp(name))
        data[name] = split
    return lib, data


def test_staged_adapters_build_a_usable_library(tiny_library):
    lib, data = tiny_library
    assert lib.names() == ["cityscapes", "acdc_night", "nyu"]
    assert lib.get("nyu").num_images == 8 and lib.get("nyu").metadata["dataset"] == "nyu"
    assert lib.centroids().shape == (3, lib.dim)


def test_method_predictions_match_the_engine(tiny_library, tiny_segmenter, tiny_clip_random):
    from semla_lab.models.clip import embed_class_names
    lib, data = tiny_library
    engine = LibraryModel(tiny_segmenter, lib, "cpu")
    split = data["acdc_night"]
    x = split.images[:3]
    cfg = EvalConfig(k=2)
    preds, ret = methods.method_predictions(engine, tiny_clip_random, x, split.class_names,
                                            ("zero_shot", "uniform", "semla", "oracle"), cfg.retrieval,
                                            own="acdc_night", exclude=["acdc_night"])
    text = embed_class_names(tiny_clip_random, split.class_names)
    xf = x.float() / 255
    assert torch.equal(preds["zero_shot"], engine.logits(xf, text).argmax(1))
    own = torch.full((3, 1), engine.names.index("acdc_night"))
    assert torch.equal(preds["oracle"], engine.logits(xf, text, own, torch.ones(3, 1)).argmax(1))
    assert torch.equal(preds["semla"], engine.logits(xf, text, ret.indices, ret.weights).argmax(1))
    assert all("acdc_night" not in c for r in records_from_retrieval(ret, "t") for c in r["chosen"])
    others = torch.tensor([0, 2]).expand(3, -1)
    assert torch.equal(preds["uniform"], engine.logits(xf, text, others, torch.full((3, 2), 0.5)).argmax(1))
    no_oracle, _ = methods.method_predictions(engine, tiny_clip_random, x, split.class_names, ("oracle",), cfg.retrieval)
    assert no_oracle == {}
    with pytest.raises(ValueError, match="unknown method"):
        methods.method_predictions(engine, tiny_clip_random, x, split.class_names, ("magic",), cfg.retrieval)


def test_evaluate_target_uses_the_own_adapter_unless_left_out(tiny_library, tiny_segmenter, tiny_clip_random):
    lib, data = tiny_library
    engine = LibraryModel(tiny_segmenter, lib, "cpu")
    target = data["nyu"].head(4)
    scores, recs = evaluate_target(engine, tiny_clip_random, target, ("zero_shot", "semla", "oracle"),
                                   EvalConfig(k=2, batch_size=3), leave_one_out=False)
    assert set(scores) == {"zero_shot", "semla", "oracle"} and len(recs) == 4
    assert all(r["chosen"][0] == "nyu" for r in recs), "its own training images are nearest to its own centroid"
    _, recs = evaluate_target(engine, tiny_clip_random, target, ("semla",), EvalConfig(k=2))
    assert all("nyu" not in r["chosen"] for r in recs)


def test_fingerprints_show_only_the_added_and_removed_domain(tiny_library, tiny_segmenter, tiny_clip_random, tmp_path):
    import shutil
    lib, data = tiny_library
    copy = AdapterLibrary(shutil.copytree(lib.root, tmp_path / "copy"))
    before = fingerprints.adapter_fingerprints(copy)
    assert list(before.index) == copy.names() and before["sha256"].str.len().eq(12).all()
    extra = load_split("cityscapes", "train", 8)
    extra.name = "extra"
    add_split(copy, extra, tiny_segmenter, tiny_clip_random, AdapterConfig(r=2, lora_alpha=4, steps=1, batch=4, replay=0),
              tmp_path)
    after = fingerprints.adapter_fingerprints(copy)
    changes = fingerprints.fingerprint_changes(before, after)
    assert changes == {"added": ["extra"], "removed": [], "changed": [], "unchanged": copy.names()[:3]}
    copy.remove("extra")
    assert fingerprints.fingerprint_changes(after, fingerprints.adapter_fingerprints(copy))["removed"] == ["extra"]


def test_write_spec_round_trips_through_get_domain(tmp_path):
    from semla_lab.data.world.generate import get_domain
    from semla_lab.data.world.spec import validate_spec
    spec = validate_spec({"name": "foggy_dusk", "dataset": "idd", "scene": "street", "style": "indian",
                          "factors": {"fog": 0.6, "dusk": 0.7}, "vocabulary": {"road": "road", "sky": "sky"},
                          "splits": {"train": 10, "test": 5}, "seed": 3})
    assert get_domain(str(write_spec(spec, tmp_path / "s" / "foggy_dusk.yaml"))) == spec


# ---- real-data helpers ----------------------------------------------------------------------------

def test_try_load_clip_returns_message_instead_of_raising():
    clip, msg = try_load_clip("no-such-model")
    assert clip is None and "unknown open_clip model" in msg
    clip, msg = try_load_clip("semla-tiny-clip", pretrained="random")
    assert clip is not None and msg.startswith("loaded semla-tiny-clip")
    clip, msg = try_load_clip("semla-tiny-clip", checkpoint="missing.safetensors")
    assert clip is None and "not found" in msg


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    from semla_lab.data.real_data import DATA_ROOT_ENV, load_real_spec, real_dataset_names
    for name in real_dataset_names():
        monkeypatch.delenv(load_real_spec(name).root_env, raising=False)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    return tmp_path / "data"


def test_status_and_missing_message(no_data_env, monkeypatch):
    status = real_data_status()
    assert len(status) == 10 and not status["present"].any()
    assert status.loc["acdc", "env var"] == "SEMLA_ACDC_ROOT" and "acdc_fog" in status.loc["acdc", "domains"]
    msg = missing_data_message("acdc", "acdc_fog")
    assert "SEMLA_ACDC_ROOT" in msg and "acdc.vision.ee.ethz.ch" in msg
    monkeypatch.chdir(no_data_env.parent)
    assert real_data_status(["nyu"]).loc["nyu", "looked in"] == os.path.join("data", "nyu")
    assert "./data/nyu" in missing_data_message("nyu")


@pytest.mark.parametrize("dataset", ["cityscapes", "acdc", "ade20k", "pascal_context", "nyu", "muses", "coconut"])
def test_write_real_layout_reads_back_through_real_dataset(dataset, tmp_path, monkeypatch):
    from semla_lab.data.real_data import RealDataset, load_real_spec
    spec = load_real_spec(dataset)
    names = [spec.classes[0], spec.classes[-1], "not-a-class-here"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 8, 12), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (3, 8, 12), generator=g).to(torch.uint8)
    labels[:, 0, 0] = 255
    domain = list(spec.domains)[-1]
    written = write_real_layout(dataset, tmp_path, images, labels, names, domain=domain)
    assert len({w[0] for w in written}) == 3
    ds = RealDataset(dataset, split="val", domain=domain, root=tmp_path)
    assert len(ds) == 3
    expected = torch.tensor([0, len(spec.classes) - 1, 255, 255])[labels.long().clamp(max=3)]
    for i in range(3):
        assert torch.equal(ds[i]["label"], expected[i]), dataset
    monkeypatch.setenv(spec.root_env, str(tmp_path))
    target = load_split(f"real:{domain}", "test", image_size=16)
    assert target.images.shape == (3, 3, 16, 16) and target.labels.shape == (3, 16, 16)
    assert target.images.dtype == torch.uint8 and set(target.labels.unique().tolist()) <= {0, len(spec.classes) - 1, 255}


def test_lora_targets_of_the_segmenter(tiny_segmenter):
    t = lora_target_table(tiny_segmenter, r=4)
    blocks = len(tiny_segmenter.visual.transformer.resblocks)
    assert len(t) == 4 * blocks and t["module"].str.startswith("visual.transformer.resblocks.").all()
    row = t[t["module"].str.endswith("0.attn.in_proj")].iloc[0]
    assert row["out"] == 3 * row["in"] and row["lora params"] == 4 * (row["in"] + row["out"])
    assert lora_target_table(tiny_segmenter, pattern=r"nothing\..*").empty
    assert list(lora_target_table(tiny_segmenter, pattern=r"head\..*")["module"]) == ["head.text_guidance",
                                                                                        "head.class_mix"]


def write_fake_real_data(root, monkeypatch, train=6, val=3):
    """Mini-world images in the Cityscapes and ACDC layouts (train and val), their env vars pointed there."""
    for dataset, domains in (("cityscapes", ["cityscapes"]), ("acdc", ["acdc_fog", "acdc_night"])):
        monkeypatch.setenv(f"SEMLA_{dataset.upper()}_ROOT", str(root / dataset))
        for domain in domains:
            for split, n in (("train", train), ("val", val)):
                data = load_split(domain, "train" if split == "train" else "test", n)
                write_real_layout(dataset, root / dataset, data.images, data.labels, data.class_names, split, domain)


def saved_clip(clip, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    return str(path)


def test_recipe_end_to_end_on_fake_real_layouts(tmp_path, monkeypatch, no_data_env, tiny_clip_random):
    """The whole recipe (base training, adapters, library, benchmark) on mini-world images written in the
    Cityscapes and ACDC layouts: the same code a GPU run executes on the real folders."""
    from semla_lab.training.train import SegTrainConfig
    write_fake_real_data(tmp_path, monkeypatch)
    models = pipeline.Models(checkpoint=saved_clip(tiny_clip_random, tmp_path / "clip.safetensors"))
    out = tmp_path / "run"
    targets = ["real:acdc_fog", "real:acdc_night", "real:cityscapes"]
    payload = pipeline.run_recipe(
        targets, out, models, source="real:cityscapes", seg_cfg=SegTrainConfig(steps=2, batch=4),
        adapter_cfg=AdapterConfig(r=2, lora_alpha=4, steps=2, batch=4), eval_cfg=EvalConfig(k=2, batch_size=2, image_size=32),
        methods=["zero_shot", "semla", "oracle"], progress=False)
    assert set(payload["results"]) == {"zero_shot", "semla", "oracle"}
    assert payload["results"]["semla"]["num_images"] == {"acdc_fog": 3, "acdc_night": 3, "cityscapes": 3}
    lib = AdapterLibrary(out / "library")
    assert lib.names() == ["acdc_fog", "acdc_night", "cityscapes"] and lib.embedder["model"] == "semla-tiny-clip"
    assert lib.get("cityscapes").metadata == {"dataset": "cityscapes", "size": 32}
    saved, recs = load_benchmark(out / "benchmark")
    assert saved["config"]["image_size"] == 32 and len(recs) == 9
    assert all(r["target"] not in r["chosen"] for r in recs), "leave-one-out on real targets too"
    with pytest.raises(KeyError, match="unknown real domain"):
        pipeline.run_recipe(["real:atlantis"], tmp_path / "bad", models)
    from semla_lab.data.real_data import MissingDataError
    with pytest.raises(MissingDataError, match=r"adapters replay 16 source images per step; AdapterConfig\(replay=0\)"):
        pipeline.add_domains(["real:cityscapes"], tmp_path / "no_source", models, AdapterConfig(r=2, lora_alpha=4, steps=2),
                             replay_source="real:coco_stuff", image_size=32, progress=False)


def test_quiet_known_warnings_filters_only_the_known_messages(caplog):
    import logging
    import warnings
    quiet_known_warnings()
    quiet_known_warnings()       # idempotent
    root = logging.getLogger()
    assert sum(type(f).__name__ == "_KnownMessages" for f in root.filters) == 1
    record = lambda msg: logging.LogRecord("root", logging.WARNING, __file__, 1, msg, None, None)
    assert not root.filter(record("No pretrained weights loaded for model 'x'. Model initialized randomly."))
    assert root.filter(record("something else"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_warnings()
        warnings.warn("The PEFT config's `base_model_name_or_path` was renamed from 'a' to 'None'.")
        warnings.warn("another warning")
    assert [str(w.message) for w in caught] == ["another warning"]
    for f in [f for f in root.filters if type(f).__name__ == "_KnownMessages"]:
        root.removeFilter(f)


def test_per_image_miou():
    labels = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [255, 1]]])
    preds = {"perfect": labels.clamp(max=1), "all zero": torch.zeros_like(labels)}
    table = methods.per_image_miou(preds, labels, 2)
    assert list(table.columns) == ["perfect", "all zero"] and len(table) == 2
    assert table["perfect"].tolist() == [100.0, 100.0]
    assert table.loc[0, "all zero"] == pytest.approx(100 * (1 / 4) / 2)    # class 0: IoU 1/4, class 1: 0


def test_build_library_command_on_real_layouts(tmp_path, monkeypatch, no_data_env, capsys):
    """`build-library --domains real:... --clip --checkpoint --segmenter --image-size` (the shape of the
    ViT-B-16 command, with the tiny CLIP: no weights can be downloaded here), then add-domain resumes."""
    from semla_lab.cli import main
    from semla_lab.core.runtime import assets_dir
    write_fake_real_data(tmp_path, monkeypatch, train=4, val=2)
    out = tmp_path / "library"
    common = ["--clip", "semla-tiny-clip", "--checkpoint", str(assets_dir() / "tiny_clip.safetensors"),
              "--segmenter", str(assets_dir() / "segmenter.safetensors"), "--image-size", "32", "--steps", "1",
              "--replay-source", "real:cityscapes", "--quiet"]
    assert main(["build-library", "--out", str(out), "--domains", "real:acdc_fog", "real:cityscapes", *common]) == 0
    lib = AdapterLibrary(out)
    assert lib.names() == ["acdc_fog", "cityscapes"] and lib.get("acdc_fog").metadata == {"dataset": "acdc", "size": 32}
    assert lib.base_model.startswith("semla-tiny-segmenter@")
    assert main(["add-domain", "--library", str(out), "--domain", "real:cityscapes", "real:acdc_night", *common]) == 0
    printed = capsys.readouterr().out
    assert "cityscapes is already in" in printed and "added acdc_night" in printed
    assert AdapterLibrary(out).names() == ["acdc_fog", "cityscapes", "acdc_night"]
    assert main(["build-library", "--out", str(out), "--domains", "real:atlantis", *common]) == 2
