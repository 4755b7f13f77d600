"""Benchmark-output analysis, library growth and real-data helpers of semla_lab.reports (notebooks 07-09).
Runs without the shipped artifacts: synthetic results/records, a tiny library trained in seconds."""
import json
import os

import numpy as np
import pytest
import torch

from semla_lab import reports
from semla_lab.experiments import EvalConfig, Target
from semla_lab.library import AdapterLibrary
from semla_lab.predictor import LibraryModel
from semla_lab.retrieval import RetrievalConfig, retrieve
from semla_lab.segmenter import build_segmenter
from semla_lab.train import AdapterConfig

DOMAINS = ["a", "b", "c"]


def _results():
    per = {"zero_shot": [20.0, 30.0, 40.0], "uniform": [30.0, 35.0, 45.0], "semla": [35.0, 33.0, 38.0],
           "oracle": [40.0, 45.0, 50.0]}
    from semla_lab.experiments import summarize
    return summarize({d: {m: v[i] for m, v in per.items()} for i, d in enumerate(DOMAINS)}, dict.fromkeys(DOMAINS, 2))


def _records():
    """Two images per target; every image chooses two of the other domains."""
    recs = []
    for t in DOMAINS:
        others = [d for d in DOMAINS if d != t]
        for i, w in enumerate(([0.75, 0.25], [0.5, 0.5])):
            dist = {d: (0.0 if d == t else 0.2 + 0.1 * DOMAINS.index(d)) for d in DOMAINS}
            recs.append({"image_id": f"{t}/{i}", "target": t, "distances": dist, "chosen": others, "weights": w})
    return recs


def test_load_benchmark_round_trip_and_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="semla-lab evaluate --out"):
        reports.load_benchmark(tmp_path)
    payload = {"results": _results(), "config": {"k": 2}}
    (tmp_path / "results.json").write_text(json.dumps(payload))
    (tmp_path / "selections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    got, recs = reports.load_benchmark(tmp_path)
    assert got == json.loads(json.dumps(payload)) and recs == _records()


def test_deltas_failures_and_paper_comparison():
    results = _results()
    deltas = reports.per_domain_deltas(results)
    assert list(deltas.index) == ["c", "b", "a"]             # worst gain over uniform first
    assert deltas.loc["a", "semla - uniform"] == pytest.approx(5.0)
    assert deltas.loc["c", "semla - zero_shot"] == pytest.approx(-2.0)
    assert deltas.loc["b", "oracle - semla"] == pytest.approx(12.0)
    fails = reports.failure_cases({"results": results})
    assert list(fails.index) == ["c", "b"]                   # c: 7 below uniform; b: 2 below uniform
    assert fails.loc["c", "shortfall"] == pytest.approx(7.0)
    assert fails.loc["c", "beaten by"] == "uniform, zero_shot" and fails.loc["b", "beaten by"] == "uniform"
    assert reports.failure_cases(results, margin=10).empty
    comp = reports.paper_comparison(results)
    assert comp.loc["semla", "gap closed (paper)"] == pytest.approx((54.2 - 39.4) / (61.1 - 39.4))
    assert comp.loc["oracle", "gap closed"] == 1 and comp.loc["zero_shot", "gap closed"] == 0


def test_borrow_matrix_rows_sum_to_one_and_leave_one_out_diagonal_is_zero():
    m = reports.borrow_matrix(_records())
    assert list(m.index) == DOMAINS and list(m.columns) == DOMAINS
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert (np.diag(m.values) == 0).all()
    assert m.loc["a", "b"] == pytest.approx((0.75 + 0.5) / 2) and m.loc["a", "c"] == pytest.approx(0.375)
    top = reports.top_borrowed(m, n=2)
    assert top.loc["a", "#1"] == "b (0.62)" and top.loc["c", "#2"] == "b (0.38)"
    stats = reports.retrieval_stats(_records())
    assert stats.loc["a", "d own"] == 0 and stats.loc["a", "d top-1"] == pytest.approx(0.3)
    assert stats.loc["a", "w top-1"] == pytest.approx(0.625)
    assert stats.loc["a", "effective K"] == pytest.approx((1 / 0.625 + 2) / 2)
    assert stats.loc["b", "usual top-1"] == "a" and stats.loc["b", "share"] == 1.0


def test_records_from_retrieval_feed_the_borrow_matrix():
    g = torch.Generator().manual_seed(0)
    cents, queries = torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    ret = retrieve(queries, cents, ["w", "x", "y", "z"], RetrievalConfig(k=2), exclude=["z"])
    recs = reports.records_from_retrieval(ret, "new")
    assert len(recs) == 5 and all("z" not in r["chosen"] for r in recs)
    m = reports.borrow_matrix(recs)
    assert list(m.columns) == ["w", "x", "y", "z"] and m.loc["new", "z"] == 0
    assert m.sum(axis=1).iloc[0] == pytest.approx(1.0)


# ---- a tiny real library (random tiny CLIP + segmenter, adapters trained for 2 steps) ---------------

@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory, tiny_segmenter, tiny_clip_random):
    from semla_lab.world.generate import generate, get_domain
    root = tmp_path_factory.mktemp("lib") / "library"
    lib = AdapterLibrary.create(root, embedder=tiny_clip_random.identity(True), base_model="tiny-test",
                                lora={"r": 2, "lora_alpha": 4, "target_modules": AdapterConfig().target_modules})
    cfg = AdapterConfig(r=2, lora_alpha=4, steps=2, batch=4, lr=5e-2, replay=0)
    data = {}
    for name in ("cityscapes", "acdc_night", "nyu"):
        split = generate(get_domain(name), "train", 8)
        reports.add_tensors_domain(lib, name, split.images, split.labels, split.class_names, tiny_segmenter,
                                   tiny_clip_random, cfg, metadata={"dataset": split.spec.dataset}, device="cpu")
        data[name] = split
    return lib, data


