"""A benchmark run's configuration: EvalConfig holds the retrieval knobs (RetrievalConfig's fields, the
paper's defaults) plus fusion, batch size, image count and size; `config_methods` gives the methods a config
implies (options beyond the paper add the method `semla+<opts>` next to `semla`, methods.py; notebook 10).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.errors import UsageError
from ..core.fusion import FUSION_TYPES
from ..core.retrieval import RetrievalConfig
from .methods import check_methods, is_beyond


@dataclass(frozen=True)
class EvalConfig(RetrievalConfig):
    """A benchmark run: the retrieval knobs (RetrievalConfig's fields, the paper's defaults) plus how the
    retrieved adapters are fused and how many test images are read, in which batches and at what size."""
    fusion: str = "cat"            # weight-level fusion of `semla`: "cat" (paper) or "linear" (peft)
    batch_size: int = 50
    max_images: int | None = None  # per target domain; None = the whole test split
    image_size: int | None = None  # resize dataset-folder and real targets to this size

    def __post_init__(self):
        super().__post_init__()
        if self.fusion not in FUSION_TYPES:
            raise UsageError(f"unknown fusion {self.fusion!r}; expected one of {FUSION_TYPES}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def retrieval(self) -> RetrievalConfig:
        """The retrieval knobs alone."""
        return RetrievalConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RetrievalConfig)})

    @property
    def paper_retrieval(self) -> RetrievalConfig:
        """The config's retrieval without the options beyond the paper (method `semla`)."""
        return RetrievalConfig(self.k, self.tau, self.metric, self.weighting)

    @property
    def extra_method(self) -> str | None:
        """The method name of SemLA with this config's options beyond the paper, None if none is on."""
        return None if self.is_paper else self.label


def config_methods(methods, cfg: EvalConfig, replace_semla: bool = False) -> list[str]:
    """`methods` checked against the registry and `cfg`, with SemLA under the config's options beyond the
    paper added next to `semla` (or in its place with `replace_semla`, as ablations do) when any is on."""
    methods = check_methods(methods)
    wrong = [m for m in methods if is_beyond(m) and m != cfg.extra_method]
    if wrong:
        raise UsageError(f"method(s) {wrong} do not match the config's options (its method: {cfg.extra_method})")
    if cfg.extra_method and "semla" in methods and cfg.extra_method not in methods:
        at = methods.index("semla")
        methods = methods[:at + (not replace_semla)] + [cfg.extra_method] + methods[at + 1:]
    return methods
