"""The shared dataset format: round trip, and every kind of bad image, label or manifest."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semla_lab.data.datasets import (DataError, SegmentationDataset, read_image, read_label, read_manifest,
                            write_dataset)
from semla_lab.data.world.generate import generate, shipped_domains


@pytest.fixture
def dataset(tmp_path):
    spec = shipped_domains()["ade"]
    data = generate(spec, "test", 5)
    samples = [{"id": data.ids[i], "image": data.images[i], "label": data.labels[i], "split": "test",
                "domain": spec.name} for i in range(5)]
    return write_dataset(tmp_path / "ade", spec.name, spec.class_names, samples), data


def test_round_trip_is_exact(dataset):
    root, data = dataset
    ds = SegmentationDataset(root, split="test")
    assert len(ds) == 5 and ds.classes == data.class_names
    item = ds[2]
    assert torch.equal((item["image"] * 255).round().to(torch.uint8), data.images[2])
    assert torch.equal(item["label"], data.labels[2].long())
    assert item["id"] == data.ids[2] and item["domain"] == "ade"


def test_filters_and_empty_selection(dataset):
    root, _ = dataset
    with pytest.raises(DataError, match="no samples"):
        SegmentationDataset(root, split="train")


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        SegmentationDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        SegmentationDataset(tmp_path / "empty")


def test_duplicate_ids_and_malformed_manifest(dataset):
    root, _ = dataset
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["samples"].append(manifest["samples"][0])
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="duplicate sample ids"):
        read_manifest(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(root)
    (root / "manifest.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(DataError, match="samples"):
        read_manifest(root)


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("kind", ["gray", "rgba", "palette", "16bit"])
def test_image_modes_are_converted(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "gray":
        path = _save(tmp_path / "g.png", rng.integers(0, 255, (6, 5), dtype=np.uint8))
    elif kind == "rgba":
        path = _save(tmp_path / "a.png", rng.integers(0, 255, (6, 5, 4), dtype=np.uint8))
    elif kind == "palette":
        path = tmp_path / "p.png"
        Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).convert("P").save(path)
    else:
        path = tmp_path / "w.png"
        Image.fromarray(rng.integers(0, 65535, (6, 5), dtype=np.uint16)).save(path)
    img = read_image(path)
    assert img.shape == (3, 6, 5) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1


def test_16bit_images_scale_by_bit_depth_not_by_their_data(tmp_path):
    """A dark 16-bit photo (max 200 of 65535) stays dark, as read from a file, a PIL image or an array."""
    from semla_lab.library.predictor import as_image_tensor
    dark = np.random.default_rng(0).integers(0, 201, (6, 5), dtype=np.uint16)
    dark[0, 0] = 200
    path = _save(tmp_path / "dark16.png", dark)
    expected = torch.from_numpy(dark.astype(np.float32) / 65535).expand(3, -1, -1)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
        from_pil = as_image_tensor(im)
    rgb = np.repeat(dark[..., None], 3, axis=2)
    for img in (read_image(path), as_image_tensor(path), from_pil, as_image_tensor(rgb)):
        assert torch.allclose(img, expected, atol=1e-7) and float(img.max()) == pytest.approx(200 / 65535)


def test_unreadable_truncated_and_non_image_files(tmp_path):
    good = _save(tmp_path / "good.png", np.zeros((8, 8, 3), dtype=np.uint8))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:30])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("trunc.png", "notes.txt", "empty.png"):
        with pytest.raises(DataError, match="cannot read image"):
            read_image(tmp_path / name)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")


def test_huge_image_refused(tmp_path, monkeypatch):
    import semla_lab.data.datasets as data
    monkeypatch.setattr(data, "MAX_PIXELS", 100)
    path = _save(tmp_path / "big.png", np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="pixel limit"):
        read_image(path)


def test_bad_labels(tmp_path):
    lab = _save(tmp_path / "l.png", np.array([[0, 1], [255, 2]], dtype=np.uint8))
    assert read_label(lab, 3).tolist() == [[0, 1], [255, 2]]
    with pytest.raises(DataError, match=r"ids \[2\] outside the 2 classes"):
        read_label(lab, 2)
    with pytest.raises(DataError, match="but its image is"):
        read_label(lab, 3, size=(4, 4))
    rgb = _save(tmp_path / "rgb.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="mode RGB"):
        read_label(rgb, 3)


def test_dataset_item_with_mismatched_label_names_both(dataset):
    root, _ = dataset
    ds = SegmentationDataset(root)
    label_path = root / ds.samples[0]["label"]
    _save(label_path, np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(DataError, match="10x10 but its image is 64x64"):
        ds[0]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 2), dtype=np.uint8), "HxWx3"),
    (torch.zeros(1, 8, 8), r"\(3, H, W\)"),
    (torch.full((3, 4, 4), float("nan")), "NaN"),
    ("no/such/image.png", "not found"),
])
def test_predictor_image_inputs_rejected_clearly(bad, message):
    from semla_lab.library.predictor import as_image_tensor
    with pytest.raises((ValueError, DataError), match=message):
        as_image_tensor(bad)


def test_predictor_accepts_path_pil_array_and_tensor(tmp_path):
    from semla_lab.library.predictor import as_image_tensor
    arr = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    ref = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    for value in (tmp_path / "x.png", Image.fromarray(arr), arr, torch.from_numpy(arr).permute(2, 0, 1)):
        assert torch.allclose(as_image_tensor(value), ref)


def test_empty_domain_cannot_train_or_evaluate(tiny_segmenter):
    from semla_lab.data.sources import load_target
    from semla_lab.training.train import train_adapter
    with pytest.raises(ValueError, match="needs training images"):
        train_adapter(tiny_segmenter, torch.zeros(2, 64), torch.zeros(0, 3, 64, 64, dtype=torch.uint8),
                      torch.zeros(0, 64, 64, dtype=torch.uint8), "unused", "base")
    import yaml
    from semla_lab.data.world.generate import mini_dir
    spec = yaml.safe_load((mini_dir() / "nyu.yaml").read_text())
    spec.update(name="empty", splits={"train": 10, "test": 0})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "empty.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ValueError, match="no test images"):
            load_target(str(path))


@pytest.mark.parametrize("field, value, pattern", [
    ("image", "/etc/hostname", "image path '/etc/hostname'.*relative"),
    ("label", "../../outside.png", r"label path '\.\./\.\./outside\.png'.*inside the dataset folder"),
    ("name", "../../escape", r"name '\.\./\.\./escape' is not usable as a folder name"),
    ("name", ".hidden", r"name '\.hidden' is not usable"),
])
def test_a_manifest_pointing_outside_its_folder_is_refused(dataset, field, value, pattern):
    root, _ = dataset
    manifest = json.loads((root / "manifest.json").read_text())
    if field == "name":
        manifest["name"] = value                       # would become a path under the build's staging folder
    else:
        manifest["samples"][1][field] = value
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=pattern):
        SegmentationDataset(root)
