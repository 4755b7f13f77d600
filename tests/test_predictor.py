"""SemLAPredictor binds its retrieval index and its fused model to one list of library domains."""
import shutil

import pytest
import torch

from semla_lab.core.runtime import assets_dir
from semla_lab.data.world.generate import generate, get_domain
from semla_lab.library.index import AdapterLibrary, LibraryError
from semla_lab.library.predictor import SemLAPredictor


@pytest.fixture
def library(tmp_path):
    shutil.copytree(assets_dir() / "library", tmp_path / "library")
    return AdapterLibrary(tmp_path / "library")


@pytest.fixture
def image():
    return generate(get_domain("acdc_fog"), "test", 1).images[0]


def _predictor(library):
    return SemLAPredictor.from_assets(library_dir=library.root, device="cpu")


def test_domain_added_before_first_prediction_leaves_the_model_on_the_index_names(library, image):
    p = _predictor(library)
    library = p.library
    first = library.names()[0]
    library.add("extra", library.adapter_path(first), library.get(first).centroid + 0.01, 10)
    p.set_image(image)
    p.predict(["road", "sky"])
    assert p.model.names == p.index.names and "extra" not in p.model.names


@pytest.mark.parametrize("change", ["remove", "replace", "another process, then refresh"])
def test_domain_removed_or_replaced_before_first_prediction_is_an_error(library, image, change):
    """Without the binding, the model was built over the new list and every retrieved index named another
    adapter, silently."""
    p = _predictor(library)
    p.set_image(image)
    victim = p.library.names()[1]
    if change == "remove":
        p.library.remove(victim)
    elif change == "replace":
        adapter = p.library.adapter_path(p.library.names()[2])
        p.library.remove(victim)
        p.library.add(victim, adapter, torch.nn.functional.normalize(torch.randn(p.library.dim), dim=0), 10)
    else:
        AdapterLibrary(p.library.root).remove(victim)
        p.library.refresh()
    with pytest.raises(LibraryError, match=f"changed since this predictor was made.*{victim}"):
        p.predict(["road", "sky"])