def test_add_tensors_domain_builds_a_usable_library(tiny_library):
    lib, data = tiny_library
    assert lib.names() == ["cityscapes", "acdc_night", "nyu"]
    assert lib.get("nyu").num_images == 8 and lib.get("nyu").metadata == {"dataset": "nyu"}
    assert lib.centroids().shape == (3, lib.dim)


def test_method_predictions_match_the_engine(tiny_library, tiny_segmenter, tiny_clip_random):
    from semla_lab.clip import embed_class_names
    lib, data = tiny_library
    engine = LibraryModel(tiny_segmenter, lib, "cpu")
    split = data["acdc_night"]
    x = split.images[:3]
    cfg = EvalConfig(k=2)
    preds, ret = reports.method_predictions(engine, tiny_clip_random, x, split.class_names,
                                            ("zero_shot", "uniform", "semla", "oracle"), cfg, own="acdc_night",
                                            exclude=["acdc_night"])
    text = embed_class_names(tiny_clip_random, split.class_names)
    xf = x.float() / 255
    assert torch.equal(preds["zero_shot"], engine.logits(xf, text).argmax(1))
    own = torch.full((3, 1), engine.names.index("acdc_night"))
    assert torch.equal(preds["oracle"], engine.logits(xf, text, own, torch.ones(3, 1)).argmax(1))
    assert torch.equal(preds["semla"], engine.logits(xf, text, ret.indices, ret.weights).argmax(1))
    assert all("acdc_night" not in c for r in reports.records_from_retrieval(ret, "t") for c in r["chosen"])
    others = torch.tensor([0, 2]).expand(3, -1)
    assert torch.equal(preds["uniform"], engine.logits(xf, text, others, torch.full((3, 2), 0.5)).argmax(1))
    no_oracle, _ = reports.method_predictions(engine, tiny_clip_random, x, split.class_names, ("oracle",), cfg)
    assert no_oracle == {}
    with pytest.raises(ValueError, match="unknown method"):
        reports.method_predictions(engine, tiny_clip_random, x, split.class_names, ("magic",), cfg)


def test_evaluate_in_library_uses_the_own_adapter_unless_excluded(tiny_library, tiny_segmenter, tiny_clip_random):
    lib, data = tiny_library
    engine = LibraryModel(tiny_segmenter, lib, "cpu")
    split = data["nyu"]
    target = Target("nyu", split.images[:4], split.labels[:4], split.class_names, split.ids[:4])
    scores, recs = reports.evaluate_in_library(engine, tiny_clip_random, target, ("zero_shot", "semla", "oracle"),
                                               EvalConfig(k=2, batch_size=3))
    assert set(scores) == {"zero_shot", "semla", "oracle"} and len(recs) == 4
    assert all(r["chosen"][0] == "nyu" for r in recs), "its own training images are nearest to its own centroid"
    _, recs = reports.evaluate_in_library(engine, tiny_clip_random, target, ("semla",), EvalConfig(k=2),
                                          exclude=["nyu"])
    assert all("nyu" not in r["chosen"] for r in recs)


