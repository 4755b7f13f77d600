"""The SemLA adapter library on disk: one peft LoRA adapter per training domain, indexed by that
domain's centroid (mean CLIP image embedding (D,) of its training images).

Layout of a library folder:
    index.json                        {"format", "version", "embedder", "base_model", "lora": {r, lora_alpha,
                                       target_modules, use_rslora, ... (LORA_FIELDS)}, "centroids_file",
                                       "domains": [{name, num_images, metadata, adapter: "adapters/<name>"},
                                       ...]}  (insertion order)
    centroids-<version>.safetensors   one (D,) float32 tensor per domain name
    adapters/<name>/                  the files of the adapter folder peft's save_pretrained wrote (ADAPTER_FILES)
    .lock                             writers hold fcntl.flock on it
    .claims/<name>                    a build training domain <name> holds fcntl.flock on it (AdapterLibrary.claim)
    profiles.json                     optional (notebook 10): {"format", "version", "file", "quantile",
                                       "domains": {name: {num_images, kinds, coverage: {kind: radius},
                                       vocabulary: bool}}}
    profiles-<version>.safetensors    "<name>/centroid", "<name>/vocabulary", "<name>/<kind>/<tensor>" of each
                                       profiled domain (profiles.py: k-means prototypes, GMMs, coverage radii,
                                       vocabulary embeddings)

Writers copy the adapter into place, then write a new centroids file, then the index, each by
rename, so a crash at any point leaves the previous library readable; leftovers are cleaned at the
next write. Readers take no lock: an index names its own centroids file, and the previous
version's file is kept, so a reader that opened an older index still finds its centroids.
Opening reads index.json and the centroids file only; adapter weights are read on demand, and only
from safetensors (pickle files such as adapter_model.bin are refused, never loaded).

Profiles live beside the index, not in it: libraries and code from before them ignore both profile files, so
an old library opens and retrieves as before, and a profiled library still opens with old code. A profile
records the centroid it was fitted with; one whose domain is gone, or was re-added with another centroid,
is stale and left out. Profiles are versioned like the centroids (file first, profiles.json last, the
previous version's file kept for readers).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..core.io import atomic_folder, atomic_write_bytes, atomic_write_json
from ..core.errors import SemlaError
from ..core.profiles import DomainProfile, parse_index

FORMAT = 1
INDEX = "index.json"
LOCK = ".lock"
CLAIMS = ".claims"
ADAPTERS = "adapters"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG, WEIGHTS, "README.md")         # what an adapter consists of: all that `add` copies
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
COUNT_KEYS = ("num_images", "num_samples", "count")   # optional image count in a loradb statistics file
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_CENTROIDS = re.compile(r"centroids-\d+\.safetensors")
PROFILES = "profiles.json"
PROFILES_FORMAT = 1
_PROFILES_FILE = re.compile(r"profiles-\d+\.safetensors")


class LibraryError(SemlaError, ValueError):
    """A library, adapter or centroid is missing or malformed; the message names the domain or file."""


@dataclass
class LibraryEntry:
    """One domain: its centroid (D,) float32, training image count (None = unknown), free metadata
    and the adapter folder (loadable with peft's PeftModel.from_pretrained)."""
    name: str
    centroid: torch.Tensor
    num_images: int | None
    metadata: dict = field(default_factory=dict)
    path: Path | None = None


def check_name(name: object) -> str:
    """A domain name usable as a folder name: letters, digits, '_', '-', '.', not starting with '.'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LibraryError(f"invalid domain name {name!r}: use 1-128 letters, digits, '_', '-' or '.', "
                           "not starting with '.'")
    return name


# peft LoraConfig fields beyond r, lora_alpha and target_modules that change what an adapter computes, with
# peft's defaults. The index records them all (a field missing from an older index is the default); every
# adapter must agree with the library on each. Fused inference (fusion.py) honours these:
LORA_HONOURED = {
    "use_rslora": False,           # scaling alpha / sqrt(r) instead of alpha / r
    "rank_pattern": {},            # per-module r (peft's get_pattern_key matching)
    "alpha_pattern": {},           # per-module alpha
    "exclude_modules": None,       # these three choose the targets; fused layers follow the weights
    "layers_to_transform": None,
    "layers_pattern": None,
}
# ... and refuses any other value of these (default, why not):
LORA_REFUSED = {
    "use_dora": (False, "DoRA rescales each weight column by its norm; a weighted sum of B A cannot express it"),
    "bias": ("none", "the adapter would carry its own base biases"),
    "lora_bias": (False, "lora_B would carry a bias"),
    "fan_in_fan_out": (False, "it describes transposed Conv1D weights; fused layers are nn.Linear"),
    "modules_to_save": (None, "the adapter would carry whole trained modules"),
    "layer_replication": (None, "the adapter would duplicate layers of the base model"),
}
LORA_FIELDS = ("r", "lora_alpha", "target_modules", *LORA_HONOURED, *LORA_REFUSED)
# adapter_config.json fields without effect at inference (bookkeeping, training, initialisation, or read only
# with a field that must stay unset). Any other field must be unset (None, False or empty): peft variants
# such as kasa_config, arrow_config or use_bdlora change the math.
LORA_INERT = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
              "inference_mode", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
              "lora_ga_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config"}
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")   # init_lora_weights that edit W itself


def _check_refused(lora: dict, where: str) -> None:
    for key, (default, why) in LORA_REFUSED.items():
        if (lora.get(key) or default) != default:     # [] or None: no modules_to_save
            raise LibraryError(f"{where} {key}={lora[key]!r}, which fused inference cannot honour: {why}")


def _check_lora(lora: object) -> dict:
    """Library LoRA settings -> all of LORA_FIELDS, missing ones filled with peft's defaults."""
    if not isinstance(lora, dict):
        raise LibraryError(f"lora settings must be a dict with r, lora_alpha, target_modules, got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_FIELDS))
    if unknown:
        raise LibraryError(f"unknown lora setting(s) {unknown}; known: {list(LORA_FIELDS)}")
    r, alpha, targets = lora.get("r"), lora.get("lora_alpha"), lora.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LibraryError(f"lora r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LibraryError(f"lora_alpha must be a number, got {alpha!r}")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise LibraryError(f"target_modules must be a regex string or a non-empty list of names, got {targets!r}")
    _check_refused(lora, "lora settings have")
    defaults = {**LORA_HONOURED, **{k: d for k, (d, _) in LORA_REFUSED.items()}}
    out = {"r": r, "lora_alpha": alpha, "target_modules": targets, **{k: lora.get(k) or d for k, d in defaults.items()}}
    if not isinstance(out["use_rslora"], bool):
        raise LibraryError(f"lora use_rslora must be true or false, got {out['use_rslora']!r}")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = out[key]
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and isinstance(v, kind)
                                                    and not isinstance(v, bool) and v > 0 for k, v in pattern.items()):
            raise LibraryError(f"lora {key} must map module name patterns to positive numbers, got {pattern!r}")
    return out


def module_lora(lora: dict, path: str) -> tuple[int, float]:
    """(r, alpha) of the target module at `path` (as in model.named_modules()), with rank_pattern and
    alpha_pattern resolved by peft's own matching."""
    from peft.utils.other import get_pattern_key
    ranks, alphas = lora.get("rank_pattern") or {}, lora.get("alpha_pattern") or {}
    return (ranks.get(get_pattern_key(ranks.keys(), path), lora["r"]),
            alphas.get(get_pattern_key(alphas.keys(), path), lora["lora_alpha"]))


def lora_scaling(lora: dict, path: str = "") -> float:
    """peft's scaling s of module `path`: alpha / r, or alpha / sqrt(r) with use_rslora."""
    r, alpha = module_lora(lora, path)
    return alpha / r ** 0.5 if lora.get("use_rslora") else alpha / r


def _same_targets(a: str | list, b: str | list) -> bool:
    """peft stores target_modules as a list in any order (compared as sets) or as one regex string."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return set(a) == set(b)
    return a == b


def _as_centroid(x: object, dim: int, where: str) -> torch.Tensor:
    """A (D,) tensor or array -> finite float32 (D,) copy."""
    try:
        t = torch.as_tensor(x).detach()
    except (TypeError, ValueError, RuntimeError) as e:
        raise LibraryError(f"{where}: centroid is not a tensor ({e})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise LibraryError(f"{where}: centroid must be real-valued, got dtype {t.dtype}")
    if tuple(t.shape) != (dim,):
        raise LibraryError(f"{where}: centroid has shape {tuple(t.shape)}, the library's embedder needs ({dim},)")
    t = t.to(torch.float32).clone()
    if not torch.isfinite(t).all():
        raise LibraryError(f"{where}: centroid contains NaN or inf")
    return t


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise LibraryError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LibraryError(f"cannot parse {what} {path}: {e}") from None
    if not isinstance(obj, dict):
        raise LibraryError(f"{what} {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """safetensors only: the format stores raw tensors, so a hostile file cannot run code."""
    if not path.is_file():
        raise LibraryError(f"{what} not found: {path}")
    try:
        return load_file(path)
    except Exception as e:   # safetensors raises its own SafetensorError for corrupt or truncated files
        raise LibraryError(f"cannot read {what} {path} (corrupt or truncated safetensors): {e}") from None


def read_adapter_config(adapter_dir: str | Path, where: str) -> dict:
    """adapter_config.json of a peft adapter folder, refusing folders that ship pickle weight files or whose
    adapter files are symbolic links (an adapter is read, and copied, only from its own files)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LibraryError(f"{where}: adapter folder not found: {adapter_dir}")
    links = [name for name in ADAPTER_FILES if (adapter_dir / name).is_symlink()]
    if links:
        raise LibraryError(f"{where}: {adapter_dir / links[0]} is a symbolic link; an adapter folder must hold "
                           "its files themselves")
    pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise LibraryError(f"{where}: adapter folder {adapter_dir} contains pickle file(s) {pickles}; only "
                           f"safetensors weights ({WEIGHTS}) are accepted (convert with peft "
                           "save_pretrained(..., safe_serialization=True))")
    return _read_json(adapter_dir / CONFIG, f"{where}: adapter config")


def check_adapter_config(cfg: dict, lora: dict, base_model: str | None, where: str) -> None:
    """Refuse an adapter config that disagrees with the library's LoRA settings (checked by _check_lora) on
    any field in LORA_FIELDS, sets another field that changes the math, or was trained on another base model."""
    if cfg.get("peft_type") != "LORA":
        raise LibraryError(f"{where}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    _check_refused(cfg, f"{where}: adapter has")
    for key in ("r", "lora_alpha", "target_modules", *LORA_HONOURED):
        value, default = cfg.get(key), LORA_HONOURED.get(key)
        same = _same_targets if key in ("target_modules", "exclude_modules") else (lambda a, b: a == b)
        if not same(value or default, lora[key] or default):    # missing, None, [] and {} are all "unset"
            raise LibraryError(f"{where}: adapter has {key}={value!r}, the library uses {lora[key]!r}")
    other = sorted(k for k, v in cfg.items() if v and k not in LORA_FIELDS and k not in LORA_INERT)
    if other:
        raise LibraryError(f"{where}: adapter sets {other[0]}={cfg[other[0]]!r}, which fused inference does not "
                           "support")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise LibraryError(f"{where}: adapter has init_lora_weights={init!r}, which rewrites the base weights; "
                           "save it with peft's path_initial_model_for_weight_conversion first")
    if base_model and cfg.get("base_model_name_or_path") != base_model:
        raise LibraryError(f"{where}: adapter was trained on base model {cfg.get('base_model_name_or_path')!r}, "
                           f"the library's base model is {base_model!r}")


def check_adapter(adapter_dir: str | Path, lora: dict, base_model: str | None, where: str) -> None:
    """Refuse an adapter folder whose config or weights do not match the library's LoRA settings."""
    adapter_dir = Path(adapter_dir)
    check_adapter_config(read_adapter_config(adapter_dir, where), lora, base_model, where)
    state = _load_safetensors(adapter_dir / WEIGHTS, f"{where}: adapter weights")
    for key, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LibraryError(f"{where}: adapter tensor {key} contains NaN or inf")
    a_mods = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    b_mods = {k.removesuffix(".lora_B.weight") for k in state if k.endswith(".lora_B.weight")}
    if not a_mods or a_mods != b_mods:
        raise LibraryError(f"{where}: {adapter_dir / WEIGHTS} must hold lora_A/lora_B weight pairs; unpaired: "
                           f"{sorted(a_mods ^ b_mods)[:5] or 'no pairs at all'}")
    for m in sorted(a_mods):
        a, b = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
        r = module_lora(lora, m.removeprefix("base_model.model."))[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LibraryError(f"{where}: adapter weights of {m} have shapes A {tuple(a.shape)}, "
                               f"B {tuple(b.shape)}; expected A (r, in) and B (out, r) with r={r}")


class AdapterLibrary:
    """A folder of LoRA adapters indexed by domain centroids. Opening is cheap (index + centroids);
    writers (add, remove) serialize on a file lock and re-read the index under it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LibraryError(f"library folder not found: {self.root}")
        self._load()

    @classmethod
    def open(cls, root: str | Path) -> AdapterLibrary:
        return cls(root)

    @classmethod
    def create(cls, root: str | Path, embedder: dict, base_model: str | None, lora: dict) -> AdapterLibrary:
        """A new empty library. `embedder` identifies the embedding model and holds its "dim";
        `lora` is {r, lora_alpha, target_modules} and optionally other LORA_FIELDS; an empty base_model
        disables that check."""
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise LibraryError(f"cannot create a library at {root}: it exists and is not an empty folder")
        dim = embedder.get("dim") if isinstance(embedder, dict) else None
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise LibraryError(f"embedder must be a dict with a positive integer 'dim', got {embedder!r}")
        if base_model is not None and not isinstance(base_model, str):
            raise LibraryError(f"base_model must be a string identity, got {base_model!r}")
        index = {"format": FORMAT, "version": 0, "embedder": dict(embedder), "base_model": base_model,
                 "lora": _check_lora(lora), "centroids_file": "centroids-0.safetensors", "domains": []}
        try:
            json.dumps(index)
        except (TypeError, ValueError) as e:
            raise LibraryError(f"embedder and lora settings must be JSON-serializable: {e}") from None
        (root / ADAPTERS).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / index["centroids_file"], save({}))
        atomic_write_json(root / INDEX, index)
        return cls(root)

    # ---- reading -------------------------------------------------------------------------------

    def _load(self, attempts: int = 5) -> None:
        """Read index.json and its centroids file. A writer may replace both between our two reads;
        then the index on disk has changed, and we read again."""
        for attempt in range(attempts):
            index = _read_json(self.root / INDEX, "library index")
            try:
                self._set_state(index, self._read_centroids(index))
                return
            except LibraryError:
                if attempt == attempts - 1 or _read_json(self.root / INDEX, "library index") == index:
                    raise

    def _read_centroids(self, index: dict) -> dict[str, torch.Tensor]:
        """Validate the index; -> {name: (D,) float32} from its centroids file."""
        where = f"library index {self.root / INDEX}"
        if index.get("format") != FORMAT:
            raise LibraryError(f"{where} has format {index.get('format')!r}; this code reads format {FORMAT}")
        version, domains = index.get("version"), index.get("domains")
        embedder = index.get("embedder")
        dim = embedder.get("dim") if isinstance(embedder, dict) else None
        if not isinstance(version, int) or not isinstance(domains, list) or not isinstance(dim, int):
            raise LibraryError(f"{where} lacks an integer 'version', a 'domains' list or an embedder 'dim'")
        if index.get("centroids_file") != f"centroids-{version}.safetensors":
            raise LibraryError(f"{where} names centroids file {index.get('centroids_file')!r}, expected "
                               f"'centroids-{version}.safetensors'")
        names = []
        for d in domains:
            name = check_name(d.get("name") if isinstance(d, dict) else None)
            if d.get("adapter") != f"{ADAPTERS}/{name}" or not isinstance(d.get("metadata", {}), dict):
                raise LibraryError(f"{where}: domain {name!r} must have adapter '{ADAPTERS}/{name}' and a "
                                   "metadata dict")
            if not (self.root / ADAPTERS / name).is_dir():
                raise LibraryError(f"{where} lists domain {name!r} but its adapter folder "
                                   f"{self.root / ADAPTERS / name} is missing")
            names.append(name)
        if len(set(names)) != len(names):
            raise LibraryError(f"{where} lists a domain name twice")
        path = self.root / index["centroids_file"]
        stored = _load_safetensors(path, "library centroids file")
        missing = [n for n in names if n not in stored]
        if missing:
            raise LibraryError(f"centroids file {path} lacks domain(s) {missing[:10]}")
        return {n: _as_centroid(stored[n], dim, f"domain {n!r} in {path}") for n in names}

    def _set_state(self, index: dict, centroids: dict[str, torch.Tensor]) -> None:
        self._lora = _check_lora(index.get("lora"))
        self._index = index
        self._domains = {d["name"]: d for d in index["domains"]}
        self._centroids = centroids
        self._profiles_cache = None

    def refresh(self) -> AdapterLibrary:
        """Re-read the index (a long-lived reader picks up other processes' writes)."""
        self._load()
        return self

    @property
    def version(self) -> int:
        return self._index["version"]

    @property
    def embedder(self) -> dict:
        return dict(self._index["embedder"])

    @property
    def dim(self) -> int:
        return self._index["embedder"]["dim"]

    @property
    def base_model(self) -> str | None:
        return self._index["base_model"]

    @property
    def lora_config(self) -> dict:
        """The LoRA settings every adapter in the library shares: {r, lora_alpha, target_modules} and the other
        LORA_FIELDS (peft's defaults where the index predates them)."""
        return json.loads(json.dumps(self._lora))

    def names(self) -> list[str]:
        """Domain names in insertion order (the row order of centroids())."""
        return list(self._domains)

    def __len__(self) -> int:
        return len(self._domains)

    def __contains__(self, name: object) -> bool:
        return name in self._domains

    def __repr__(self) -> str:
        return f"AdapterLibrary({str(self.root)!r}, version={self.version}, domains={len(self)})"

    def _entry(self, name: str) -> dict:
        if name not in self._domains:
            raise LibraryError(f"no domain {name!r} in library {self.root} ({len(self)} domains)")
        return self._domains[name]

    def get(self, name: str) -> LibraryEntry:
        d = self._entry(name)
        return LibraryEntry(name, self._centroids[name].clone(), d.get("num_images"),
                            json.loads(json.dumps(d.get("metadata", {}))), self.adapter_path(name))

    def centroids(self, names: list[str] | None = None) -> torch.Tensor:
        """(L, D) float32 centroids, rows in `names` order (default: all, insertion order)."""
        names = self.names() if names is None else list(names)
        for n in names:
            self._entry(n)
        if not names:
            return torch.empty(0, self.dim)
        return torch.stack([self._centroids[n] for n in names])

    def adapter_path(self, name: str) -> Path:
        """The adapter folder, for PeftModel.from_pretrained(model, path)."""
        return self.root / self._entry(name)["adapter"]

    def load_adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's LoRA tensors {key: tensor}, read from safetensors (never unpickled)."""
        path = self.adapter_path(name)
        if not path.is_dir():
            raise LibraryError(f"adapter folder of domain {name!r} is gone ({path}); it was removed by "
                               "another writer, call refresh()")
        where = f"domain {name!r}"
        check_adapter_config(read_adapter_config(path, where), self._lora, None, where)   # libraries written before
        return _load_safetensors(path / WEIGHTS, f"adapter weights of {where}")           # LORA_FIELDS may differ

    # ---- writing -------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive writer lock; the kernel releases it if the process dies. Re-reads the index."""
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._load()
            self._clean()
            yield
        finally:
            os.close(fd)

    @contextmanager
    def claim(self, name: str, wait: bool = True) -> Iterator[bool | None]:
        """Hold domain `name` while training it, so that builds of this library running at the same time train
        it once: an exclusive lock on .claims/<name>, which the kernel releases if this process dies. Yields
        True when the caller should train and add the domain, False when the library holds it already (decided
        under the writer lock once the claim is held), and, without `wait`, None when another process holds
        the claim."""
        path = self.root / CLAIMS / check_name(name)
        path.parent.mkdir(exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break                      # else its previous holder removed the file: lock the new one
            except BlockingIOError:
                os.close(fd)
                yield None
                return
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            with self._locked():
                free = name not in self
            yield free
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def _clean(self) -> None:
        """Under the lock: drop what crashed writers left (temp files and folders, adapter folders the
        index does not list) and centroid files older than the previous version."""
        for p in (self.root / ADAPTERS).iterdir():
            if p.name in self._domains:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        keep = {f"centroids-{self.version}.safetensors", f"centroids-{self.version - 1}.safetensors"}
        pv = self._profiles_version()
        keep |= {f"profiles-{pv}.safetensors", f"profiles-{pv - 1}.safetensors"}
        for p in self.root.iterdir():
            stale = (_CENTROIDS.fullmatch(p.name) or _PROFILES_FILE.fullmatch(p.name)) and p.name not in keep
            if stale or (p.name.startswith(".") and p.name.endswith(".tmp")):
                p.unlink()

    def _commit(self, domains: list[dict], centroids: dict[str, torch.Tensor]) -> None:
        """Under the lock: write centroids-<v+1>, then the index (last), then drop old centroid files."""
        version = self.version + 1
        index = {**self._index, "version": version, "centroids_file": f"centroids-{version}.safetensors",
                 "domains": domains}
        atomic_write_bytes(self.root / index["centroids_file"], save({n: centroids[n] for n in centroids}))
        atomic_write_json(self.root / INDEX, index)
        self._set_state(index, centroids)
        self._clean()

    # ---- profiles (profiles.py) ------------------------------------------------------------------

    def _profiles_meta(self) -> dict | None:
        """profiles.json, with its version checked (it names a file), or None for a library without profiles."""
        path = self.root / PROFILES
        if not path.is_file():
            return None
        meta = _read_json(path, "library profiles")
        version = meta.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise LibraryError(f"{path} has version {version!r}; it must be a non-negative integer")
        return meta

    def _profiles_version(self) -> int:
        meta = self._profiles_meta()
        return 0 if meta is None else meta.get("version", 0)

    def profiles(self) -> dict[str, DomainProfile]:
        """{name: DomainProfile} of the domains that have a current profile (insertion order); {} for a
        library without profiles. Stale profiles (domain gone, or re-added with another centroid) are left out."""
        path = self.root / PROFILES
        meta = self._profiles_meta()
        if meta is None:
            return {}
        if self._profiles_cache is not None and self._profiles_cache[0] == meta:
            return dict(self._profiles_cache[1])
        if meta.get("format") != PROFILES_FORMAT or meta.get("file") != f"profiles-{meta.get('version')}.safetensors" \
                or not isinstance(meta.get("domains"), dict):
            raise LibraryError(f"{path} is malformed: expected format {PROFILES_FORMAT}, a 'file' named "
                               "profiles-<version>.safetensors and a 'domains' dict")
        tensors = _load_safetensors(self.root / meta["file"], "library profiles file")
        out = {}
        for name in self.names():
            info = meta["domains"].get(name)
            if info is None or f"{name}/centroid" not in tensors:
                continue
            where = f"profile of domain {name!r} in {self.root / meta['file']}"
            centroid = _as_centroid(tensors[f"{name}/centroid"], self.dim, where)
            if not torch.equal(centroid, self._centroids[name]):
                continue                                                   # fitted for an earlier domain of that name
            try:
                models = {kind: {key.split("/")[-1]: t for key, t in tensors.items()
                                 if key.startswith(f"{name}/{kind}/")} for kind in info["kinds"] if kind != "centroid"}
                for kind, params in models.items():
                    parse_index(kind)
                    if params.get("means") is None or params["means"].shape[-1] != self.dim:
                        raise LibraryError(f"{where}: {kind} lacks (P, {self.dim}) means")
                coverage = {k: float(v) for k, v in info["coverage"].items()}
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise LibraryError(f"{where} is malformed: {e}") from None
            vocab = tensors.get(f"{name}/vocabulary")
            out[name] = DomainProfile(centroid, int(info.get("num_images", 0)), models, coverage,
                                      None if vocab is None else _as_centroid(vocab, self.dim, where))
        self._profiles_cache = (meta, out)
        return dict(out)

    def set_profiles(self, profiles: dict[str, DomainProfile]) -> None:
        """Store profiles of some of the library's domains, replacing theirs and keeping the others' (under the
        writer lock): profiles-<v+1>.safetensors first, then profiles.json."""
        for name, prof in profiles.items():
            self._entry(name)
            if not torch.equal(_as_centroid(prof.centroid, self.dim, f"profile of {name!r}"), self._centroids[name]):
                raise LibraryError(f"profile of domain {name!r} was fitted with another centroid than the library's")
        with self._locked():
            merged = {**self.profiles(), **profiles}
            merged = {n: merged[n] for n in self.names() if n in merged}
            version = self._profiles_version() + 1
            tensors, domains = {}, {}
            for name, prof in merged.items():
                tensors[f"{name}/centroid"] = prof.centroid.float().contiguous()
                if prof.vocabulary is not None:
                    tensors[f"{name}/vocabulary"] = prof.vocabulary.float().contiguous()
                for kind, params in prof.models.items():
                    tensors.update({f"{name}/{kind}/{key}": t.float().contiguous() for key, t in params.items()})
                domains[name] = {"num_images": prof.num_images, "kinds": prof.kinds,
                                 "coverage": {k: round(v, 6) for k, v in prof.coverage.items()},
                                 "vocabulary": prof.vocabulary is not None}
            meta = {"format": PROFILES_FORMAT, "version": version, "file": f"profiles-{version}.safetensors",
                    "domains": domains}
            atomic_write_bytes(self.root / meta["file"], save(tensors))
            atomic_write_json(self.root / PROFILES, meta)
            self._clean()

    def add(self, name: str, adapter_dir: str | Path, centroid: torch.Tensor, num_images: int | None,
            metadata: dict | None = None) -> LibraryEntry:
        """Validate, then copy the adapter's files (ADAPTER_FILES, nothing else) in as adapters/<name> and index
        it under its centroid (D,). Never touches other domains' files."""
        check_name(name)
        if name in self:
            raise LibraryError(f"domain {name!r} is already in library {self.root}; remove it first")
        where = f"domain {name!r}"
        centroid = _as_centroid(centroid, self.dim, where)
        if num_images is not None and (not isinstance(num_images, int) or isinstance(num_images, bool)
                                       or num_images < 1):
            raise LibraryError(f"{where}: num_images must be a positive integer or None, got {num_images!r}")
        metadata = {} if metadata is None else metadata
        try:
            metadata = json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as e:
            raise LibraryError(f"{where}: metadata must be JSON-serializable: {e}") from None
        if not isinstance(metadata, dict):
            raise LibraryError(f"{where}: metadata must be a dict, got {type(metadata).__name__}")
        check_adapter(adapter_dir, self._lora, self.base_model, where)
        with self._locked():
            if name in self:
                raise LibraryError(f"domain {name!r} is already in library {self.root}; remove it first")
            with atomic_folder(self.root / ADAPTERS / name) as folder:
                for file in ADAPTER_FILES:
                    if (Path(adapter_dir) / file).is_file():
                        shutil.copyfile(Path(adapter_dir) / file, folder / file)
            entry = {"name": name, "num_images": num_images, "metadata": metadata, "adapter": f"{ADAPTERS}/{name}"}
            self._commit(self._index["domains"] + [entry], {**self._centroids, name: centroid})
        return self.get(name)

    def remove(self, name: str) -> None:
        """Drop a domain: the index first (a new version), then its adapter folder (by _clean)."""
        with self._locked():
            self._entry(name)
            self._commit([d for d in self._index["domains"] if d["name"] != name],
                         {n: c for n, c in self._centroids.items() if n != name})


def _read_statistics(domain_dir: Path) -> tuple[np.ndarray, int | None]:
    """<domain>/<domain>_statistics.npz -> (train_average_embedding (D,), image count or None)."""
    path = domain_dir / f"{domain_dir.name}_statistics.npz"
    if not path.is_file():
        raise LibraryError(f"domain {domain_dir.name!r}: statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:   # zip, format or "object arrays cannot be loaded" errors
        raise LibraryError(f"domain {domain_dir.name!r}: cannot read statistics {path}: {e}") from None
    emb = arrays.get("train_average_embedding")
    if emb is None or emb.ndim not in (1, 2) or (emb.ndim == 2 and emb.shape[0] != 1):
        raise LibraryError(f"domain {domain_dir.name!r}: {path} needs 'train_average_embedding' of shape (D,) "
                           f"or (1, D), got {None if emb is None else emb.shape}")
    count = next((arrays[k] for k in COUNT_KEYS if k in arrays), None)
    if count is not None and (count.size != 1 or not np.issubdtype(count.dtype, np.integer)):
        raise LibraryError(f"domain {domain_dir.name!r}: image count in {path} must be one integer")
    return emb.reshape(-1), None if count is None else int(count.reshape(()))


def import_loradb(loradb_dir: str | Path, root: str | Path, embedder: dict,
                  base_model: str | None = None) -> AdapterLibrary:
    """A new library at `root` from the official SemLA layout <loradb_dir>/<domain>/{adapter_config.json,
    adapter_model.safetensors, <domain>_statistics.npz}. LoRA settings (and base_model, unless given)
    come from the first domain's config (sorted by name); any failure removes the half-built library."""
    src = Path(loradb_dir)
    if not src.is_dir():
        raise LibraryError(f"loradb folder not found: {src}")
    domains = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise LibraryError(f"loradb folder {src} holds no domain folders")
    first = read_adapter_config(domains[0], f"domain {domains[0].name!r}")
    lora = {k: first[k] for k in LORA_FIELDS if k in first}
    if base_model is None:
        base_model = first.get("base_model_name_or_path")
    library = AdapterLibrary.create(root, embedder, base_model, lora)
    try:
        for d in domains:
            centroid, count = _read_statistics(d)
            library.add(d.name, d, centroid, count, metadata={"source": "loradb"})
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return library
