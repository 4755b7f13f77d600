"""Figures used by the CLI and the notebooks. Functions take data and return a matplotlib Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch


def _palette(n: int = 256, levels: int = 16) -> np.ndarray:
    """(n, 3) uint8 class colours: tab20 and Set2 first (the mini world's few classes keep their colours), then
    greedy farthest-point picks from a levels^3 RGB grid, each as far as possible from black (the ignore colour)
    and from every colour before it. Deterministic; distinct for ADE-150, PASCAL-Context-59 and COCO-Stuff-171."""
    chosen = list(np.array(sns.color_palette("tab20", 20) + sns.color_palette("Set2", 8)) * 255)
    axis = np.linspace(0, 255, levels)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    nearest = np.full(len(grid), np.inf)                       # distance of each grid colour to the chosen ones
    for c in [np.zeros(3), *chosen]:
        nearest = np.minimum(nearest, np.linalg.norm(grid - c, axis=1))
    while len(chosen) < n:
        chosen.append(grid[nearest.argmax()])
        nearest = np.minimum(nearest, np.linalg.norm(grid - chosen[-1], axis=1))
    return np.array(chosen).round().astype(np.uint8)


PALETTE = _palette()


def class_colors(ids) -> np.ndarray:
    """uint8 RGB colours (..., 3) of class ids (any shape): PALETTE[id mod len(PALETTE)]. Overlays and legends
    both colour through this, so a class has one colour everywhere."""
    return PALETTE[np.asarray(ids, dtype=np.int64) % len(PALETTE)]


def colorize(label: torch.Tensor) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours (class_colors); 255 (ignore) is black."""
    lab = label.cpu().numpy().astype(np.int64)
    out = class_colors(lab)
    out[lab == 255] = 0
    return out


def overlay(image: torch.Tensor, label: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """(3, H, W) image (uint8 or float) blended with its colourised label map -> (H, W, 3) uint8."""
    img = image.float().div(255) if image.dtype == torch.uint8 else image.float()
    img = (img.permute(1, 2, 0).cpu().numpy() * 255).astype(np.float32)
    return ((1 - alpha) * img + alpha * colorize(label)).astype(np.uint8)


def sample_grid(splits: list, per_domain: int = 3, overlay_alpha: float = 0.55):
    """Rows: domains; columns: image / label overlay pairs for the first `per_domain` samples."""
    fig, axes = plt.subplots(len(splits), 2 * per_domain, figsize=(2 * per_domain * 1.3, len(splits) * 1.35),
                             squeeze=False)
    for r, split in enumerate(splits):
        for i in range(per_domain):
            axes[r, 2 * i].imshow(split.images[i].permute(1, 2, 0).numpy())
            axes[r, 2 * i + 1].imshow(overlay(split.images[i], split.labels[i], overlay_alpha))
        axes[r, 0].set_ylabel(split.name, rotation=0, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    return fig


def label_legend(class_names: list[str]):
    """A small legend figure mapping colours to class names."""
    fig, ax = plt.subplots(figsize=(2.2, 0.22 * len(class_names) + 0.3))
    for i, name in enumerate(class_names):
        ax.add_patch(plt.Rectangle((0, -i), 0.8, 0.8, color=class_colors(i) / 255))
        ax.text(1.1, -i + 0.4, name, va="center", fontsize=8)
    ax.set_xlim(0, 6)
    ax.set_ylim(-len(class_names), 1)
    ax.axis("off")
    return fig


def prediction_row(image: torch.Tensor, masks: dict[str, torch.Tensor]):
    """The image followed by one colourised mask per entry of `masks` (title -> (H, W))."""
    fig, axes = plt.subplots(1, 1 + len(masks), figsize=(2 * (1 + len(masks)), 2.2))
    img = image.float().div(255) if image.dtype == torch.uint8 else image
    axes[0].imshow(img.permute(1, 2, 0).cpu().numpy())
    axes[0].set_title("image", fontsize=9)
    for ax, (title, mask) in zip(axes[1:], masks.items()):
        ax.imshow(colorize(mask))
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def heatmap(matrix: pd.DataFrame, title: str = "", fmt: str = ".2f", annot: bool = True, cmap: str = "viridis",
            figsize=(9, 7)):
    fig, ax = plt.subplots(figsize=figsize)
    sns.heatmap(matrix, annot=annot, fmt=fmt, cmap=cmap, ax=ax, annot_kws={"fontsize": 6}, cbar=True)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def transfer_heatmap(matrix: pd.DataFrame, figsize=(11, 8)):
    """(targets x adapters) mIoU change against zero-shot, red = harm, blue = help, own adapter boxed."""
    fig, ax = plt.subplots(figsize=figsize)
    lim = max(abs(matrix.min().min()), abs(matrix.max().max()), 1)
    sns.heatmap(matrix, annot=True, fmt=".0f", cmap="RdBu", center=0, vmin=-lim, vmax=lim, ax=ax,
                annot_kws={"fontsize": 6}, cbar_kws={"label": "mIoU - zero-shot"})
    for i, t in enumerate(matrix.index):
        if t in matrix.columns:
            ax.add_patch(plt.Rectangle((list(matrix.columns).index(t), i), 1, 1, fill=False, lw=1.5))
    ax.set_xlabel("adapter applied alone")
    ax.set_ylabel("target domain")
    fig.tight_layout()
    return fig


def method_bars(results: dict, methods: list[str] | None = None, figsize=(12, 4)):
    """Grouped bars: per-domain mIoU of each method (results as in results.json["results"])."""
    rows = [{"domain": d, "method": m, "mIoU": v} for m, r in results.items() if not methods or m in methods
            for d, v in r["per_domain"].items()]
    fig, ax = plt.subplots(figsize=figsize)
    sns.barplot(pd.DataFrame(rows), x="domain", y="mIoU", hue="method", ax=ax)
    ax.tick_params(axis="x", rotation=75, labelsize=8)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def embedding_scatter(points: np.ndarray, labels: list[str], centroids: np.ndarray | None = None,
                      centroid_labels: list[str] | None = None, title: str = "", figsize=(9, 7)):
    """2-D scatter of embedded images coloured by domain, with centroids marked as stars."""
    fig, ax = plt.subplots(figsize=figsize)
    names = list(dict.fromkeys(labels))
    colors = dict(zip(names, sns.color_palette("tab20", len(names))))
    for name in names:
        sel = np.array([lab == name for lab in labels])
        ax.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.6, color=colors[name], label=name)
    if centroids is not None:
        for (x, y), name in zip(centroids, centroid_labels):
            ax.scatter([x], [y], marker="*", s=160, color=colors.get(name, "k"), edgecolor="k", linewidth=0.8)
    ax.legend(fontsize=6, markerscale=2, ncol=2, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


# -- notebooks 01-03
def _as_hwc(image: torch.Tensor) -> np.ndarray:
    img = image.float().div(255) if image.dtype == torch.uint8 else image.float()
    return img.clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def image_grid(rows: dict[str, list[torch.Tensor]], col_titles: list[str] | None = None, cell: float = 1.3):
    """A grid of (3, H, W) images: one row per entry of `rows` (label -> images), optional column titles."""
    ncols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * cell + 1.1, len(rows) * cell + 0.25 * bool(col_titles)),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            axes[r, c].imshow(_as_hwc(image))
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for c, title in enumerate(col_titles or []):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
    fig.tight_layout(pad=0.2, w_pad=0.1, h_pad=0.1)
    return fig


def domain_bars(scores: dict[str, float], highlight: tuple[str, ...] = ("source",), ylabel: str = "mIoU",
                title: str = "", figsize=(10, 3.2)):
    """One bar per domain (in the given order); domains in `highlight` drawn in a contrasting colour."""
    names = list(scores)
    colors = ["tab:orange" if n in highlight else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=figsize)
    ax.bar(range(len(names)), [scores[n] for n in names], color=colors)
    ax.set_xticks(range(len(names)), names, rotation=75, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def prediction_grid(rows: list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]], cell: float = 1.7):
    """Several prediction_row's in one figure: each row is (label, (3, H, W) image, {title: (H, W) mask})."""
    ncols = 1 + max(len(masks) for _, _, masks in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * cell, len(rows) * cell), squeeze=False)
    for r, (label, image, masks) in enumerate(rows):
        axes[r, 0].imshow(_as_hwc(image))
        axes[r, 0].set_ylabel(label, fontsize=8)
        for c, (title, mask) in enumerate(masks.items(), start=1):
            axes[r, c].imshow(colorize(mask))
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    return fig


