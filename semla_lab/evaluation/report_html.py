"""The domain-shift report (domain_shift.ShiftAnalysis) as one self-contained HTML file: every figure is a
base64 PNG inside the page, tables are HTML, there are no scripts and no links to other files, so it opens
in any browser and can be mailed alone. `write_report` puts report.html, images.csv and each figure as a PNG
into one output folder, staged inside it and moved into place only when everything is written.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import plots
from ..core.io import atomic_folder, atomic_write_bytes, atomic_write_text
from ..data.datasets import read_image
from .domain_shift import ShiftAnalysis, map_coordinates

THUMBNAILS = 12            # least-covered images shown
THUMBNAIL_SIDE = 160       # ... at most this many pixels on the longest side
MAX_OVERLAY_SIDE = 640     # mask overlays above this size are shown downscaled (computed at full size)
CSV, HTML, FIGURES = "images.csv", "report.html", "figures"

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}
figure{display:inline-block;margin:0.5em;vertical-align:top}figcaption{font-size:12px;max-width:640px}
img{max-width:100%}.row{display:flex;flex-wrap:wrap;align-items:flex-start}"""


@dataclass
class Figure:
    """One figure of the report: PNG bytes and a caption."""
    png: bytes
    caption: str


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def array_png(array: np.ndarray, max_side: int | None = None) -> bytes:
    image = Image.fromarray(array)
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _thumbnail(image: torch.Tensor, side: int = THUMBNAIL_SIDE) -> torch.Tensor:
    """(3, H, W) -> longest side at most `side` (antialiased), aspect kept."""
    scale = side / max(image.shape[1:])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def report_figures(analysis: ShiftAnalysis, library) -> dict[str, Figure]:
    """Every figure of the report by file stem: map, distances, borrowed, least_covered and, with class
    names, three per mask sample (image, zero-shot, SemLA overlays at the image's own size)."""
    ok = analysis.analysed
    coverage = ok["coverage"].to_numpy(dtype=float)
    names = analysis.domains
    xy = map_coordinates(analysis, library.centroids(names))
    figures = {"map": Figure(figure_png(plots.shift_map(xy["reference"], analysis.reference.domains, xy["centroids"],
                                                        names, xy["images"], coverage, xy["method"])),
                             f"{len(ok)} images and {len(analysis.reference.domains)} held-out images of the library's "
                             f"domains, projected with {xy['method']}; colour: coverage.")}
    figures["distances"] = Figure(
        figure_png(plots.distance_histogram(ok["nearest_distance"].to_numpy(dtype=float),
                                            analysis.reference.distances.numpy())),
        "Distance to the nearest centroid: your images against the library's own held-out images "
        "(dashed: their 95th percentile).")
    borrowed = analysis.borrowed()
    figures["borrowed"] = Figure(figure_png(plots.borrow_bars(borrowed)),
                                 "Share of SemLA's fusion weight that each library domain receives over your images.")
    worst = analysis.least_covered(THUMBNAILS)
    figures["least_covered"] = Figure(
        figure_png(plots.thumbnail_grid([_thumbnail(read_image(f)) for f in worst["file"]],
                                        [f"{Path(f).name}\nd={d:.2f} {n}" for f, d, n in
                                         zip(worst["file"], worst["nearest_distance"], worst["nearest_domain"])])),
        f"The {len(worst)} images farthest from every centroid (d: distance to the nearest, and its domain).")
    for i, (file, masks) in enumerate(analysis.masks.items()):
        image = read_image(file)
        h, w = image.shape[1:]
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        figures[f"sample{i}_image"] = Figure(array_png(pixels, MAX_OVERLAY_SIDE), f"{Path(file).name} ({w}x{h})")
        for method, mask in masks.items():
            figures[f"sample{i}_{method.lower().replace('-', '_')}"] = Figure(
                array_png(plots.overlay_with_legend(image, mask, analysis.classes), MAX_OVERLAY_SIDE),
                f"{method}, mask {mask.shape[1]}x{mask.shape[0]}")
    return figures


