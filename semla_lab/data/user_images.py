"""A user's own image files: which files a list of paths, folders and globs names, which of them can be
read (the others set aside with the reason), and which label mask belongs to which image (same stem).

Folders are walked recursively in sorted order; hidden files and folders (names starting with ".") are
skipped. A folder's files are all tried, whatever their extension: a file that is not an image is listed
as skipped, never silently ignored. Images above `data.MAX_PIXELS` are skipped too (decompression bombs).
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .datasets import DataError, read_image
from ..core.errors import MissingFileError, UsageError

GLOB_CHARS = set("*?[")


@dataclass
class Skipped:
    """A file that was named or found but not analysed, and why."""
    file: str
    reason: str


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _walk(folder: Path, ignore: Path | None) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and _visible(p, folder)
            and not (ignore is not None and p.resolve().is_relative_to(ignore))]


def find_files(paths: Sequence[str | Path], ignore: str | Path | None = None) -> list[Path]:
    """Files named by `paths` (files, folders walked recursively, or glob patterns such as "shots/*.jpg"),
    in argument order, each folder or glob sorted, duplicates dropped. Anything under `ignore` (e.g. the
    output folder) is left out. A path that does not exist, or a selection with no file, is an error."""
    ignore = Path(ignore).resolve() if ignore is not None else None
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += _walk(path, ignore)
        elif path.is_file():
            found.append(path)
        elif GLOB_CHARS & set(str(raw)):
            matches = [Path(m) for m in sorted(glob.glob(str(raw), recursive=True))]
            found += [f for m in matches for f in (_walk(m, ignore) if m.is_dir() else [m])
                      if ignore is None or not f.resolve().is_relative_to(ignore)]
        else:
            raise MissingFileError(f"no such file or folder: {raw}")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UsageError(f"no files found in {', '.join(map(str, paths)) or 'an empty list of paths'}")
    return unique


def read_images(files: Iterable[Path]) -> Iterator[tuple[Path, torch.Tensor | None, Skipped | None]]:
    """For each file: (file, (3, H, W) float image, None), or (file, None, Skipped) when it cannot be read."""
    for file in files:
        try:
            yield file, read_image(file), None
        except DataError as e:
            yield file, None, Skipped(str(file), str(e))


def match_labels(label_dir: str | Path, images: Sequence[Path]) -> dict[Path, Path]:
    """image -> its label mask: the file in `label_dir` (not recursive) with the image's stem. A mask whose
    stem names no image, or a stem shared by two images, is an error naming the files."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise MissingFileError(f"label folder not found: {label_dir}")
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
    masks = [p for p in sorted(label_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
    orphans = [m.name for m in masks if m.stem not in by_stem]
    if orphans:
        raise UsageError(f"{len(orphans)} mask(s) in {label_dir} have no image with the same stem: "
                         f"{', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}")
    pairs = {}
    for mask in masks:
        owners = by_stem[mask.stem]
        if len(owners) > 1:
            raise UsageError(f"mask {mask} fits {len(owners)} images with stem {mask.stem!r}: "
                             f"{', '.join(map(str, owners[:3]))}; rename them")
        if owners[0] in pairs:
            raise UsageError(f"image {owners[0]} has two masks in {label_dir}: {pairs[owners[0]].name}, {mask.name}")
        pairs[owners[0]] = mask
    return pairs
