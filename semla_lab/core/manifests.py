"""Where the data manifests live: the package's data_manifests/ (in a checkout a symlink to the repository's
top-level data_manifests/, the one source; in a wheel the files themselves), or $SEMLA_MANIFESTS."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingFileError


def manifests_dir() -> Path:
    env = os.environ.get("SEMLA_MANIFESTS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "data_manifests"
    if not path.is_dir():
        raise MissingFileError(f"data manifests folder not found at {path}; set SEMLA_MANIFESTS to a folder "
                               "laid out like the repository's data_manifests/ (mini/, real/)")
    return path