def _img(name: str, figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode()
    return (f'<figure id="fig-{name}"><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")


def render_html(analysis: ShiftAnalysis, figures: dict[str, Figure], library, title: str = "Domain-shift report") -> str:
    """The whole report as one HTML string."""
    ok = analysis.analysed
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>Library: {html.escape(str(library.root))} ({len(analysis.domains)} domains usable, K={analysis.retrieval.indices.shape[1]} retrieved per image).</p>",
             "<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in analysis.summary()) + "</ul>",
             "<h2>Where your images lie among the library's domains</h2>", _img("map", figures["map"]),
             "<h2>How far, compared with the library's own images</h2>", _img("distances", figures["distances"]),
             "<p>Coverage of an image is the share of the library's in-domain distances that are at least as large "
             "as its distance to the nearest centroid: 1 = as close as the closest in-domain images, 0 = farther "
             "than all of them.</p>",
             "<h2>Which domains SemLA borrows from</h2>", _img("borrowed", figures["borrowed"]),
             analysis.borrowed().to_html(float_format="{:.3f}".format),
             "<h2>Least-covered images</h2>", _img("least_covered", figures["least_covered"])]
    if analysis.masks:
        parts.append("<h2>What adaptation changes in the masks</h2><p>Zero-shot (base segmenter) and SemLA masks "
                     "for a sample spread from the best- to the worst-covered image, each computed at the image's "
                     "own resolution.</p>")
        for i in range(len(analysis.masks)):
            parts.append("<div class='row'>" + "".join(_img(n, f) for n, f in figures.items()
                                                       if n.startswith(f"sample{i}_")) + "</div>")
    if analysis.miou is not None:
        parts += ["<h2>mIoU per method on the labelled images</h2>",
                  analysis.miou.to_frame().to_html(float_format="{:.1f}".format)]
    skipped = analysis.skipped
    parts.append(f"<h2>Skipped files ({len(skipped)})</h2>")
    parts.append(skipped.to_html(index=False) if len(skipped) else "<p>None: every file was read.</p>")
    columns = ["file", "width", "height", "nearest_domain", "nearest_distance", "coverage"]
    parts += [f"<h2>Every analysed image ({len(ok)})</h2><p>{CSV} holds these rows with every retrieved domain, "
              "distance and weight, and the skipped files.</p>",
              ok[columns].to_html(index=False, float_format="{:.3f}".format), "</body></html>"]
    return "\n".join(parts)


class _ReportReader(HTMLParser):
    """Collects the summary items and each figure's embedded PNG of a page that render_html wrote."""

    def __init__(self):
        super().__init__()
        self.summary, self.figures, self._figure, self._in_item = [], {}, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure" and attrs.get("id", "").startswith("fig-"):
            self._figure = attrs["id"][4:]
        elif tag == "img" and self._figure and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.figures[self._figure] = base64.b64decode(attrs["src"].split(",", 1)[1])
        elif tag == "li" and not self.figures:            # the summary list comes before the first figure
            self._in_item = True
            self.summary.append("")

    def handle_endtag(self, tag):
        self._figure = None if tag == "figure" else self._figure
        self._in_item = False if tag == "li" else self._in_item

    def handle_data(self, data):
        if self._in_item:
            self.summary[-1] += data


def read_report(path: str | Path) -> dict:
    """Open a written report.html: {"summary": its summary lines, "figures": {name: PNG bytes}}."""
    reader = _ReportReader()
    reader.feed(Path(path).read_text(encoding="utf-8"))
    reader.close()
    return {"summary": reader.summary, "figures": reader.figures}


def write_report(analysis: ShiftAnalysis, library, out: str | Path) -> dict[str, Path]:
    """Write report.html, images.csv and figures/<name>.png into `out` (created if needed). Everything is
    rendered first and then written atomically (core/io.py), so an error leaves an earlier report untouched;
    nothing is written outside `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = report_figures(analysis, library)
    csv, page = analysis.table.to_csv(index=False).encode(), render_html(analysis, figures, library)
    with atomic_folder(out / FIGURES, replace=True) as stage:
        for name, figure in figures.items():
            atomic_write_bytes(stage / f"{name}.png", figure.png)
    atomic_write_bytes(out / CSV, csv)
    atomic_write_text(out / HTML, page)
    return {"report": out / HTML, "csv": out / CSV, "figures": out / FIGURES}
