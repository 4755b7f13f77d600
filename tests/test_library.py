"""The adapter library on disk: round trips, refusals, lazy opening, crash safety, concurrent readers."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save, save_file
from torch import nn

import semla_lab.library.index as library
from semla_lab.library.index import AdapterLibrary, LibraryError, import_loradb

D = 16
BASE = "tiny-base"
LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"]}
DEFAULTS = {"use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,  # peft's
            "layers_to_transform": None, "layers_pattern": None, "use_dora": False, "bias": "none",
            "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "layer_replication": None}
EMBEDDER = {"model": "semla-tiny-clip", "pretrained": "random", "image_size": 64, "normalize": True, "dim": D}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)   # every Tiny() is the same base model
        self.lin0, self.lin1 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def make_adapter(path: Path, seed: int = 0, r: int = 2, targets=("lin0", "lin1"), base: str = BASE,
                 **lora) -> PeftModel:
    """A real peft LoRA adapter folder at `path` (`lora`: more LoraConfig fields); returns the adapted model."""
    model = Tiny()
    model.name_or_path = base   # peft records it as base_model_name_or_path
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=4, target_modules=list(targets),
                                                  init_lora_weights=False, **lora))
    peft_model.save_pretrained(path, save_embedding_layers=False)   # no hub look-up of `base`
    return peft_model


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {"a": {}, "b": {"seed": 1}, "c": {"seed": 2}, "rank4": {"r": 4}, "lin0only": {"targets": ["lin0"]},
             "otherbase": {"base": "other-base"}, "rslora": {"use_rslora": True},
             "alpha_lin1": {"alpha_pattern": {"lin1": 16}}, "rank_lin1": {"rank_pattern": {"lin1": 3}},
             "dora": {"use_dora": True}, "exclude_lin1": {"exclude_modules": ["lin1"]}}
    for name, kw in specs.items():
        make_adapter(root / name, **kw)
    return {name: root / name for name in specs}


@pytest.fixture
def lib(tmp_path) -> AdapterLibrary:
    return AdapterLibrary.create(tmp_path / "lib", EMBEDDER, BASE, LORA)


def centroid(i: float) -> torch.Tensor:
    return torch.full((D,), float(i))


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- round trips ---------------------------------------------------------------------------------

def test_create_add_get_remove_round_trip(lib, adapters):
    assert len(lib) == 0 and lib.names() == [] and lib.centroids().shape == (0, D)
    lib.add("b", adapters["b"], centroid(2), 20, {"dataset": "world", "conditions": ["fog"]})
    lib.add("a", adapters["a"], centroid(1).numpy(), None)
    entry = lib.get("b")
    assert (entry.name, entry.num_images, entry.metadata) == ("b", 20, {"dataset": "world", "conditions": ["fog"]})
    assert torch.equal(entry.centroid, centroid(2)) and entry.path == lib.root / "adapters" / "b"
    assert lib.names() == ["b", "a"] and "a" in lib and "zz" not in lib and len(lib) == 2
    assert torch.equal(lib.centroids(), torch.stack([centroid(2), centroid(1)]))
    assert torch.equal(lib.centroids(["a", "b"]), torch.stack([centroid(1), centroid(2)]))
    assert lib.lora_config == {**LORA, **DEFAULTS} and lib.embedder == EMBEDDER and lib.base_model == BASE

    reopened = AdapterLibrary.open(lib.root)
    assert reopened.names() == ["b", "a"] and torch.equal(reopened.centroids(), lib.centroids())
    assert reopened.get("b").metadata["conditions"] == ["fog"]
    index = json.loads((lib.root / "index.json").read_text())
    assert index["version"] == 2 and index["centroids_file"] == "centroids-2.safetensors"
    assert [d["adapter"] for d in index["domains"]] == ["adapters/b", "adapters/a"]

    lib.remove("b")
    assert lib.names() == ["a"] and not (lib.root / "adapters" / "b").exists()
    assert AdapterLibrary(lib.root).names() == ["a"]
    with pytest.raises(LibraryError, match="no domain 'b'"):
        lib.get("b")
    with pytest.raises(LibraryError, match="no domain 'b'"):
        lib.remove("b")


def test_stored_adapter_loads_with_peft_and_reproduces_output(lib, adapters, tmp_path):
    original = make_adapter(tmp_path / "src", seed=7)
    lib.add("d7", tmp_path / "src", centroid(0), 3)
    x = torch.randn(5, 8)
    loaded = PeftModel.from_pretrained(Tiny(), lib.adapter_path("d7"))
    with torch.no_grad():
        assert torch.allclose(loaded(x), original(x))
        assert not torch.allclose(loaded(x), Tiny()(x))   # the adapter does change the output
    state = lib.load_adapter_state("d7")
    assert sorted(state) == sorted(library.load_file(tmp_path / "src" / "adapter_model.safetensors"))


def test_add_and_remove_leave_other_adapters_untouched(lib, adapters):
    lib.add("a", adapters["a"], centroid(1), 1)
    lib.add("b", adapters["b"], centroid(2), 1)
    before = {n: tree_state(lib.adapter_path(n)) for n in ("a", "b")}
    time.sleep(0.01)
    lib.add("c", adapters["c"], centroid(3), 1)
    lib.remove("b")
    assert tree_state(lib.adapter_path("a")) == before["a"]
    hashes = lambda folder: {k: digest for k, (digest, _) in tree_state(folder).items()}
    assert hashes(lib.adapter_path("c")) == hashes(adapters["c"])   # copied as is


def test_open_reads_only_index_and_centroids(lib, adapters, monkeypatch):
    for i, n in enumerate("abc"):
        lib.add(n, adapters[n], centroid(i), 1)
    calls = []
    real = library.load_file
    monkeypatch.setattr(library, "load_file", lambda p, *a, **k: calls.append(Path(p).name) or real(p, *a, **k))
    reopened = AdapterLibrary(lib.root)
    assert calls == ["centroids-3.safetensors"]
    (lib.adapter_path("b") / "adapter_model.safetensors").unlink()
    reopened = AdapterLibrary(lib.root)   # still opens: weights are read on demand
    assert reopened.names() == ["a", "b", "c"] and reopened.load_adapter_state("a")
    with pytest.raises(LibraryError, match="adapter weights of domain 'b' not found"):
        reopened.load_adapter_state("b")


# ---- refusals when adding --------------------------------------------------------------------------

@pytest.mark.parametrize("kind, pattern", [
    ("rank4", "domain 'x': adapter has r=4, the library uses 2"),
    ("lin0only", r"domain 'x': adapter has target_modules=\['lin0'\], the library uses \['lin0', 'lin1'\]"),
    ("rslora", "domain 'x': adapter has use_rslora=True, the library uses False"),
    ("alpha_lin1", r"domain 'x': adapter has alpha_pattern=\{'lin1': 16\}, the library uses \{\}"),
    ("rank_lin1", r"domain 'x': adapter has rank_pattern=\{'lin1': 3\}, the library uses \{\}"),
    ("exclude_lin1", r"domain 'x': adapter has exclude_modules=\['lin1'\], the library uses None"),
    ("otherbase", "domain 'x': adapter was trained on base model 'other-base'"),
])
def test_add_refuses_mismatched_adapter(lib, adapters, kind, pattern):
    with pytest.raises(LibraryError, match=pattern):
        lib.add("x", adapters[kind], centroid(0), 1)
    assert len(lib) == 0 and not any((lib.root / "adapters").iterdir())


def test_add_refuses_bad_centroid_count_metadata_and_duplicates(lib, adapters):
    with pytest.raises(LibraryError, match=r"domain 'x': centroid has shape \(8,\), .* needs \(16,\)"):
        lib.add("x", adapters["a"], torch.zeros(8), 1)
    with pytest.raises(LibraryError, match="domain 'x': centroid contains NaN or inf"):
        lib.add("x", adapters["a"], torch.full((D,), float("nan")), 1)
    with pytest.raises(LibraryError, match="domain 'x': num_images must be a positive integer"):
        lib.add("x", adapters["a"], centroid(0), 0)
    with pytest.raises(LibraryError, match="domain 'x': metadata must be JSON-serializable"):
        lib.add("x", adapters["a"], centroid(0), 1, {"bad": object()})
    lib.add("x", adapters["a"], centroid(0), 1)
    with pytest.raises(LibraryError, match="domain 'x' is already in library"):
        lib.add("x", adapters["b"], centroid(1), 1)
    assert lib.names() == ["x"]


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "..", "a\\b", "x" * 129, None])
def test_add_refuses_unsafe_names(lib, adapters, name):
    with pytest.raises(LibraryError, match="invalid domain name"):
        lib.add(name, adapters["a"], centroid(0), 1)
    assert sorted(p.name for p in lib.root.parent.iterdir()) == ["lib"]
    assert not any((lib.root / "adapters").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_add_refuses_unreadable_safetensors(lib, adapters, tmp_path, damage):
    src = tmp_path / "bad"
    shutil.copytree(adapters["a"], src)
    weights = src / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 7)
    else:
        weights.unlink()
    with pytest.raises(LibraryError, match="domain 'x': adapter weights .*adapter_model.safetensors"):
        lib.add("x", src, centroid(0), 1)
    assert len(lib) == 0


def test_add_refuses_pickle_weights_without_unpickling(lib, adapters, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return open, (str(marker), "w")

    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(adapters["a"] / "adapter_config.json", src)
    (src / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(LibraryError, match=r"domain 'x': .*adapter_model\.bin.*only safetensors"):
        lib.add("x", src, centroid(0), 1)
    assert not marker.exists() and len(lib) == 0


def test_add_copies_only_the_adapter_files_and_never_through_a_link(lib, adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(adapters["a"], src)
    (src / "notes.txt").write_text("not part of an adapter")
    (src / "checkpoints").mkdir()
    (src / "checkpoints" / "big.safetensors").write_bytes(b"0" * 1000)
    (src / "elsewhere").symlink_to(tmp_path)           # copytree would have copied the whole tmp_path
    lib.add("a", src, centroid(1), 1)
    assert sorted(p.name for p in lib.adapter_path("a").iterdir()) == ["README.md", "adapter_config.json",
                                                                        "adapter_model.safetensors"]
    secret = tmp_path / "secret.safetensors"
    shutil.move(src / "adapter_model.safetensors", secret)
    (src / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(LibraryError, match="domain 'b': .*adapter_model.safetensors is a symbolic link"):
        lib.add("b", src, centroid(2), 1)
    assert lib.names() == ["a"]


@pytest.mark.parametrize("version", ["1/../../outside", "2", 1.5, True, -1])
def test_a_profiles_version_that_is_not_an_integer_is_refused(lib, adapters, version):
    lib.add("a", adapters["a"], centroid(1), 1)
    (lib.root / "profiles.json").write_text(json.dumps({"format": 1, "version": version,
                                                        "file": f"profiles-{version}.safetensors", "domains": {}}))
    for action in (lib.profiles, lambda: lib.remove("a")):
        with pytest.raises(LibraryError, match=r"profiles.json has version .*; it must be a non-negative integer"):
            action()
    assert AdapterLibrary(lib.root).names() == ["a"]


def test_add_refuses_wrong_peft_type_and_unpaired_weights(lib, adapters, tmp_path):
    src = tmp_path / "ia3"
    shutil.copytree(adapters["a"], src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(LibraryError, match="domain 'x': peft_type is 'IA3'"):
        lib.add("x", src, centroid(0), 1)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    state = library.load_file(src / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "lin1.lora_B" not in k}, src / "adapter_model.safetensors")
    with pytest.raises(LibraryError, match=r"domain 'x': .* must hold lora_A/lora_B weight pairs; "
                                           r"unpaired: \['base_model.model.lin1'\]"):
        lib.add("x", src, centroid(0), 1)


# ---- LoRA config fields that change the math -------------------------------------------------------

@pytest.mark.parametrize("kind, lora", [("rslora", {"use_rslora": True}),
                                        ("alpha_lin1", {"alpha_pattern": {"lin1": 16}}),
                                        ("rank_lin1", {"rank_pattern": {"lin1": 3}})])
def test_honoured_lora_fields_are_recorded_and_must_agree(tmp_path, adapters, kind, lora):
    lib = AdapterLibrary.create(tmp_path / "lib", EMBEDDER, BASE, {**LORA, **lora})
    lib.add("x", adapters[kind], centroid(0), 1)
    assert AdapterLibrary(lib.root).lora_config == {**LORA, **DEFAULTS, **lora}
    assert json.loads((lib.root / "index.json").read_text())["lora"] == {**LORA, **DEFAULTS, **lora}
    key, value = next(iter(lora.items()))
    with pytest.raises(LibraryError, match=re.escape(f"domain 'y': adapter has {key}={DEFAULTS[key]!r}, "
                                                     f"the library uses {value!r}")):
        lib.add("y", adapters["a"], centroid(1), 1)


def test_lora_scaling_per_module_follows_peft(adapters):
    from semla_lab.library.index import lora_scaling
    for kind, lora in [("a", LORA), ("rslora", {**LORA, "use_rslora": True}),
                       ("alpha_lin1", {**LORA, "alpha_pattern": {"lin1": 16}}),
                       ("rank_lin1", {**LORA, "rank_pattern": {"lin1": 3}})]:
        peft_model = PeftModel.from_pretrained(Tiny(), adapters[kind])
        for path in ("lin0", "lin1"):
            assert lora_scaling(lora, path) == peft_model.base_model.model.get_submodule(path).scaling["default"]
    assert [lora_scaling({**LORA, "use_rslora": True}, p) for p in ("lin0", "lin1")] == [4 / 2 ** 0.5] * 2
    assert [lora_scaling({**LORA, "alpha_pattern": {"lin1": 16}}, p) for p in ("lin0", "lin1")] == [2.0, 8.0]


REFUSED = [("use_dora", True, "DoRA rescales each weight column by its norm; a weighted sum of B A cannot express it"),
           ("bias", "all", "the adapter would carry its own base biases"),
           ("lora_bias", True, "lora_B would carry a bias"),
           ("fan_in_fan_out", True, "it describes transposed Conv1D weights; fused layers are nn.Linear"),
           ("modules_to_save", ["head"], "the adapter would carry whole trained modules"),
           ("layer_replication", [[0, 1]], "the adapter would duplicate layers of the base model")]


@pytest.mark.parametrize("key, value, why", REFUSED)
def test_lora_fields_fused_inference_cannot_honour_are_refused(lib, adapters, tmp_path, key, value, why):
    src = tmp_path / key
    if key == "use_dora":
        src = adapters["dora"]     # a real DoRA adapter from peft
    else:
        shutil.copytree(adapters["a"], src)
        cfg = json.loads((src / "adapter_config.json").read_text())
        (src / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(LibraryError) as e:
        lib.add("x", src, centroid(0), 1)
    assert str(e.value) == f"domain 'x': adapter has {key}={value!r}, which fused inference cannot honour: {why}"
    with pytest.raises(LibraryError) as e:
        AdapterLibrary.create(tmp_path / "lib2", EMBEDDER, BASE, {**LORA, key: value})
    assert str(e.value) == f"lora settings have {key}={value!r}, which fused inference cannot honour: {why}"
    assert len(lib) == 0


@pytest.mark.parametrize("key, value, message", [
    ("kasa_config", {"r": 2}, "adapter sets kasa_config={'r': 2}, which fused inference does not support"),
    ("use_bdlora", {"nblocks": 2}, "adapter sets use_bdlora={'nblocks': 2}, which fused inference does not support"),
    ("init_lora_weights", "pissa", "adapter has init_lora_weights='pissa', which rewrites the base weights"),
])
def test_other_math_changing_adapter_fields_are_refused(lib, adapters, tmp_path, key, value, message):
    src = tmp_path / key
    shutil.copytree(adapters["a"], src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(LibraryError, match=re.escape(f"domain 'x': {message}")):
        lib.add("x", src, centroid(0), 1)


def test_library_written_before_lora_fields_opens_with_peft_defaults(lib, adapters):
    """An index that records only r, lora_alpha, target_modules (as written before) reads as peft's defaults;
    an rsLoRA adapter such a library took in then is refused when loaded, not fused at the wrong scale."""
    from semla_lab.library.index import lora_scaling
    lib.add("a", adapters["a"], centroid(1), 1)
    shutil.copytree(adapters["rslora"], lib.root / "adapters" / "rs")
    index = json.loads((lib.root / "index.json").read_text())
    index["lora"] = LORA
    index["domains"].append({"name": "rs", "num_images": 1, "metadata": {}, "adapter": "adapters/rs"})
    (lib.root / "index.json").write_text(json.dumps(index))
    _damage_centroids(lib.root, data=save({"a": centroid(1), "rs": centroid(2)}))
    old = AdapterLibrary(lib.root)
    assert old.lora_config == {**LORA, **DEFAULTS} and lora_scaling(old.lora_config, "lin1") == 2.0
    key = "base_model.model.lin0.lora_A.weight"
    assert torch.equal(old.load_adapter_state("a")[key], library.load_file(adapters["a"] / library.WEIGHTS)[key])
    with pytest.raises(LibraryError, match="^domain 'rs': adapter has use_rslora=True, the library uses False$"):
        old.load_adapter_state("rs")
    old.add("b", adapters["b"], centroid(3), 1)
    assert json.loads((lib.root / "index.json").read_text())["lora"] == LORA   # not rewritten


# ---- opening damaged libraries ---------------------------------------------------------------------

def _damage_centroids(root: Path, tensor: torch.Tensor | None = None, data: bytes | None = None) -> None:
    path = root / json.loads((root / "index.json").read_text())["centroids_file"]
    path.write_bytes(save({"a": tensor}) if data is None else data)


@pytest.mark.parametrize("damage, pattern", [
    (lambda r: shutil.rmtree(r), "library folder not found"),
    (lambda r: (r / "index.json").unlink(), "library index not found"),
    (lambda r: (r / "index.json").write_text('{"version": '), "cannot parse library index"),
    (lambda r: shutil.rmtree(r / "adapters" / "a"), "lists domain 'a' but its adapter folder .* is missing"),
    (lambda r: _damage_centroids(r, data=(r / "centroids-1.safetensors").read_bytes()[:-8]),
     "cannot read library centroids file .*centroids-1.safetensors"),
    (lambda r: _damage_centroids(r, data=b"not a safetensors file"), "corrupt or truncated"),
    (lambda r: _damage_centroids(r, torch.full((D,), float("inf"))), "domain 'a' in .*NaN or inf"),
    (lambda r: _damage_centroids(r, torch.zeros(D + 1)), r"domain 'a' in .*shape \(17,\)"),
    (lambda r: _damage_centroids(r, data=save({"b": torch.zeros(D)})),
     r"lacks domain\(s\) \['a'\]"),
])
def test_open_reports_damage_clearly(lib, adapters, damage, pattern):
    lib.add("a", adapters["a"], centroid(1), 1)
    damage(lib.root)
    with pytest.raises(LibraryError, match=pattern):
        AdapterLibrary(lib.root)


def test_create_refuses_non_empty_folder_and_bad_settings(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(LibraryError, match="exists and is not an empty folder"):
        AdapterLibrary.create(tmp_path / "full", EMBEDDER, BASE, LORA)
    with pytest.raises(LibraryError, match="positive integer 'dim'"):
        AdapterLibrary.create(tmp_path / "new", {"model": "m"}, BASE, LORA)
    with pytest.raises(LibraryError, match="lora r must be a positive integer"):
        AdapterLibrary.create(tmp_path / "new", EMBEDDER, BASE, {**LORA, "r": 0})
    with pytest.raises(LibraryError, match=r"unknown lora setting\(s\) \['use_rslora_'\]"):
        AdapterLibrary.create(tmp_path / "new", EMBEDDER, BASE, {**LORA, "use_rslora_": True})
    with pytest.raises(LibraryError, match="lora rank_pattern must map module name patterns to positive numbers"):
        AdapterLibrary.create(tmp_path / "new", EMBEDDER, BASE, {**LORA, "rank_pattern": {"lin1": 0}})


# ---- crash safety and concurrent readers -----------------------------------------------------------

def _add_until_stopped(root: Path, adapter: Path, stage: str, ready: Path) -> None:
    """In a forked child: start add("new") and block at `stage` until the parent SIGKILLs us."""
    def stop(*args, **kwargs):
        ready.touch()
        time.sleep(60)

    if stage == "copy":        # adapter half copied into adapters/.new.new-*
        real = shutil.copyfile
        shutil.copyfile = lambda src, dst: (real(src, dst), stop())
    elif stage == "centroids":  # adapters/new in place, new centroids file not yet written
        library.atomic_write_bytes = stop
    else:                        # adapter and centroids-<v+1> written, index.json not yet
        library.atomic_write_json = stop
    AdapterLibrary(root).add("new", adapter, centroid(2), 5)


def test_killed_add_leaves_previous_library(tmp_path, adapters):
    fork = multiprocessing.get_context("fork")   # cheap: the child shares the imported torch
    children = {}
    for stage in ("copy", "centroids", "index"):
        AdapterLibrary.create(tmp_path / stage, EMBEDDER, BASE, LORA).add("a", adapters["a"], centroid(1), 1)
        children[stage] = fork.Process(target=_add_until_stopped,
                                       args=(tmp_path / stage, adapters["b"], stage, tmp_path / f"{stage}.ready"),
                                       daemon=True)
        children[stage].start()
    for stage, child in children.items():
        deadline = time.monotonic() + 30
        while not (tmp_path / f"{stage}.ready").exists():
            assert child.is_alive() and time.monotonic() < deadline, f"child for {stage} never got ready"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        root = tmp_path / stage
        left = sorted(p.name for p in (root / "adapters").iterdir())
        assert left[0].startswith(".new.new-") if stage == "copy" else left == ["a", "new"], (stage, left)
        assert (root / "centroids-2.safetensors").exists() == (stage == "index"), stage
        reopened = AdapterLibrary(root)
        assert reopened.names() == ["a"] and reopened.version == 1, stage
        reopened.add("new", adapters["b"], centroid(2), 5)   # the writer lock died with the child
        assert sorted(p.name for p in (root / "adapters").iterdir()) == ["a", "new"], stage
        assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
        assert AdapterLibrary(root).names() == ["a", "new"]


def test_reader_keeps_consistent_snapshot_until_refresh(lib, adapters):
    lib.add("a", adapters["a"], centroid(1), 1)
    reader = AdapterLibrary(lib.root)
    stale_writer = AdapterLibrary(lib.root)
    lib.add("b", adapters["b"], centroid(2), 1)
    assert reader.names() == ["a"] and reader.centroids().shape == (1, D)
    assert (lib.root / f"centroids-{reader.version}.safetensors").exists()   # its centroids are still there
    assert AdapterLibrary(lib.root).names() == ["a", "b"]
    stale_writer.add("c", adapters["c"], centroid(3), 1)   # re-reads the index under the lock
    assert stale_writer.names() == ["a", "b", "c"]
    assert reader.refresh().names() == ["a", "b", "c"]
    assert torch.equal(reader.centroids(), torch.stack([centroid(1), centroid(2), centroid(3)]))
    assert sorted(p.name for p in lib.root.glob("centroids-*")) == ["centroids-2.safetensors",
                                                                    "centroids-3.safetensors"]


def test_open_retries_when_a_writer_replaces_the_index_meanwhile(lib, adapters, monkeypatch):
    lib.add("a", adapters["a"], centroid(1), 1)
    real = library._load_safetensors

    def writer_strikes_first(path, what):
        monkeypatch.setattr(library, "_load_safetensors", real)
        lib.add("b", adapters["b"], centroid(2), 1)
        lib.add("c", adapters["c"], centroid(3), 1)   # the index we read named centroids-1: now deleted
        return real(path, what)

    monkeypatch.setattr(library, "_load_safetensors", writer_strikes_first)
    assert AdapterLibrary(lib.root).names() == ["a", "b", "c"]


# ---- the official SemLA layout ---------------------------------------------------------------------

def _loradb(folder: Path, adapters: dict[str, Path]) -> Path:
    for i, (name, emb, extra) in enumerate([("cityscapes", np.full((1, D), 1.0, np.float32), {}),
                                            ("acdc_fog", np.full(D, 2.0, np.float64), {"num_images": 42})]):
        shutil.copytree(adapters["abc"[i]], folder / name)
        np.savez(folder / name / f"{name}_statistics.npz", train_average_embedding=emb, **extra)
    return folder


def test_import_loradb(tmp_path, adapters):
    lib = import_loradb(_loradb(tmp_path / "loradb", adapters), tmp_path / "lib", EMBEDDER)
    assert lib.names() == ["acdc_fog", "cityscapes"]
    assert lib.get("acdc_fog").num_images == 42 and lib.get("cityscapes").num_images is None
    assert torch.equal(lib.centroids(), torch.stack([centroid(2), centroid(1)]))
    assert lib.lora_config["r"] == 2 and set(lib.lora_config["target_modules"]) == {"lin0", "lin1"}
    assert lib.base_model == BASE
    assert PeftModel.from_pretrained(Tiny(), lib.adapter_path("cityscapes")) is not None


def test_import_loradb_refuses_pickled_statistics_and_cleans_up(tmp_path, adapters):
    src = _loradb(tmp_path / "loradb", adapters)
    np.savez(src / "cityscapes" / "cityscapes_statistics.npz",
             train_average_embedding=np.array([{"x": 1}], dtype=object))
    with pytest.raises(LibraryError, match="domain 'cityscapes': cannot read statistics"):
        import_loradb(src, tmp_path / "lib", EMBEDDER)
    assert not (tmp_path / "lib").exists()