# -- notebooks 04-06
def annotate_points(fig, points: np.ndarray, labels: list[str], fontsize: int = 7):
    """Write each label next to its 2-D point (e.g. the centroid stars of embedding_scatter) on the
    figure's first axes; returns the figure."""
    ax = fig.axes[0]
    for (x, y), text in zip(np.asarray(points), labels):
        ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=fontsize)
    return fig


def distance_bars(dist: pd.Series, chosen: list[str], excluded: list[str] = (), title: str = "", ax=None):
    """Distances from one query to every centroid (Series name -> distance), nearest first; the chosen
    (top-K) domains in colour, excluded ones hatched. Returns the figure."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.8))
    dist = dist.sort_values()
    colors = ["tab:orange" if n in chosen else "lightgrey" for n in dist.index]
    bars = ax.bar(range(len(dist)), dist.values, color=colors, edgecolor="k", linewidth=0.4)
    for bar, name in zip(bars, dist.index):
        if name in excluded:
            bar.set_hatch("///")
            bar.set_facecolor("white")
    ax.set_xticks(range(len(dist)), dist.index, rotation=75, fontsize=7)
    ax.set_ylabel("distance")
    ax.set_title(title, fontsize=9)
    ax.figure.tight_layout()
    return ax.figure


def k_tau_panel(image: torch.Tensor, label: torch.Tensor | None, mask: torch.Tensor,
                chosen: list[tuple[str, float, float]], title: str = "", figsize=(11, 2.6)):
    """One image under one (K, tau): the image, its ground truth (when given), the SemLA mask and the fusion
    weight of each retrieved domain (analysis.semla_with's result)."""
    panels = 3 + (label is not None)
    fig, axes = plt.subplots(1, panels, figsize=figsize, gridspec_kw={"width_ratios": [1] * (panels - 1) + [2]})
    views = [("image", _as_hwc(image))] + ([("ground truth", colorize(label))] if label is not None else []) \
        + [("SemLA", colorize(mask))]
    for ax, (name, pixels) in zip(axes, views):
        ax.imshow(pixels)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    bars = axes[-1]
    bars.barh(range(len(chosen)), [w for _, _, w in chosen], color="tab:orange")
    bars.set_yticks(range(len(chosen)), [f"{n} (d={d:.2f})" for n, d, _ in chosen], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_xlabel("fusion weight", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def weights_vs_tau_plot(tables: dict[str, pd.DataFrame], default_tau: float = 0.05, figsize=(10, 3)):
    """One panel per query: the weight of each retrieved adapter (rank 1..K, nearest first) against
    tau (log axis), from analysis.weights_vs_tau; a dotted line marks the paper's tau."""
    fig, axes = plt.subplots(1, len(tables), figsize=figsize, squeeze=False, sharey=True)
    for ax, (title, table) in zip(axes[0], tables.items()):
        for col in table.columns:
            ax.plot(table.index, table[col], marker=".", label=col)
        ax.axvline(default_tau, color="k", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("tau")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("fusion weight")
    fig.tight_layout()
    return fig


def ablation_curves(tables: dict[str, pd.DataFrame], references: dict[str, float] | None = None,
                    y: str = "hmean", hue: str | None = None, log_x: tuple[str, ...] = ("tau",), figsize=(9, 3)):
    """One panel per knob (knob -> run_ablation rows varying only that knob): y against the knob's
    values, one line per value of the `hue` column where a table has it, and horizontal reference
    lines (e.g. zero-shot and oracle h-mean)."""
    fig, axes = plt.subplots(1, len(tables), figsize=figsize, squeeze=False, sharey=True)
    ref_colors = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:gray")
    for ax, (knob, table) in zip(axes[0], tables.items()):
        split = bool(hue) and hue in table and table[hue].nunique() > 1
        groups = table.groupby(hue, sort=False) if split else [("SemLA", table)]
        for i, (name, rows) in enumerate(groups):
            ax.plot(rows[knob], rows[y], marker="o", color=("k", "tab:orange", "tab:red")[i % 3],
                    label=f"SemLA, {hue}={name}" if split else name)
        for color, (name, value) in zip(ref_colors, (references or {}).items()):
            ax.axhline(value, linestyle="--", linewidth=1, color=color, label=name)
        if knob in log_x:
            ax.set_xscale("log")
        values = sorted(set(table[knob]))
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel(knob)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_ylabel(y)
    fig.tight_layout()
    return fig


# -- notebook 12, `semla-lab analyze` and `segment`: a folder of the user's own images
def overlay_with_legend(image: torch.Tensor, mask: torch.Tensor, class_names: list[str], alpha: float = 0.5) -> np.ndarray:
    """(3, H, W) image blended with its (H, W) mask, and a legend of the classes present drawn in the top-left
    corner: (H, W, 3) uint8, the image's own size. The legend's text scales with the image height."""
    from PIL import Image, ImageDraw, ImageFont
    canvas = Image.fromarray(overlay(image, mask, alpha))
    present = [int(c) for c in torch.unique(mask).tolist() if 0 <= c < len(class_names)]
    size = max(8, min(24, image.shape[1] // 16))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(canvas, "RGBA")
    width = max(draw.textlength(class_names[c], font=font) for c in present) if present else 0
    pad, line = max(2, size // 4), size + max(2, size // 4)
    draw.rectangle((0, 0, 3 * pad + size + width, pad + line * len(present)), fill=(0, 0, 0, 150))
    for row, c in enumerate(present):
        y = pad + row * line
        draw.rectangle((pad, y, pad + size, y + size), fill=tuple(int(v) for v in class_colors(c)))
        draw.text((2 * pad + size, y), class_names[c], fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def shift_map(reference_xy: np.ndarray, reference_domains: list[str], centroid_xy: np.ndarray,
              centroid_names: list[str], image_xy: np.ndarray, coverage: np.ndarray, method: str, figsize=(9, 7)):
    """The library's domains in 2-D (held-out images faint, coloured by domain; centroids as labelled stars)
    and the analysed images on top, coloured by coverage (red = poorly covered; black when unknown)."""
    fig, ax = plt.subplots(figsize=figsize)
    colors = dict(zip(centroid_names, sns.color_palette("tab20", len(centroid_names))))
    domains = np.asarray(reference_domains)
    for name in dict.fromkeys(reference_domains):
        sel = domains == name
        ax.scatter(reference_xy[sel, 0], reference_xy[sel, 1], s=5, alpha=0.25, color=colors.get(name, "grey"))
    for (x, y), name in zip(centroid_xy, centroid_names):
        ax.scatter([x], [y], marker="*", s=150, color=colors[name], edgecolor="k", linewidth=0.7)
        ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6)
    known = ~np.isnan(coverage)
    if known.any():
        points = ax.scatter(image_xy[known, 0], image_xy[known, 1], c=coverage[known], cmap="RdYlGn", vmin=0, vmax=1,
                            s=22, edgecolor="k", linewidth=0.4, marker="o")
        fig.colorbar(points, ax=ax, label="coverage (share of in-domain distances at least as large)")
    ax.scatter(image_xy[~known, 0], image_xy[~known, 1], s=22, color="k", marker="o")
    ax.set_title(f"your images on the library's domains ({method}; stars: centroids, faint: held-out domain images)",
                 fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def distance_histogram(image_distances: np.ndarray, reference_distances: np.ndarray, figsize=(7, 3)):
    """Distance to the nearest centroid of the analysed images against the library's in-domain distances
    (held-out images to their own centroid), as densities; the dashed line marks the in-domain 95th percentile."""
    fig, ax = plt.subplots(figsize=figsize)
    both = np.concatenate([image_distances, reference_distances])
    bins = np.linspace(both.min(), both.max(), 30)
    if len(reference_distances):
        ax.hist(reference_distances, bins=bins, density=True, alpha=0.5, color="tab:blue",
                label="library's held-out images, to their own centroid")
        ax.axvline(np.quantile(reference_distances, 0.95), color="tab:blue", linestyle="--", linewidth=1)
    ax.hist(image_distances, bins=bins, density=True, alpha=0.6, color="tab:orange",
            label="your images, to the nearest centroid")
    ax.set_xlabel("distance")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def borrow_bars(borrowed: pd.DataFrame, figsize=(7, 3)):
    """Weight share of each library domain over the analysed images (domain_shift.borrowed), largest first."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.bar(range(len(borrowed)), 100 * borrowed["weight share"].to_numpy(), color="tab:orange")
    ax.set_xticks(range(len(borrowed)), borrowed.index, rotation=75, fontsize=7)
    ax.set_ylabel("share of fusion weight (%)")
    fig.tight_layout()
    return fig


def thumbnail_grid(images: list[torch.Tensor], captions: list[str], ncols: int = 6, cell: float = 1.6):
    """Images of any sizes (3, H, W) in a grid, aspect kept, one caption under each."""
    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell, nrows * (cell + 0.35)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(_as_hwc(image))
        ax.set_title(caption, fontsize=6)
    fig.tight_layout(pad=0.3)
    return fig


def vocabulary_bars(effect: pd.DataFrame, title: str = "", figsize=(8, 4)):
    """Mean IoU change per target class over adapters (a `transfer.vocabulary_effect` table), one bar per
    class, coloured by whether the adapters' vocabulary has the class's concept."""
    per = effect.groupby("class", sort=False).agg(change=("change", "mean"), inside=("in_vocabulary", "first"))
    per = per.sort_values("change")
    fig, ax = plt.subplots(figsize=figsize)
    ax.bar(per.index, per["change"], color=["tab:blue" if v else "tab:orange" for v in per["inside"]])
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_ylabel("IoU change (adapter - zero-shot)")
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:blue"), plt.Rectangle((0, 0), 1, 1, color="tab:orange")],
              labels=["in the adapter's vocabulary", "not in it"], fontsize=8)
    ax.set_title(title, fontsize=9)

# -- notebook 11
SCALING_COLORS = {"zero_shot": "tab:gray", "uniform": "tab:blue", "semla": "tab:orange", "oracle": "tab:green"}


def scaling_curves(table: pd.DataFrame, oracle: float | None = None, figsize=(11, 4.8)):
    """Left: h-mean against library size per method (scaling.scaling_table rows), the mean of the random
    orders as a solid line over their min-max band, the active order dashed, the oracle as a horizontal
    line. Right: the targets' coverage distance (mean distance to the nearest library centroid) per order."""
    fig, (ax, cov) = plt.subplots(1, 2, figsize=figsize, gridspec_kw={"width_ratios": (1.6, 1)})
    sizes = sorted(table["size"].unique())
    for method, rows in table.groupby("method", sort=False):
        color = SCALING_COLORS.get(method, "k")
        rand = rows[rows.kind == "random"].groupby("size")["hmean"].agg(["mean", "min", "max", "count"])
        if len(rand):
            ax.plot(rand.index, rand["mean"], marker="o", color=color,
                    label=f"{method}, random order (mean of {int(rand['count'].max())}, band: min-max)")
            ax.fill_between(rand.index, rand["min"], rand["max"], color=color, alpha=0.2, linewidth=0)
        active = rows[rows.kind == "active"].sort_values("size")
        if len(active) and method != "zero_shot":
            ax.plot(active["size"], active["hmean"], marker="D", linestyle="--", color=color,
                    label=f"{method}, active growth")
    if oracle is not None:
        ax.axhline(oracle, color=SCALING_COLORS["oracle"], linestyle=":", label="oracle (own adapter, not in library)")
    ax.set_ylabel("h-mean mIoU over targets")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    per_order = table.drop_duplicates(["order", "size"])
    for order, rows in per_order.groupby("order", sort=True):
        active = (rows.kind == "active").all()
        cov.plot(rows["size"], rows["coverage"], marker="D" if active else ".", linestyle="--" if active else "-",
                 color="k" if active else "tab:gray", alpha=1 if active else 0.6, label=order)
    cov.set_ylabel("targets' distance to nearest domain")
    cov.legend(fontsize=7)
    for a in (ax, cov):
        a.set_xscale("log", base=2)
        a.set_xticks(sizes, [str(s) for s in sizes])
        a.minorticks_off()
        a.set_xlabel("library size (domains)")
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig
