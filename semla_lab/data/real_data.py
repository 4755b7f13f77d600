"""Real benchmark datasets, read in place from their official folder layouts.

Each dataset is declared by data_manifests/real/<name>.yaml (see data_manifests/README.md): where
to get it, the env var of its root folder, its class list, domains and splits, the glob that lists
its files, the regex that pairs each listed file with its partner (label or image), and how raw
label ids convert to class ids. RealDataset yields the shared item format of semla_lab.data.datasets.
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from .datasets import IGNORE_INDEX, DataError, read_image
from ..core.errors import UsageError
from ..core.manifests import manifests_dir

DATA_ROOT_ENV = "SEMLA_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"            # used, relative to the working folder, when SEMLA_DATA_ROOT is unset
TARGET_DATASETS = ("acdc", "muses", "cityscapes", "bdd100k", "idd", "mapillary", "ade20k",
                   "pascal_context", "nyu", "coconut")   # the 20-domain benchmark of the paper
CONVERSIONS = ("identity", "minus_one", "id_map")
LUT_SIZE = 1 << 16                    # raw ids of 8- and 16-bit label pngs
_FIELDS = ("name", "title", "homepage", "download", "root_env", "default_subdir", "class_list",
           "splits", "domains", "layout", "label", "notes")
_LAYOUTS = ({"image_glob", "label_path"}, {"label_glob", "image_path"})


class MissingDataError(DataError):
    """A real dataset is not on disk; the message says which folder was expected, which env var
    sets it and where to get the data."""


@dataclass(frozen=True)
class RealDatasetSpec:
    """One real dataset as its YAML declares it. `globs` (relative to the root, with `{split}` and
    domain placeholders) list the images, or the labels when `from_labels`; `match` (a full-match
    regex) and `replace` turn a listed path into its partner's path."""

    name: str
    title: str
    homepage: str
    download: str
    root_env: str
    default_subdir: str
    classes: tuple[str, ...]
    splits: dict[str, str]               # split -> value of {split}
    domains: dict[str, dict[str, str]]   # domain -> values of its other placeholders
    globs: tuple[str, ...]
    from_labels: bool
    match: str
    replace: str
    conversion: str
    id_map: dict[int, int]
    notes: str
    path: Path

    def patterns(self, split: str, domain: str) -> list[str]:
        """The globs of one split and domain, placeholders filled in."""
        return [g.format(split=self.splits[split], **self.domains[domain]) for g in self.globs]

    def partner(self, rel: str) -> str:
        """The label path of a listed image path (the image path of a label when `from_labels`)."""
        m = re.fullmatch(self.match, rel)
        if m is None:
            raise DataError(f"{self.path}: {rel!r} does not match the layout pattern {self.match!r}")
        return m.expand(self.replace)

    def lookup_table(self) -> np.ndarray:
        """Raw label id -> class id (IGNORE_INDEX for every id the conversion does not map)."""
        n = len(self.classes)
        table = {"identity": dict(zip(range(n), range(n))), "minus_one": dict(zip(range(1, n + 1), range(n))),
                 "id_map": self.id_map}[self.conversion]
        lut = np.full(LUT_SIZE, IGNORE_INDEX, dtype=np.int64)
        lut[list(table)] = list(table.values())
        return lut


def real_manifests_dir() -> Path:
    return manifests_dir() / "real"


def real_dataset_names() -> list[str]:
    return sorted(p.stem for p in real_manifests_dir().glob("*.yaml"))