def test_fingerprints_show_only_the_added_and_removed_domain(tiny_library, tiny_segmenter, tiny_clip_random, tmp_path):
    import shutil
    lib, data = tiny_library
    copy = AdapterLibrary(shutil.copytree(lib.root, tmp_path / "copy"))
    before = reports.adapter_fingerprints(copy)
    assert list(before.index) == copy.names() and before["sha256"].str.len().eq(12).all()
    split = data["cityscapes"]
    reports.add_tensors_domain(copy, "extra", split.images, split.labels, split.class_names, tiny_segmenter,
                               tiny_clip_random, AdapterConfig(r=2, lora_alpha=4, steps=1, batch=4, replay=0), device="cpu")
    after = reports.adapter_fingerprints(copy)
    changes = reports.fingerprint_changes(before, after)
    assert changes == {"added": ["extra"], "removed": [], "changed": [], "unchanged": copy.names()[:3]}
    copy.remove("extra")
    assert reports.fingerprint_changes(after, reports.adapter_fingerprints(copy))["removed"] == ["extra"]


def test_write_spec_round_trips_through_get_domain(tmp_path):
    from semla_lab.world.generate import get_domain
    from semla_lab.world.spec import validate_spec
    spec = validate_spec({"name": "foggy_dusk", "dataset": "idd", "scene": "street", "style": "indian",
                          "factors": {"fog": 0.6, "dusk": 0.7}, "vocabulary": {"road": "road", "sky": "sky"},
                          "splits": {"train": 10, "test": 5}, "seed": 3})
    assert get_domain(str(reports.write_spec(spec, tmp_path / "s" / "foggy_dusk.yaml"))) == spec


# ---- real-data helpers ----------------------------------------------------------------------------

def test_try_load_clip_returns_message_instead_of_raising():
    clip, msg = reports.try_load_clip("no-such-model")
    assert clip is None and "unknown open_clip model" in msg
    clip, msg = reports.try_load_clip("semla-tiny-clip", pretrained="random")
    assert clip is not None and msg.startswith("loaded semla-tiny-clip")
    clip, msg = reports.try_load_clip("semla-tiny-clip", checkpoint="missing.safetensors")
    assert clip is None and "not found" in msg


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    from semla_lab.real_data import DATA_ROOT_ENV, load_real_spec, real_dataset_names
    for name in real_dataset_names():
        monkeypatch.delenv(load_real_spec(name).root_env, raising=False)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    return tmp_path / "data"


def test_status_and_missing_message(no_data_env, monkeypatch):
    status = reports.real_data_status()
    assert len(status) == 10 and not status["present"].any()
    assert status.loc["acdc", "env var"] == "SEMLA_ACDC_ROOT" and "acdc_fog" in status.loc["acdc", "domains"]
    msg = reports.missing_data_message("acdc", "acdc_fog")
    assert "SEMLA_ACDC_ROOT" in msg and "acdc.vision.ee.ethz.ch" in msg
    monkeypatch.chdir(no_data_env.parent)
    assert reports.real_data_status(["nyu"]).loc["nyu", "looked in"] == os.path.join("data", "nyu")
    assert "./data/nyu" in reports.missing_data_message("nyu")


@pytest.mark.parametrize("dataset", ["cityscapes", "acdc", "ade20k", "pascal_context", "nyu", "muses", "coconut"])
def test_write_real_layout_reads_back_through_real_dataset(dataset, tmp_path):
    from semla_lab.real_data import RealDataset, load_real_spec
    spec = load_real_spec(dataset)
    names = [spec.classes[0], spec.classes[-1], "not-a-class-here"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 8, 12), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (3, 8, 12), generator=g).to(torch.uint8)
    labels[:, 0, 0] = 255
    domain = list(spec.domains)[-1]
    written = reports.write_real_layout(dataset, tmp_path, images, labels, names, domain=domain)
    assert len({w[0] for w in written}) == 3
    ds = RealDataset(dataset, split="val", domain=domain, root=tmp_path)
    assert len(ds) == 3
    expected = torch.tensor([0, len(spec.classes) - 1, 255, 255])[labels.long().clamp(max=3)]
    for i in range(3):
        assert torch.equal(ds[i]["label"], expected[i]), dataset
    target = reports.real_tensors(dataset, "val", domain, size=16, root=tmp_path)
    assert target.images.shape == (3, 3, 16, 16) and target.labels.shape == (3, 16, 16)
    assert target.images.dtype == torch.uint8 and set(target.labels.unique().tolist()) <= {0, len(spec.classes) - 1, 255}


