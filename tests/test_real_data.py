"""Real-data path: manifests load, and tiny fake datasets written in each declared layout are found,
paired and converted."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semla_lab.data.datasets import IGNORE_INDEX, DataError
from semla_lab.data.real_data import (DATA_ROOT_ENV, MissingDataError, RealDataset, dataset_root, load_real_spec,
                                 real_dataset_names, real_domains, real_manifests_dir)

NUM_CLASSES = {"acdc": 19, "muses": 19, "cityscapes": 19, "bdd100k": 19, "idd": 26, "mapillary": 65,
               "ade20k": 150, "pascal_context": 59, "nyu": 40, "coconut": 133, "coco_stuff": 171}
PAPER_DOMAINS = ["acdc_fog", "acdc_night", "acdc_rain", "acdc_snow"] + [
    f"muses_{w}_{t}" for w in ("clear", "fog", "rain", "snow") for t in ("day", "night")] + [
    "cityscapes", "bdd100k", "idd", "mapillary", "ade20k", "pascal_context", "nyu", "coconut"]
H, W = 6, 8


def raw_to_class(spec) -> dict[int, int]:
    """Raw label ids to write, with the class id each must become (unmapped ids -> 255)."""
    n = len(spec.classes)
    if spec.conversion == "identity":
        return {0: 0, 1: 1, n - 1: n - 1, n: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX}
    if spec.conversion == "minus_one":
        return {0: IGNORE_INDEX, 1: 0, n: n - 1, n + 1: IGNORE_INDEX}
    first, second = list(spec.id_map)[:2]
    return {first: spec.id_map[first], second: spec.id_map[second], 0: IGNORE_INDEX, 250: IGNORE_INDEX}


def write_pair(root: Path, image_rel: str, label_rel: str, raw_ids: list[int], seed: int = 0) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    for rel, im in ((image_rel, Image.fromarray(rgb)),
                    (label_rel, Image.fromarray(np.resize(np.array(raw_ids, np.uint8), (H, W)), mode="L"))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)


def write_fake(spec, root: Path, split: str = "val", n: int = 3) -> list[tuple[str, str, str]]:
    """Write n image/label pairs per domain, at paths made from the spec's own globs and pairing
    regex; returns (image_rel, label_rel, domain) for each."""
    written = []
    for domain in spec.domains:
        for i in range(n):
            listed = spec.patterns(split, domain)[i % len(spec.globs)].replace("*", f"s{i}")
            other = spec.partner(listed)
            image, label = (other, listed) if spec.from_labels else (listed, other)
            write_pair(root, image, label, list(raw_to_class(spec)), seed=i)
            written.append((image, label, domain))
    return written


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    for name in NUM_CLASSES:
        monkeypatch.delenv(load_real_spec(name).root_env, raising=False)
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)


def test_every_manifest_loads_with_its_class_list():
    assert real_dataset_names() == sorted(NUM_CLASSES)
    for name, n in NUM_CLASSES.items():
        spec = load_real_spec(name)
        raw = yaml.safe_load(spec.path.read_text())
        assert (spec.path.parent / raw["class_list"]).is_file()
        assert len(spec.classes) == n and len(set(spec.classes)) == n, name
        assert all(c == c.strip() for c in spec.classes)
        assert spec.homepage.startswith("http") and spec.root_env == f"SEMLA_{name.upper()}_ROOT"
        assert "val" in spec.splits


def test_real_domains_are_the_20_of_the_paper():
    domains = real_domains()
    assert list(domains) == PAPER_DOMAINS
    for domain, (dataset, dom) in domains.items():
        assert dom == domain and dom in load_real_spec(dataset).domains


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_finds_pairs_and_converts_every_layout(tmp_path, name):
    spec = load_real_spec(name)
    written = write_fake(spec, tmp_path)
    ds = RealDataset(name, root=tmp_path)
    assert len(ds) == len(written) == 3 * len(spec.domains)
    assert ds.classes == list(spec.classes)
    assert ds.domain == (None if len(spec.domains) > 1 else name)
    expected_ids = {str(Path(img).with_suffix("")): dom for img, _, dom in written}
    assert [ds[i]["id"] for i in range(len(ds))] == [s[2] for s in ds.samples]
    lut = raw_to_class(spec)
    want = torch.tensor([lut[k] for k in lut])
    for i in range(len(ds)):
        item = ds[i]
        assert expected_ids.pop(item["id"]) == item["domain"]
        assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.int64
        assert torch.equal(item["label"], want.repeat(H * W // len(want) + 1)[:H * W].view(H, W))
    assert not expected_ids
    again = RealDataset(name, root=tmp_path)
    assert [s[2] for s in again.samples] == sorted(s[2] for s in again.samples) == [s[2] for s in ds.samples]


@pytest.mark.parametrize("name,image,label", [
    ("cityscapes", "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
     "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"),
    ("acdc", "rgb_anon/fog/val/GOPR0475/GOPR0475_frame_000041_rgb_anon.png",
     "gt/fog/val/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png"),
    ("muses", "frame_camera/val/rain/night/REC0001_frame_000010_frame_camera.png",
     "gt_semantic/val/rain/night/REC0001_frame_000010_gt_labelTrainIds.png"),
    ("bdd100k", "images/10k/val/7d2f7975-e0c1c5a7.jpg", "labels/sem_seg/masks/val/7d2f7975-e0c1c5a7.png"),
    ("idd", "leftImg8bit/val/119/frame0012_leftImg8bit.png",
     "gtFine/val/119/frame0012_gtFine_labellevel3Ids.png"),
    ("mapillary", "validation/images/-0Ra8y3gLE0a3-NwHppjdQ.jpg",
     "validation/v1.2/labels/-0Ra8y3gLE0a3-NwHppjdQ.png"),
    ("ade20k", "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg",
     "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"),
    ("pascal_context", "JPEGImages/2008_000002.jpg", "annotations_detectron2/pc59_val/2008_000002.png"),
    ("nyu", "images/test/0001.png", "annotations/test/0001.png"),
    ("coconut", "images/val/000000000139.jpg", "panoptic_semseg_val/000000000139.png"),
    ("coco_stuff", "images/val2017/000000000139.jpg", "annotations_detectron2/val2017/000000000139.png"),
])
def test_official_file_names_are_found(tmp_path, name, image, label):
    write_pair(tmp_path, image, label, [1])
    ds = RealDataset(name, root=tmp_path)
    assert [(s[0], s[1]) for s in ds.samples] == [(tmp_path / image, tmp_path / label)]
    assert ds[0]["id"] == image.rsplit(".", 1)[0]


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    write_pair(tmp_path, "leftImg8bit/val/bonn/bonn_0_leftImg8bit.png",
               "gtFine/val/bonn/bonn_0_gtFine_labelIds.png", [7, 26, 0, 33, 34, 255])
    assert RealDataset("cityscapes", root=tmp_path)[0]["label"][0, :6].tolist() == [0, 13, 255, 18, 255, 255]


def test_ade_minus_one_and_identity(tmp_path):
    write_pair(tmp_path, "ADEChallengeData2016/images/validation/a.jpg",
               "ADEChallengeData2016/annotations/validation/a.png", [0, 1, 150, 151])
    assert RealDataset("ade20k", root=tmp_path)[0]["label"][0, :4].tolist() == [255, 0, 149, 255]
    write_pair(tmp_path, "images/10k/val/a.jpg", "labels/sem_seg/masks/val/a.png", [0, 18, 19, 255])
    assert RealDataset("bdd100k", root=tmp_path)[0]["label"][0, :4].tolist() == [0, 18, 255, 255]


def test_domains_filter(tmp_path):
    write_fake(load_real_spec("acdc"), tmp_path / "acdc")
    write_fake(load_real_spec("muses"), tmp_path / "muses")
    fog = RealDataset("acdc", domain="acdc_fog", root=tmp_path / "acdc")
    assert fog.domain == "acdc_fog" and len(fog) == 3
    assert all(fog[i]["domain"] == "acdc_fog" and "/fog/" in fog[i]["id"] for i in range(3))
    rain_night = RealDataset("muses", domain="muses_rain_night", root=tmp_path / "muses")
    assert len(rain_night) == 3 and all("/rain/night/" in s[2] for s in rain_night.samples)
    assert len(RealDataset("muses", root=tmp_path / "muses", max_samples=5)) == 5
    with pytest.raises(DataError, match="no domain 'acdc_dusk'"):
        RealDataset("acdc", domain="acdc_dusk", root=tmp_path / "acdc")
    with pytest.raises(DataError, match="no split 'train'"):
        RealDataset("pascal_context", split="train", root=tmp_path)


def test_missing_data_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingDataError) as e:
        RealDataset("cityscapes", root=missing)
    assert str(missing) in str(e.value) and "SEMLA_CITYSCAPES_ROOT" in str(e.value)
    assert "https://www.cityscapes-dataset.com/" in str(e.value)
    missing.mkdir()
    with pytest.raises(MissingDataError, match="no val files found for cityscapes"):
        RealDataset("cityscapes", root=missing)


def test_unpaired_files_name_the_missing_partner(tmp_path):
    (image, label, _), *_ = write_fake(load_real_spec("cityscapes"), tmp_path)
    (tmp_path / label).unlink()
    with pytest.raises(DataError, match="has no label") as e:
        RealDataset("cityscapes", root=tmp_path)
    assert str(tmp_path / label) in str(e.value) and str(tmp_path / image) in str(e.value)
    (image, label, _), *_ = write_fake(load_real_spec("pascal_context"), tmp_path / "pc")
    (tmp_path / "pc" / image).unlink()
    with pytest.raises(DataError, match="has no image") as e:
        RealDataset("pascal_context", root=tmp_path / "pc")
    assert str(tmp_path / "pc" / image) in str(e.value)


def test_root_resolution_and_env_override(tmp_path, monkeypatch):
    spec = load_real_spec("cityscapes")
    write_fake(spec, tmp_path / "mine")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "all"))
    assert dataset_root(spec) == tmp_path / "all" / "cityscapes"
    monkeypatch.setenv("SEMLA_CITYSCAPES_ROOT", str(tmp_path / "mine"))
    assert len(RealDataset("cityscapes")) == 3
    assert dataset_root("cityscapes", root=tmp_path / "arg") == tmp_path / "arg"
    shutil.move(tmp_path / "mine", tmp_path / "all" / "cityscapes")
    monkeypatch.delenv("SEMLA_CITYSCAPES_ROOT")
    assert RealDataset("cityscapes").root == tmp_path / "all" / "cityscapes"


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d.pop("homepage"), "homepage"),
    (lambda d: d["label"].update(conversion="plus_two"), "plus_two"),
    (lambda d: d["layout"].pop("label_path"), "layout"),
    (lambda d: d.update(class_list="class_lists/nope.json"), "nope.json"),
    (lambda d: d["layout"].update(image_glob="x/{weather}/*.png"), "weather"),
])
def test_bad_manifest_names_file_and_field(tmp_path, edit, field):
    doc = yaml.safe_load((real_manifests_dir() / "cityscapes.yaml").read_text())
    edit(doc)
    path = tmp_path / "cityscapes.yaml"
    shutil.copytree(real_manifests_dir() / "class_lists", tmp_path / "class_lists")
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(DataError) as e:
        load_real_spec(path)
    assert str(path) in str(e.value) and field in str(e.value)

