"""Data sources: the one name that says where a domain's labelled images come from, resolved to a Split.

  acdc_fog            a shipped mini-world domain (world/generate.py)
  path/to/spec.yaml   a mini-world domain spec file
  path/to/folder      a dataset folder with a manifest.json (data/datasets.py)
  real:acdc_fog       a domain of a real dataset declared in data_manifests/real/ (real_data.py), or
  real:coco_stuff     a whole one-domain real dataset (the usual base-training source)
Every step of the pipeline (base training, adapters, evaluation) takes these names, so the mini world
and the real benchmark share every step.
"""
from __future__ import annotations

from pathlib import Path

from ..core.errors import UnknownNameError, UsageError
from .split import Split, stack_items

REAL = "real:"
ROLES = ("train", "val", "test")   # what the images are for; real datasets serve val and test from "val"


def domain_name(source: str) -> str:
    """The library name of a source's domain (without loading it): 'real:acdc_fog' -> 'acdc_fog',
    a spec file or dataset folder -> its file or folder name, a shipped domain -> itself. An unknown
    real domain is an UnknownNameError here already."""
    if source.startswith(REAL):
        name = source.removeprefix(REAL)
        _real_dataset(name)
        return name
    path = Path(source)
    if path.is_dir():
        from .datasets import read_manifest
        return read_manifest(path).get("name", path.name)
    if path.suffix in (".yaml", ".yml"):
        from .world.generate import get_domain
        return get_domain(source).name
    return source


def _real_dataset(name: str) -> tuple[str, str | None]:
    """(dataset, domain) of a real domain name, or (dataset, None) for a one-domain dataset's name."""
    from .real_data import load_real_spec, real_dataset_names, real_domains
    domains = real_domains()
    if name in domains:
        return domains[name]
    if name in real_dataset_names() and len(load_real_spec(name).domains) == 1:
        return name, None
    raise UnknownNameError(f"unknown real domain {name!r}; known: {', '.join(domains)} (or a one-domain "
                           "dataset such as coco_stuff)")


def _real(source: str, role: str, max_images: int | None, image_size: int | None) -> Split:
    from .real_data import RealDataset
    name = source.removeprefix(REAL)
    dataset, domain = _real_dataset(name)
    ds = RealDataset(dataset, split="train" if role == "train" else "val", domain=domain, max_samples=max_images)
    return stack_items(name, (ds[i] for i in range(len(ds))), ds.classes, image_size,
                       {"dataset": dataset, **({"size": image_size} if image_size else {})})


def _folder(path: Path, role: str, max_images: int | None, image_size: int | None) -> Split:
    from .datasets import SegmentationDataset, read_manifest
    splits = {s.get("split") for s in read_manifest(path)["samples"]}
    wanted = role if role in splits else "test" if role == "val" and "test" in splits else None
    if wanted is None and role == "train" and len(splits) > 1:
        raise UsageError(f"dataset folder {path} has splits {sorted(map(str, splits))} but no 'train' split")
    ds = SegmentationDataset(path, split=wanted)
    items = [ds[i] for i in range(min(len(ds), max_images or len(ds)))]
    return stack_items(ds.name, items, ds.classes, image_size, {"dataset": ds.name})


def load_split(source: str, role: str = "test", max_images: int | None = None,
               image_size: int | None = None) -> Split:
    """The `role` images (train, val: for tuning, test: for reporting) of a source (see the module
    docstring): the first `max_images` (default: all). Dataset and real images are resized to
    `image_size` when given; a real dataset's "val" split serves both val and test."""
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}; expected one of {ROLES}")
    if source.startswith(REAL):
        return _real(source, role, max_images, image_size)
    path = Path(source)
    if path.is_dir():
        return _folder(path, role, max_images, image_size)
    from .world.generate import generate, get_domain
    spec = get_domain(source)
    count = max_images if max_images is not None else spec.splits.get(role, 0)
    data = generate(spec, role, count, image_size)
    if len(data) == 0:
        raise UsageError(f"domain {spec.name!r} has no {role} images (splits: {spec.splits})")
    return data


def load_target(source: str, max_images: int | None = None, image_size: int | None = None,
                split: str = "test") -> Split:
    """A benchmark target: `load_split` of its test images (`split="val"` for tuning)."""
    return load_split(source, split, max_images, image_size)


def class_name_choices(source: str, split: Split) -> list[list[str]]:
    """For each class, the names base training may call it by: a mini-world domain's own name plus its
    concept's synonyms (minus the held-out names kept for testing open-vocabulary transfer); for other
    sources, just the dataset's class name."""
    if source.startswith(REAL) or Path(source).is_dir():
        return [[c] for c in split.class_names]
    from .world.concepts import HELD_OUT_NAMES, SYNONYMS
    from .world.generate import get_domain
    return [[name] + [s for s in SYNONYMS[concept] if s != name and s not in HELD_OUT_NAMES]
            for concept, name in get_domain(source).vocabulary.items()]