def load_real_spec(name_or_path: str | Path) -> RealDatasetSpec:
    """A dataset name (data_manifests/real/<name>.yaml) or a YAML path -> its validated spec."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = real_manifests_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise DataError(f"unknown real dataset {str(name_or_path)!r}; "
                            f"known: {', '.join(real_dataset_names())}")
    if not path.is_file():
        raise DataError(f"real dataset spec not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path} is not valid YAML: {e}") from None
    return _parse(doc, path)


def _parse(doc, path: Path) -> RealDatasetSpec:
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping of fields")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise DataError(f"{path}: unknown field(s) {unknown}; allowed: {', '.join(_FIELDS)}")
    name = _field(doc, "name", path)
    if name != path.stem:
        raise DataError(f"{path}: field 'name' is {name!r} but the file is {path.name}")
    classes = _read_classes(path.parent / _field(doc, "class_list", path), path)
    domains = {}
    for dom, values in _field(doc, "domains", path, dict).items():
        if values is not None and not isinstance(values, dict):
            raise DataError(f"{path}: domain {dom!r} must map placeholder names to values")
        domains[str(dom)] = {str(k): str(v) for k, v in (values or {}).items()}
    conversion, id_map = _parse_label(_field(doc, "label", path, dict), len(classes), path)
    return RealDatasetSpec(
        name=name, title=_field(doc, "title", path), homepage=_field(doc, "homepage", path),
        download=_field(doc, "download", path), root_env=_field(doc, "root_env", path),
        default_subdir=_field(doc, "default_subdir", path), classes=classes,
        splits={str(k): str(v) for k, v in _field(doc, "splits", path, dict).items()}, domains=domains,
        **_parse_layout(_field(doc, "layout", path, dict), domains, path),
        conversion=conversion, id_map=id_map, notes=str(doc.get("notes") or "").strip(), path=path)


def _field(d: dict, key: str, path: Path, kind: type = str, where: str = ""):
    """d[key], which must be a non-empty string (stripped) or a non-empty mapping (kind=dict)."""
    if key not in d:
        raise DataError(f"{path}: missing field {where}{key!r}")
    value = d[key]
    if not isinstance(value, kind) or not (value.strip() if kind is str else value):
        what = "string" if kind is str else "mapping"
        raise DataError(f"{path}: field {where}{key!r} must be a non-empty {what}")
    return value.strip() if kind is str else value


def _parse_layout(layout: dict, domains: dict[str, dict[str, str]], path: Path) -> dict:
    if set(layout) not in _LAYOUTS:
        raise DataError(f"{path}: field 'layout' needs image_glob + label_path or label_glob + image_path, "
                        f"got {sorted(layout)}")
    from_labels = "label_glob" in layout
    globs = layout["label_glob" if from_labels else "image_glob"]
    globs = (globs,) if isinstance(globs, str) else tuple(globs or ())
    if not globs or not all(isinstance(g, str) and g.strip() for g in globs):
        raise DataError(f"{path}: the layout glob must be a non-empty string or list of strings")
    for g in globs:
        needed = {f for _, f, _, _ in string.Formatter().parse(g) if f} - {"split"}
        for dom, values in domains.items():
            if needed - set(values):
                raise DataError(f"{path}: glob {g!r} needs placeholders {sorted(needed - set(values))} "
                                f"that domain {dom!r} does not set")
    pair_key = "image_path" if from_labels else "label_path"
    pair = _field(layout, pair_key, path, dict, "layout.")
    match = _field(pair, "match", path, str, f"layout.{pair_key}.")
    replace = _field(pair, "replace", path, str, f"layout.{pair_key}.")
    try:
        re.compile(match)
    except re.error as e:
        raise DataError(f"{path}: layout pattern {match!r} is not a valid regex: {e}") from None
    return {"globs": globs, "from_labels": from_labels, "match": match, "replace": replace}


def _parse_label(label: dict, num_classes: int, path: Path) -> tuple[str, dict[int, int]]:
    unknown = sorted(set(label) - {"conversion", "id_map"})
    if unknown:
        raise DataError(f"{path}: unknown field(s) label.{unknown}")
    conversion = _field(label, "conversion", path, str, "label.")
    if conversion not in CONVERSIONS:
        raise DataError(f"{path}: label.conversion is {conversion!r}; expected one of {', '.join(CONVERSIONS)}")
    if ("id_map" in label) != (conversion == "id_map"):
        raise DataError(f"{path}: label.id_map is needed with, and only with, conversion id_map")
    if conversion != "id_map":
        return conversion, {}
    id_map = _field(label, "id_map", path, dict, "label.")
    bad = {k: v for k, v in id_map.items() if not (isinstance(k, int) and isinstance(v, int) and 0 <= k < LUT_SIZE
                                                   and (0 <= v < num_classes or v == IGNORE_INDEX))}
    if bad:
        raise DataError(f"{path}: label.id_map entries {bad} are not raw ids 0-{LUT_SIZE - 1} -> "
                        f"class ids 0-{num_classes - 1} or {IGNORE_INDEX}")
    return conversion, dict(id_map)


def _read_classes(path: Path, spec_path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise DataError(f"{spec_path}: class_list file not found: {path}")
    try:
        names = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"class list {path} is not valid JSON: {e}") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"class list {path} must be a non-empty JSON list of names")
    return tuple(n.strip() for n in names)


def _spec(name_or_spec: str | Path | RealDatasetSpec) -> RealDatasetSpec:
    return name_or_spec if isinstance(name_or_spec, RealDatasetSpec) else load_real_spec(name_or_spec)


def dataset_root(spec: str | RealDatasetSpec, root: str | Path | None = None) -> Path:
    """The dataset's root folder: `root` > $<spec.root_env> > $SEMLA_DATA_ROOT/<default_subdir>."""
    spec = _spec(spec)
    chosen = root or os.environ.get(spec.root_env)
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser() / spec.default_subdir


def real_domains() -> dict[str, tuple[str, str]]:
    """The 20 target domains of the benchmark: domain name -> (dataset name, domain)."""
    return {dom: (ds, dom) for ds in TARGET_DATASETS for dom in load_real_spec(ds).domains}


