"""Run-time settings: torch threads (SEMLA_THREADS), device choice, seeds, where assets live, environment
variables set only for a block, and the known harmless log messages that notebooks silence."""
from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UsageError


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads from `n` or $SEMLA_THREADS (default 1: on a busy 2-core machine
    2 threads were measured ~10x slower than 1 through oversubscription)."""
    raw = n if n is not None else os.environ.get("SEMLA_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise UsageError(f"SEMLA_THREADS must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise UsageError(f"SEMLA_THREADS must be a positive integer, got {n}")
    torch.set_num_threads(n)
    return n


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else $SEMLA_DEVICE, else CUDA when available, else CPU. Never hard-coded.
    A device this machine does not have is a ValueError that names it and where it came from."""
    source = "device" if device else "$SEMLA_DEVICE"
    device = device or os.environ.get("SEMLA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"{source} {str(device)!r} is not a torch device (cpu, cuda, cuda:1, mps): {e}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{source} {str(device)!r} asks for CUDA, but this torch ({torch.__version__}) sees no "
                             "GPU; use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"{source} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{source} {str(device)!r} asks for Apple MPS, which this machine does not have; use cpu")
    return resolved


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live: its inputs go there (the model is never moved for them)."""
    return next(model.parameters()).device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def scoped_env(**values: str | None) -> Iterator[None]:
    """Set (a string) or unset (None) environment variables for the block; afterwards each named variable has
    its value from before again, also where the block (or a library it called) changed it."""
    before = {name: os.environ.get(name) for name in values}

    def put(settings: dict) -> None:
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    put(values)
    try:
        yield
    finally:
        put(before)


def assets_dir() -> Path:
    """The shipped artifacts (tiny CLIP, base segmenter, adapter library), or $SEMLA_ASSETS."""
    return Path(os.environ.get("SEMLA_ASSETS") or Path(__file__).parents[1] / "assets")


def quiet_known_warnings() -> None:
    """Silence two known, harmless messages in notebooks: open_clip's log line when an architecture is
    built without pretrained weights (on purpose here), and peft's note that it replaced the adapter
    config's base model name (the library records the base model itself)."""
    import warnings
    warnings.filterwarnings("ignore", message=r"The PEFT config's `base_model_name_or_path` was renamed")
    root = logging.getLogger()
    if not any(isinstance(f, _KnownMessages) for f in root.filters):
        root.addFilter(_KnownMessages())


class _KnownMessages(logging.Filter):
    MESSAGES = ("No pretrained weights loaded for model",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in record.getMessage() for m in self.MESSAGES)
