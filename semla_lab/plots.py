"""Figures used by the CLI and the notebooks. Functions take data and return a matplotlib Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

PALETTE = (np.array(sns.color_palette("tab20", 20) + sns.color_palette("Set2", 8)) * 255).astype(np.uint8)


def colorize(label: torch.Tensor) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; 255 (ignore) is black."""
    lab = label.cpu().numpy().astype(np.int64)
    out = PALETTE[np.clip(lab, 0, len(PALETTE) - 1) % len(PALETTE)]
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
        ax.add_patch(plt.Rectangle((0, -i), 0.8, 0.8, color=PALETTE[i % len(PALETTE)] / 255))
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
