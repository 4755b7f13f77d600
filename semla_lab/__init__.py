"""semla_lab: teach, reproduce and extend SemLA (Semantic Library Adaptation, CVPR 2025).

The data path, one module each: world (mini-world images) -> clip (CLIP embeddings) -> library
(adapters + centroids) -> retrieval -> fusion -> segmenter -> metrics -> plots; predictor and
experiments compose them. Names below are imported lazily (peft and open_clip load on first use).
"""
from importlib import import_module

__version__ = "0.1.0"

_API = {
    "generate": "world.generate", "shipped_domains": "world.generate", "target_domains": "world.generate",
    "get_domain": "world.generate", "DomainSpec": "world.spec", "load_spec": "world.spec",
    "SegmentationDataset": "data", "write_dataset": "data", "RealDataset": "real_data",
    "load_clip": "clip", "embed_images": "clip", "embed_class_names": "clip",
    "OVSegmenter": "segmenter", "build_segmenter": "segmenter", "load_segmenter": "assets",
    "AdapterLibrary": "library", "retrieve": "retrieval", "RetrievalConfig": "retrieval",
    "FusedAdapters": "fusion", "LibraryModel": "predictor", "SemLAPredictor": "predictor",
    "EvalConfig": "experiments", "run_benchmark": "experiments", "MIoU": "metrics", "harmonic_mean": "metrics",
    "configure_threads": "runtime", "resolve_device": "runtime", "analyze": "domain_shift",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'semla_lab' has no attribute {name!r}")
    return getattr(import_module(f".{_API[name]}", __name__), name)
