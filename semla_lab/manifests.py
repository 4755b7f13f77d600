"""Where the data manifests live: data_manifests/ of the source tree, or $SEMLA_MANIFESTS."""
from __future__ import annotations

import os
from pathlib import Path


def manifests_dir() -> Path:
    env = os.environ.get("SEMLA_MANIFESTS")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "data_manifests"
    if not path.is_dir():
        raise FileNotFoundError(f"data manifests folder not found at {path}; set SEMLA_MANIFESTS to the "
                                "data_manifests/ folder of a semla_lab checkout")
    return path
