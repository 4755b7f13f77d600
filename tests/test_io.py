"""core/io.py: a folder replaced by `assets.commit` (or any atomic_folder) is never missing, whatever moment a
crash hits (a forked child SIGKILLed at each rename or removal in turn), with and without RENAME_EXCHANGE; a
new folder is placed only where nothing is; a file written through atomic_path is complete or absent."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal

import pytest

from semla_lab.core import io
from semla_lab.library import assets


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "which").write_text(text)
    (path / "more").write_text(text * 100)


def _commit_killed_at(call: int, staged, root, exchange: bool) -> None:
    """In a forked child: assets.commit(staged, root), SIGKILLed at the `call`-th rename or folder removal."""
    calls = []

    def dying(real):
        def wrapper(*args, **kwargs):
            calls.append(real)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapper

    os.rename, os.replace, shutil.rmtree = dying(os.rename), dying(os.replace), dying(shutil.rmtree)
    if not exchange:
        io._exchange = lambda a, b: False          # a kernel or file system without RENAME_EXCHANGE
    assets.commit(staged, root)
    os._exit(0)                                    # ran to the end: fewer than `call` steps


@pytest.mark.parametrize("exchange", [True, False])
def test_a_crash_at_any_step_of_a_folder_swap_leaves_the_old_or_the_new_folder(tmp_path, exchange):
    fork = multiprocessing.get_context("fork")
    missing_before_recovery = []
    for call in range(1, 10):
        root, staged = tmp_path / f"{call}" / "assets", tmp_path / f"{call}" / "staged"
        _folder(root / "library", "old")
        _folder(staged / "library", "new")
        child = fork.Process(target=_commit_killed_at, args=(call, staged, root, exchange))
        child.start()
        child.join()
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL
        if not (root / "library").exists():
            missing_before_recovery.append(call)
            io.recover_folder(root / "library")    # what the next swap_folder of that folder does first
        assert (root / "library" / "which").read_text() in ("old", "new"), (call, exchange)
        assert (root / "library" / "more").read_text() == (root / "library" / "which").read_text() * 100
    assert call > 2 and child.exitcode == 0, "the commit was never run to its end"
    assert (root / "library" / "which").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["library"], "nothing set aside is left behind"
    # with RENAME_EXCHANGE the folder is never missing, not even for an instant; without it, only between the
    # two renames (and recover_folder puts the old one back)
    assert len(missing_before_recovery) == (0 if exchange else 1), missing_before_recovery


def test_swap_folder_replaces_a_folder_and_a_file_by_os_replace(tmp_path):
    _folder(tmp_path / "new", "new")
    _folder(tmp_path / "dest", "old")
    io.atomic_replace(tmp_path / "new", tmp_path / "dest")
    assert (tmp_path / "dest" / "which").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    (tmp_path / "f.new").write_text("1")
    io.atomic_replace(tmp_path / "f.new", tmp_path / "dest" / "which")
    assert (tmp_path / "dest" / "which").read_text() == "1"


def test_atomic_folder_places_only_where_nothing_is_and_cleans_up_on_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with io.atomic_folder(tmp_path / "empty") as stage:
        (stage / "a").write_text("a")
    assert (tmp_path / "empty" / "a").read_text() == "a", "an empty folder counts as absent"
    with pytest.raises(FileExistsError), io.atomic_folder(tmp_path / "empty") as stage:
        (stage / "b").write_text("b")               # another process got there first
    with pytest.raises(RuntimeError), io.atomic_folder(tmp_path / "empty", replace=True) as stage:
        (stage / "c").write_text("c")
        raise RuntimeError("failed while filling it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and os.listdir(tmp_path / "empty") == ["a"]


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OSError), io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["w.safetensors"]
    with io.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == oct(0o666 & ~io._UMASK)