def test_lora_targets_of_the_segmenter(tiny_segmenter):
    t = reports.lora_targets(tiny_segmenter, r=4)
    blocks = len(tiny_segmenter.visual.transformer.resblocks)
    assert len(t) == 4 * blocks and t["module"].str.startswith("visual.transformer.resblocks.").all()
    row = t[t["module"].str.endswith("0.attn.in_proj")].iloc[0]
    assert row["out"] == 3 * row["in"] and row["lora params"] == 4 * (row["in"] + row["out"])
    assert reports.lora_targets(tiny_segmenter, pattern=r"nothing\..*").empty
    assert list(reports.lora_targets(tiny_segmenter, pattern=r"head\..*")["module"]) == ["head.text_guidance",
                                                                                        "head.class_mix"]


def test_real_pipeline_end_to_end_on_fake_real_layouts(tmp_path, monkeypatch, no_data_env, tiny_clip_random):
    """The whole real recipe (base training, adapters, library, benchmark) on mini-world images written in
    the Cityscapes and ACDC layouts: the same code a GPU run executes on the real folders."""
    from semla_lab.train import SegTrainConfig
    from semla_lab.world.generate import generate, get_domain
    for dataset, domains in (("cityscapes", ["cityscapes"]), ("acdc", ["acdc_fog", "acdc_night"])):
        root = tmp_path / dataset
        monkeypatch.setenv(f"SEMLA_{dataset.upper()}_ROOT", str(root))
        for domain in domains:
            for split, n in (("train", 6), ("val", 3)):
                data = generate(get_domain(domain), "train" if split == "train" else "test", n)
                reports.write_real_layout(dataset, root, data.images, data.labels, data.class_names, split, domain)
    out = tmp_path / "run"
    payload = reports.real_pipeline(
        tiny_clip_random, ["acdc_fog", "acdc_night", "cityscapes"], out, source="cityscapes", size=32,
        seg_cfg=SegTrainConfig(steps=2, batch=4), adapter_cfg=AdapterConfig(r=2, lora_alpha=4, steps=2, batch=4),
        eval_cfg=EvalConfig(k=2, batch_size=2), methods=["zero_shot", "semla", "oracle"], device="cpu", progress=False)
    assert set(payload["results"]) == {"zero_shot", "semla", "oracle"}
    assert payload["results"]["semla"]["num_images"] == {"acdc_fog": 3, "acdc_night": 3, "cityscapes": 3}
    lib = AdapterLibrary(out / "library")
    assert lib.names() == ["acdc_fog", "acdc_night", "cityscapes"] and lib.embedder["model"] == "semla-tiny-clip"
    saved, recs = reports.load_benchmark(out / "benchmark")
    assert saved["config"]["size"] == 32 and len(recs) == 9
    assert all(r["target"] not in r["chosen"] for r in recs), "leave-one-out on real targets too"
    with pytest.raises(KeyError, match="unknown real domain"):
        reports.real_pipeline(tiny_clip_random, ["atlantis"], tmp_path / "bad")
    from semla_lab.real_data import MissingDataError
    seg = build_segmenter(tiny_clip_random.model)
    with pytest.raises(MissingDataError, match=r"adapters replay 16 source images per step; AdapterConfig\(replay=0\)"):
        reports.real_pipeline(tiny_clip_random, ["cityscapes"], tmp_path / "no_source", source="coco_stuff", size=32,
                              segmenter=seg, adapter_cfg=AdapterConfig(r=2, lora_alpha=4, steps=2, batch=4))


def test_quiet_known_warnings_filters_only_the_known_messages(caplog):
    import logging
    import warnings
    reports.quiet_known_warnings()
    reports.quiet_known_warnings()       # idempotent
    root = logging.getLogger()
    assert sum(type(f).__name__ == "_KnownMessages" for f in root.filters) == 1
    record = lambda msg: logging.LogRecord("root", logging.WARNING, __file__, 1, msg, None, None)
    assert not root.filter(record("No pretrained weights loaded for model 'x'. Model initialized randomly."))
    assert root.filter(record("something else"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        reports.quiet_known_warnings()
        warnings.warn("The PEFT config's `base_model_name_or_path` was renamed from 'a' to 'None'.")
        warnings.warn("another warning")
    assert [str(w.message) for w in caught] == ["another warning"]
    for f in [f for f in root.filters if type(f).__name__ == "_KnownMessages"]:
        root.removeFilter(f)


def test_per_image_miou():
    labels = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [255, 1]]])
    preds = {"perfect": labels.clamp(max=1), "all zero": torch.zeros_like(labels)}
    table = reports.per_image_miou(preds, labels, 2)
    assert list(table.columns) == ["perfect", "all zero"] and len(table) == 2
    assert table["perfect"].tolist() == [100.0, 100.0]
    assert table.loc[0, "all zero"] == pytest.approx(100 * (1 / 4) / 2)    # class 0: IoU 1/4, class 1: 0
