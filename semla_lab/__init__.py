"""semla_lab: teach, reproduce and extend SemLA (Semantic Library Adaptation, CVPR 2025).

The data path, one module each: world (mini-world images) -> clip (CLIP embeddings) -> library
(adapters + centroids) -> retrieval -> fusion -> segmenter -> metrics -> plots; predictor and
benchmark compose them. Names below are imported lazily (peft and open_clip load on first use).
"""
from importlib import import_module

__version__ = "0.1.0"

_API = {
    "generate": "data.world.generate", "shipped_domains": "data.world.generate", "target_domains": "data.world.generate",
    "get_domain": "data.world.generate", "DomainSpec": "data.world.spec", "load_spec": "data.world.spec",
    "SegmentationDataset": "data.datasets", "write_dataset": "data.datasets", "RealDataset": "data.real_data",
    "load_clip": "models.clip", "embed_images": "models.clip", "embed_class_names": "models.clip",
    "OVSegmenter": "models.segmenter", "build_segmenter": "models.segmenter", "load_segmenter": "library.assets",
    "AdapterLibrary": "library.index", "retrieve": "core.retrieval", "RetrievalConfig": "core.retrieval",
    "FusedAdapters": "core.fusion", "LibraryModel": "library.predictor", "SemLAPredictor": "library.predictor",
    "EvalConfig": "evaluation.config", "run_benchmark": "evaluation.benchmark", "MIoU": "core.metrics", "harmonic_mean": "core.metrics",
    "configure_threads": "core.runtime", "resolve_device": "core.runtime", "analyze": "workflows.analyze",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'semla_lab' has no attribute {name!r}")
    return getattr(import_module(f".{_API[name]}", __name__), name)