def _missing(spec: RealDatasetSpec, root: Path, problem: str, patterns: list[str]) -> MissingDataError:
    return MissingDataError(
        f"{spec.title}: {problem}. Expected the dataset folder at {root.absolute()} with files like "
        f"{', '.join(patterns)}; set {spec.root_env} to that folder (or {DATA_ROOT_ENV} to the folder "
        f"holding {spec.default_subdir}/). Get it from {spec.homepage}: {spec.download}")


def _read_ids(path: Path) -> np.ndarray:
    """A single-channel label png -> its raw ids (H, W) int64."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"label {path} has mode {im.mode}; expected a single-channel id map")
            return np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read label {path}: {e}") from None


class RealDataset(Dataset):
    """One split of a real dataset, all its domains or one (e.g. "acdc_fog"), in sorted order;
    `max_samples` keeps the first ones. Items: image (3,H,W) in [0,1], label (H,W) class ids with
    255 = ignore, id (image path relative to the root, no extension), domain. `.domain` is the chosen
    domain, the only one of a one-domain dataset, or None for several."""

    def __init__(self, name_or_spec: str | Path | RealDatasetSpec, split: str = "val",
                 domain: str | None = None, root: str | Path | None = None, max_samples: int | None = None):
        self.spec = spec = _spec(name_or_spec)
        if max_samples is not None and max_samples < 1:
            raise UsageError(f"max_samples must be at least 1, got {max_samples}")
        if split not in spec.splits:
            raise DataError(f"{spec.name} has no split {split!r}; splits: {', '.join(spec.splits)}")
        if domain is not None and domain not in spec.domains:
            raise DataError(f"{spec.name} has no domain {domain!r}; domains: {', '.join(spec.domains)}")
        self.split = split
        self.domain = domain if domain is not None or len(spec.domains) > 1 else next(iter(spec.domains))
        self.classes = list(spec.classes)
        self.root = dataset_root(spec, root)
        domains = [domain] if domain else list(spec.domains)
        example = spec.patterns(split, domains[0])
        if not self.root.is_dir():
            raise _missing(spec, self.root, "root folder not found", example)
        self.samples = [s for dom in domains for s in self._pairs(dom)]
        if not self.samples:
            raise _missing(spec, self.root, f"no {split} files found for {', '.join(domains)}", example)
        self.samples = self.samples[:max_samples]
        self._lut = spec.lookup_table()

    def _pairs(self, domain: str) -> list[tuple[Path, Path, str, str]]:
        listed = sorted({p.relative_to(self.root).as_posix()
                         for g in self.spec.patterns(self.split, domain) for p in self.root.glob(g)})
        out = []
        for rel in listed:
            other = self.spec.partner(rel)
            image, label = (other, rel) if self.spec.from_labels else (rel, other)
            if not (self.root / other).is_file():
                kind = "image" if self.spec.from_labels else "label"
                raise DataError(f"{self.root / rel} has no {kind}: expected {self.root / other}")
            out.append((self.root / image, self.root / label, str(PurePosixPath(image).with_suffix("")), domain))
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image_path, label_path, sample_id, domain = self.samples[i]
        image = read_image(image_path)
        raw = _read_ids(label_path)
        if raw.shape != tuple(image.shape[1:]):
            raise DataError(f"label {label_path} is {raw.shape[1]}x{raw.shape[0]} but its image "
                            f"{image_path} is {image.shape[2]}x{image.shape[1]}")
        inside = (raw >= 0) & (raw < LUT_SIZE)
        label = np.full(raw.shape, IGNORE_INDEX, dtype=np.int64)
        label[inside] = self._lut[raw[inside]]
        return {"image": image, "label": torch.from_numpy(label), "id": sample_id, "domain": domain}


def _display_path(path: Path) -> str:
    """A path relative to the working folder when it lies inside it (stable notebook output)."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def real_data_status(datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per real dataset (default: the 10 of the benchmark): its domains, the env var of its
    root, the folder looked in (relative to the working folder when inside it) and whether it exists."""
    rows = {}
    for name in datasets or TARGET_DATASETS:
        spec = load_real_spec(name)
        root = dataset_root(spec)
        rows[name] = {"domains": ", ".join(spec.domains), "classes": len(spec.classes), "env var": spec.root_env,
                      "looked in": _display_path(root), "present": root.is_dir()}
    return pd.DataFrame.from_dict(rows, orient="index")


def missing_data_message(dataset: str, domain: str | None = None, split: str = "val") -> str | None:
    """The MissingDataError message a user sees when `dataset` is absent (None when it loads), with the
    working folder shown as '.'."""
    try:
        RealDataset(dataset, split=split, domain=domain, max_samples=1)
    except MissingDataError as e:
        return str(e).replace(str(Path.cwd().absolute()), ".")
    return None
