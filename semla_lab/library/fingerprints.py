"""Fingerprints of a library's adapters: which ones a write added, removed, changed or left untouched
(notebook 08 shows that adding a domain touches no other adapter)."""
from __future__ import annotations

import hashlib

import pandas as pd

from .index import WEIGHTS


def adapter_fingerprints(library) -> pd.DataFrame:
    """Per domain of an AdapterLibrary: sha256 (first 12 hex digits) of its adapter weights, their
    modification time (ns) and size. Compare before/after a write with fingerprint_changes."""
    rows = {}
    for name in library.names():
        path = library.adapter_path(name) / WEIGHTS
        st = path.stat()
        rows[name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12], "mtime_ns": st.st_mtime_ns,
                      "bytes": st.st_size}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["sha256", "mtime_ns", "bytes"])


def fingerprint_changes(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, list[str]]:
    """Which domains were added, removed, changed (hash or mtime) or left untouched between two
    adapter_fingerprints tables."""
    common = [n for n in before.index if n in after.index]
    changed = [n for n in common if (before.loc[n, ["sha256", "mtime_ns"]] != after.loc[n, ["sha256", "mtime_ns"]]).any()]
    return {"added": [n for n in after.index if n not in before.index],
            "removed": [n for n in before.index if n not in after.index],
            "changed": changed, "unchanged": [n for n in common if n not in changed]}
