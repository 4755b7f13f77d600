"""Your own images: `semla-lab analyze` on a folder of mixed-size photos (report, CSV, figures), the batched
predictor against one image per call, `semla-lab segment` at the image's size, and bad input."""
import base64
import csv
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semla_lab.cli import main
from semla_lab.workflows.analyze import analyze, analyze_images
from semla_lab.evaluation.domain_shift import borrowed, coverage_scores, spread_sample
from semla_lab.library.predictor import SemLAPredictor
from semla_lab.core.retrieval import Retrieval
from semla_lab.data.world.photos import CORRUPT, vocabulary_classes, write_photo_folder

HELD_OUT = str(Path(__file__).resolve().parents[1] / "semla_lab/data_manifests/heldout/indian_rain_lowres.yaml")
SMALL = ((48, 40), (64, 64), (80, 56), (40, 72), (96, 96))          # quick to write and to segment
CLASSES = vocabulary_classes("cityscapes")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def predictor():
    return SemLAPredictor.from_assets(device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """200 images of four domains (one held out) in five sizes and three formats, their label masks, a corrupt
    JPEG, a text file and a hidden file."""
    root = tmp_path_factory.mktemp("photos")
    write_photo_folder(root / "shots", ["cityscapes", "acdc_night", "muses_fog_day", HELD_OUT], 50, SMALL,
                       labels=root / "labels")
    (root / "shots" / "notes.txt").write_text("not an image\n")
    (root / "shots" / ".DS_Store").write_bytes(b"\0\0")
    return root


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def _listing(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.slow
def test_analyze_folder_writes_report_csv_and_figures(capsys, photos, tmp_path):
    before = _listing(photos)
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "analyze", photos / "shots", "--out", out, "--classes", ",".join(CLASSES),
                            "--labels", photos / "labels", "--quiet", "--batch-size", "64")
    assert code == 0, err
    assert _listing(photos) == before, "analyze wrote outside --out"
    assert sorted(p.name for p in out.iterdir()) == ["figures", "images.csv", "report.html"], "staging left behind"
    rows = list(csv.DictReader((out / "images.csv").open()))
    assert len(rows) == 202                                     # 200 images, corrupt.jpg, notes.txt; .DS_Store hidden
    skipped = {Path(r["file"]).name: r["reason"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {CORRUPT, "notes.txt"} and all("cannot read image" in r for r in skipped.values())
    ok = [r for r in rows if r["status"] == "analysed"]
    assert {(int(float(r["width"])), int(float(r["height"]))) for r in ok} == set(SMALL)
    for r in ok:
        with Image.open(r["file"]) as im:
            assert im.size == (int(float(r["width"])), int(float(r["height"])))
        assert 0 <= float(r["coverage"]) <= 1 and float(r["nearest_distance"]) == float(r["distance_1"])
        assert abs(sum(float(r[f"weight_{k}"]) for k in range(1, 6)) - 1) < 1e-5
        assert r["nearest_domain"] == r["domain_1"] and r["label"] and 0 <= float(r["miou_semla"]) <= 100
    own = [r for r in ok if Path(r["file"]).name.startswith("cityscapes")]
    held = [r for r in ok if Path(r["file"]).name.startswith("indian_rain_lowres")]
    assert np.median([float(r["coverage"]) for r in own]) > np.median([float(r["coverage"]) for r in held]), \
        "images of a library domain must be better covered than a held-out domain's"
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    assert not page.open, f"unclosed tags {page.open}"
    figures = sorted((out / "figures").glob("*.png"))
    assert {f.stem for f in figures} >= {"map", "distances", "borrowed", "least_covered", "sample0_semla"}
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in page.images if src.startswith("data:image/png;base64,")}
    assert len(page.images) == len(figures) and all(f.read_bytes() in embedded for f in figures)
    text = " ".join(page.text)
    for name, reason in skipped.items():
        assert name in text and reason in text
    assert "mIoU per method" in text and "SemLA" in text
    assert "analysed 200 image(s)" in stdout and "skipped 2 unreadable file(s)" in stdout


@pytest.fixture(scope="module")
def reference(predictor):
    from semla_lab.evaluation.domain_shift import in_domain_reference
    return in_domain_reference(predictor.clip, predictor.library, predictor.library.names())


def test_analysis_rows_equal_one_image_at_a_time(predictor, photos, reference):
    """One retrieval per image, in batches, equals set_image on each file alone; coverage follows its definition;
    max_images stops reading."""
    analysis = analyze_images([photos / "shots" / CORRUPT, photos / "shots" / "acdc_night_*"], predictor,
                              max_images=20, sample=0, reference=reference, progress=False)
    table = analysis.analysed
    assert len(table) == 20 and list(analysis.skipped["file"]) == [str(photos / "shots" / CORRUPT)]
    assert len(analysis.table) == 21, "files after the 20th image are not read"
    assert len(analysis.embeddings) == 20 and len(analysis.retrieval.indices) == 20 and not analysis.masks
    for i in (0, 7, 19):
        predictor.set_image(table["file"].iloc[i])
        chosen = predictor.explain()
        assert [c[0] for c in chosen] == [table[f"domain_{k}"].iloc[i] for k in range(1, 6)]
        assert np.allclose([c[2] for c in chosen], [table[f"weight_{k}"].iloc[i] for k in range(1, 6)], atol=1e-6)
        d = table["nearest_distance"].iloc[i]
        assert table["coverage"].iloc[i] == pytest.approx(float((analysis.reference.distances >= d).double().mean()))
    assert set(analysis.reference.domains) == set(predictor.library.names()) and not analysis.reference.missing


def test_coverage_borrowed_and_sample_math():
    assert coverage_scores(torch.tensor([0.0, 0.25, 1.0]), torch.tensor([0.1, 0.2, 0.3, 0.4])).tolist() == [1, 0.5, 0]
    assert math.isnan(coverage_scores(torch.tensor([0.5]), torch.zeros(0))[0])
    r = Retrieval(torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.zeros(2, 4),
                  ["a", "b", "c", "d"])
    table = borrowed(r)
    assert list(table.index) == ["a", "c", "b"] and table["weight share"].tolist() == [0.625, 0.25, 0.125]
    assert table["top-1 images"].tolist() == [2, 0, 0]
    assert spread_sample(np.array([5.0, 1.0, 3.0, 2.0, 4.0]), 3) == [1, 2, 0]        # smallest, middle, largest


def test_predictor_list_of_images_equals_one_per_call(predictor, photos):
    files = sorted((photos / "shots").glob("muses_fog_day_00*"))[:5]
    images = [str(files[0]), Image.open(files[1]).convert("RGB"), torch.rand(3, 512, 600), *files[2:]]
    predictor.batch_size = 2                                           # three forwards for five images
    try:
        predictor.set_image_batch(images, exclude=["muses_fog_day"])
        masks, chosen = predictor.predict_batch(CLASSES), predictor.explain_batch()
        zero_shot = predictor.predict_batch(CLASSES, adapt=False)
        with pytest.raises(RuntimeError, match="use predict_batch"):
            predictor.predict(CLASSES)
    finally:
        predictor.batch_size = 16
    assert len(masks) == len(images) and masks[2].shape == (512, 600)
    for image, mask, zs, expl in zip(images, masks, zero_shot, chosen):
        predictor.set_image(image, exclude=["muses_fog_day"])
        assert [c[0] for c in predictor.explain()] == [c[0] for c in expl]
        assert np.allclose([c[2] for c in predictor.explain()], [c[2] for c in expl], atol=1e-6)
        assert torch.equal(predictor.predict(CLASSES), mask) and torch.equal(predictor.predict(CLASSES, adapt=False), zs)


def test_segment_600x512_jpeg_gives_mask_and_overlay_of_its_size(capsys, tmp_path):
    image = tmp_path / "street.jpg"
    shot = write_photo_folder(tmp_path / "shots", ["cityscapes"], 1, sizes=((600, 512),), corrupt=False)[0]
    Image.open(shot).save(image, quality=90)
    code, out, err = run(capsys, "segment", image, "--classes", "road,car,sky,building", "--out", tmp_path / "o.png",
                         "--mask", tmp_path / "mask.png", "--explain")
    assert code == 0, err
    with Image.open(tmp_path / "o.png") as overlay, Image.open(tmp_path / "mask.png") as mask:
        assert overlay.size == (600, 512) and mask.size == (600, 512) and mask.mode == "L"
        assert int(np.asarray(mask).max()) < 4
    assert "600x512 overlay of the 600x512 mask" in out
    weights = [float(line.split("weight")[1]) for line in out.splitlines() if "weight" in line]
    assert len(weights) == 5 and abs(sum(weights) - 1) < 2e-3


def _one_line_error(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_input_gives_one_line_and_writes_nothing(capsys, tmp_path, photos):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    huge = tmp_path / "huge.png"
    Image.new("L", (4100, 4100)).save(huge)
    orphan = tmp_path / "labels"
    orphan.mkdir()
    Image.new("L", (8, 8)).save(orphan / "no_such_image.png")
    cases = [
        (["analyze", empty, "--out", out], "no files found in"),
        (["analyze", tmp_path / "missing", "--out", out], "no such file or folder"),
        (["analyze", broken, "--out", out], "none of the 1 file(s) could be read as an image"),
        (["analyze", huge, "--out", out], "above the 16777216 pixel limit"),
        (["analyze", photos / "shots" / "cityscapes_000.jpg", "--labels", orphan, "--classes", "road", "--out", out],
         "have no image with the same stem: no_such_image.png"),
        (["analyze", broken, "--labels", orphan, "--out", out], "--labels needs --classes"),
        (["analyze", photos / "shots" / "cityscapes_000.jpg", "--exclude", "atlantis", "--out", out],
         "cannot exclude atlantis"),
        (["segment", huge, "--classes", "road", "--out", out / "o.png"], "above the 16777216 pixel limit"),
        (["segment", broken / "x.jpg", "--classes", "road", "--out", out / "o.png"], "cannot read image"),
    ]
    for argv, message in cases:
        last = _one_line_error(capsys, *argv)
        assert last.startswith("semla-lab: error:") and message in last, (argv, last)
        assert not out.exists(), f"{argv} wrote {list(out.rglob('*'))}"


def test_library_without_regenerable_domains_degrades_gracefully(predictor, photos, tmp_path):
    """A library whose domains are not mini-world domains: no in-domain reference, coverage NaN, PCA map, the
    summary says so, and the report still renders."""
    from semla_lab.library.index import AdapterLibrary
    from semla_lab.evaluation.report_html import write_report
    shipped = predictor.library
    lib = AdapterLibrary.create(tmp_path / "lib", shipped.embedder, shipped.base_model, shipped.lora_config)
    sites = ["cityscapes", "nyu", "acdc_night", "ade", "idd", "bdd"]
    for i, name in enumerate(sites):
        lib.add(f"site_{i}", shipped.adapter_path(name), shipped.get(name).centroid, 10)
    table = analyze([photos / "shots" / "cityscapes_00*"], library=tmp_path / "lib", progress=False)
    assert len(table) == 10 and table["coverage"].isna().all()
    assert set(table["nearest_domain"]) <= {f"site_{i}" for i in range(len(sites))}
    custom = SemLAPredictor(predictor._segmenter, predictor.clip, lib, device="cpu")
    analysis = analyze_images([photos / "shots" / "cityscapes_00*"], custom, classes=["road", "sky"], sample=2,
                              progress=False)
    assert analysis.reference.missing == [f"site_{i}" for i in range(len(sites))]
    assert any("no in-domain reference" in line for line in analysis.summary())
    written = write_report(analysis, lib, tmp_path / "report")
    assert "no in-domain reference" in written["report"].read_text()
    assert (written["figures"] / "sample1_semla.png").is_file()


def test_notebooks_draw_widget_progress_bars_without_silencing_ipywidgets():
    """No notebook filters tqdm's "IProgress not found" warning, and notebook 12's stored progress bars are
    Jupyter widgets (tqdm.auto with ipywidgets), as is notebook 05's K / tau explorer."""
    import json
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    for path in sorted(notebooks.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        assert not any("IProgress" in "".join(c["source"]) for c in nb["cells"]), path.name

    def widget_outputs(name):
        nb = json.loads((notebooks / name).read_text())
        return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]
                if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    bars = widget_outputs("12_analyse_your_own_images.ipynb")
    texts = ["".join(o["data"]["text/plain"]) for o in bars]
    assert any(t.startswith("analysing:") for t in texts) and any(t.startswith("in-domain reference:") for t in texts)
    assert widget_outputs("05_retrieve_and_fuse_one_image.ipynb"), "the explorer's sliders"
