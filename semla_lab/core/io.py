"""Atomic writes: a reader, or a crash, never sees half a file or half a folder, nor none at all.

Every file and folder the package stores goes through here. A file is written under a temporary name in
the same folder, fsynced, renamed over the target, then the folder is fsynced so the rename itself survives
a power cut (`atomic_path`, `atomic_write_bytes/_text/_json`). A folder is filled under a hidden name beside
its target and then renamed in (`atomic_folder`); one that replaces an existing folder is swapped with it
in one system call where the kernel can (Linux renameat2 RENAME_EXCHANGE), so a crash leaves either the old
folder or the new one at the target, never nothing (`swap_folder`).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2        # <fcntl.h>, <linux/fs.h>


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside `path` for a writer that wants a name (safetensors' save_file, to_csv):
    on a clean exit the file written there is fsynced and renamed over `path`; on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_UMASK)               # mkstemp makes 0600 files; use the usual permissions
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ---- folders -----------------------------------------------------------------------------------------

def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux renameat2 RENAME_EXCHANGE); False where the C library,
    kernel or file system lacks it."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename2 is None:
        return False
    if rename2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _set_aside(dest: Path) -> str:
    return f".{dest.name}.old-"


def recover_folder(dest: str | Path) -> None:
    """Finish a `swap_folder` that crashed between its two renames (only where RENAME_EXCHANGE is
    unavailable): with `dest` missing, the folder set aside beside it is renamed back; with `dest`
    present, folders left set aside are deleted. Assumes one writer of `dest` at a time."""
    dest = Path(dest)
    aside = sorted(dest.parent.glob(f"{_set_aside(dest)}*")) if dest.parent.is_dir() else []
    if aside and not dest.exists():
        os.rename(aside.pop(), dest)
        fsync_dir(dest.parent)
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)


def place_folder(new: str | Path, dest: str | Path) -> bool:
    """Rename folder `new` to `dest` unless something is there already (an empty folder counts as
    absent): True if it was placed, False if `dest` was taken (then `new` is left where it is)."""
    new, dest = Path(new), Path(dest)
    try:
        os.rename(new, dest)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    fsync_dir(dest.parent)
    return True


def swap_folder(new: str | Path, dest: str | Path) -> None:
    """Put folder `new` at `dest` (same file system), replacing the folder there; the old one is deleted.
    With RENAME_EXCHANGE the two are swapped in one step, so a crash leaves either folder at `dest`. Without
    it, the old folder is renamed aside to `.<name>.old-*` first; a crash between the two renames leaves
    `dest` missing until the next swap_folder or recover_folder puts the old one back."""
    new, dest = Path(new), Path(dest)
    recover_folder(dest)
    if place_folder(new, dest):
        return
    if _exchange(new, dest):
        fsync_dir(dest.parent)
        shutil.rmtree(new)
        return
    old = dest.with_name(f"{_set_aside(dest)}{secrets.token_hex(4)}")
    os.rename(dest, old)
    os.rename(new, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old)


def atomic_replace(new: str | Path, dest: str | Path) -> None:
    """Put the file or folder `new` at `dest`, replacing what is there, durably: a file by one
    os.replace, a folder by `swap_folder`."""
    new, dest = Path(new), Path(dest)
    if new.is_dir() and dest.is_dir():
        swap_folder(new, dest)
    else:
        os.replace(new, dest)
        fsync_dir(dest.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


@contextmanager
def atomic_folder(dest: str | Path, replace: bool = False) -> Iterator[Path]:
    """A new hidden folder beside `dest` to fill; on a clean exit its files are fsynced and it is renamed
    to `dest`. An existing `dest` is swapped out with `replace` (swap_folder); without it, a `dest` that is
    there (not an empty folder), also one another process put there meanwhile, is a FileExistsError.
    On an error, or a refusal, the new folder is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.with_name(f".{dest.name}.new-{secrets.token_hex(4)}")
    stage.mkdir()
    try:
        yield stage
        _fsync_tree(stage)
        if replace:
            swap_folder(stage, dest)
        elif not place_folder(stage, dest):
            raise FileExistsError(errno.EEXIST, "a folder or file is already there", str(dest))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
