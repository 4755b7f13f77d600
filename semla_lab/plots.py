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
        axes[r, 0].set_ylabel(split.spec.name, rotation=0, ha="right", va="center", fontsize=8)
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
