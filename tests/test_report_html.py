"""The HTML report treats file names as text: a file named like markup shows as its name, never as markup."""
import html
from html.parser import HTMLParser

from semla_lab.data.world.photos import vocabulary_classes, write_photo_folder
from semla_lab.evaluation.domain_shift import in_domain_reference
from semla_lab.workflows.analyze import analyze_images
from semla_lab.evaluation.report_html import write_report
from semla_lab.library.predictor import SemLAPredictor

HOSTILE = "<img src=x onerror=alert(1)>"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_escapes_a_file_named_like_markup(tmp_path):
    shots = tmp_path / "shots"
    image = write_photo_folder(shots, ["cityscapes"], 1, [(48, 40)], corrupt=False)[0]
    image.rename(shots / f"{HOSTILE}.jpg")
    (shots / f"{HOSTILE}.txt").write_text("not an image\n")          # lands in the skipped-files table
    predictor = SemLAPredictor.from_assets(device="cpu")
    reference = in_domain_reference(predictor.clip, predictor.library, predictor.library.names(), count=2,
                                    progress=False)
    analysis = analyze_images(sorted(shots.iterdir()), predictor, classes=vocabulary_classes("cityscapes")[:4],
                              sample=1, reference=reference, progress=False)
    page = write_report(analysis, predictor.library, tmp_path / "report")["report"].read_text(encoding="utf-8")
    assert HOSTILE not in page and html.escape(HOSTILE) in page
    parser = _Tags()
    parser.feed(page)
    parser.close()
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert images and all(a["src"].startswith("data:image/png;base64,") and "onerror" not in a for a in images)
    assert sum(HOSTILE in t for t in parser.text) >= 3      # analysed row, skipped row and the sample's caption
