"""Fused per-image LoRA fusion == peft add_weighted_adapter, on the real segmenter architecture."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from semla_lab.core.fusion import FusedAdapters, peft_weighted_forward
from semla_lab.models.segmenter import LORA_TARGETS

NAMES = ["a0", "a1", "a2", "a3", "a4"]
TOL = dict(atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def setup(tiny_segmenter):
    torch.manual_seed(0)
    base = copy.deepcopy(tiny_segmenter).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=NAMES[0])
    for n in NAMES[1:]:
        peft_model.add_adapter(n, cfg)
    with torch.no_grad():   # make the deltas large enough to matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval()
    states = {n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in NAMES}
    fused_model = copy.deepcopy(base)
    fused = FusedAdapters(fused_model, {n: (states[n], cfg.lora_alpha / cfg.r) for n in NAMES})
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 64, 64, generator=g)
    text = torch.nn.functional.normalize(torch.randn(5, 64, generator=g), dim=-1)
    return base, peft_model, fused_model, fused, images, text


def _fused(fused_model, fused, names, weights, images, text, fusion="cat"):
    idx = fused.index(names).expand(images.shape[0], -1)
    w = torch.tensor(weights).expand(images.shape[0], -1)
    with fused.select(idx, w, fusion), torch.no_grad():
        return fused_model(images, text)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cat_equals_peft_batch_one(setup, seed):
    base, peft_model, fused_model, fused, images, text = setup
    g = torch.Generator().manual_seed(seed)
    chosen = [NAMES[i] for i in torch.randperm(5, generator=g)[:3].tolist()]
    weights = torch.softmax(torch.randn(3, generator=g), 0).tolist()
    ref = peft_weighted_forward(peft_model, chosen, weights, images[:1], text)
    out = _fused(fused_model, fused, chosen, weights, images[:1], text)
    assert torch.allclose(out, ref, **TOL), (out - ref).abs().max()
    with torch.no_grad():
        assert (out - base(images[:1], text)).abs().max() > 1e-3, "adapters must change the output"


def test_mixed_batch_each_image_its_own_adapters(setup):
    base, peft_model, fused_model, fused, images, text = setup
    choices = [(["a0", "a1"], [0.7, 0.3]), (["a2", "a4"], [0.1, 0.9]), (["a3", "a1"], [0.5, 0.5])]
    idx = torch.stack([fused.index(n) for n, _ in choices])
    w = torch.tensor([ws for _, ws in choices])
    with fused.select(idx, w), torch.no_grad():
        out = fused_model(images, text)
    for i, (names, ws) in enumerate(choices):
        ref = peft_weighted_forward(peft_model, names, ws, images[i:i + 1], text)
        assert torch.allclose(out[i:i + 1], ref, **TOL)


def test_k1_equals_single_adapter_and_no_selection_is_base(setup):
    base, peft_model, fused_model, fused, images, text = setup
    peft_model.base_model.enable_adapter_layers()
    peft_model.set_adapter("a2")
    with torch.no_grad():
        ref = peft_model(images, text)
    peft_model.base_model.disable_adapter_layers()
    assert torch.allclose(_fused(fused_model, fused, ["a2"], [1.0], images, text), ref, **TOL)
    with torch.no_grad():
        assert torch.equal(fused_model(images, text), base(images, text))


def test_peft_reference_leaves_no_adapter_active(setup):
    """peft's delete_adapter on the active adapter silently activates another; zero-shot after a
    fusion must still be the base model."""
    base, peft_model, _, _, images, text = setup
    peft_weighted_forward(peft_model, ["a0", "a1"], [0.5, 0.5], images, text)
    with torch.no_grad():
        assert torch.allclose(peft_model(images, text), base(images, text), atol=1e-6)


def test_fused_lora_is_peft_cat_adapter_per_image(setup):
    """The fusion step alone: each image's (A_cat, B_cat) equals the adapter peft's add_weighted_adapter(cat)
    builds for it (peft gives that adapter scaling 1), for every LoRA target."""
    _, peft_model, _, fused, _, _ = setup
    choices = [(["a3", "a0", "a4"], [0.6, 0.3, 0.1]), (["a1", "a2", "a3"], [0.2, 0.2, 0.6])]
    lora = fused.fused_lora(torch.stack([fused.index(n) for n, _ in choices]),
                            torch.tensor([w for _, w in choices]))
    assert sorted(lora) == fused.modules
    for i, (names, weights) in enumerate(choices):
        peft_model.add_weighted_adapter(names, weights, "_check", combination_type="cat")
        try:
            for path, (A, B) in lora.items():
                layer = peft_model.base_model.model.get_submodule(path)
                assert layer.scaling["_check"] == 1.0
                assert torch.allclose(A[i], layer.lora_A["_check"].weight, atol=1e-7), path
                assert torch.equal(B[i], layer.lora_B["_check"].weight), path
        finally:
            peft_model.delete_adapter("_check")
            peft_model.base_model.disable_adapter_layers()


def test_library_order_does_not_matter(setup, tiny_segmenter):
    base, peft_model, fused_model, fused, images, text = setup
    states = {n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in reversed(NAMES)}
    other_model = copy.deepcopy(base)
    other = FusedAdapters(other_model, {n: (s, 2.0) for n, s in states.items()})
    a = _fused(fused_model, fused, ["a1", "a3"], [0.4, 0.6], images, text)
    b = _fused(other_model, other, ["a3", "a1"], [0.6, 0.4], images, text)
    assert torch.allclose(a, b, **TOL)


def test_linear_matches_peft_and_differs_from_cat(setup):
    base, peft_model, fused_model, fused, images, text = setup
    names, weights = ["a0", "a3"], [0.6, 0.4]
    ref = peft_weighted_forward(peft_model, names, weights, images[:1], text, combination_type="linear")
    out = _fused(fused_model, fused, names, weights, images[:1], text, fusion="linear")
    assert torch.allclose(out, ref, **TOL)
    cat = _fused(fused_model, fused, names, weights, images[:1], text)
    assert (cat - out).abs().max() > 1e-3, "linear mixes factors: not the weighted sum of deltas"


def test_fused_delta_is_linear_in_weights(setup):
    """Fused output minus base is the weighted sum of the single-adapter deltas."""
    base, _, fused_model, fused, images, text = setup
    # at the level of one layer: delta(w) = sum_i w_i delta_i exactly
    layer = next(m for m in fused_model.modules() if type(m).__name__ == "FusedLoRALinear")
    x = torch.randn(2, 7, layer.A.shape[-1])
    def delta(names, ws):
        with fused.select(fused.index(names).expand(2, -1), torch.tensor(ws).expand(2, -1)):
            return layer(x) - layer.base(x)
    combined = delta(["a0", "a2", "a4"], [0.2, 0.3, 0.5])
    parts = sum(w * delta([n], [1.0]) for n, w in zip(["a0", "a2", "a4"], [0.2, 0.3, 0.5]))
    assert torch.allclose(combined, parts, atol=1e-5)


def test_bad_selection_rejected(setup):
    _, _, _, fused, _, _ = setup
    with pytest.raises(ValueError, match="indices"):
        with fused.select(torch.tensor([[0, 9]]), torch.tensor([[0.5, 0.5]])):
            pass
    with pytest.raises(ValueError, match="fusion"):
        with fused.select(torch.tensor([[0]]), torch.tensor([[1.0]]), "ties"):
            pass


KINDS = {"plain": {}, "rslora": {"use_rslora": True},
         "alpha_pattern": {"alpha_pattern": {"c_fc": 32, "resblocks.1.attn.out_proj": 2}},
         "rank_pattern": {"rank_pattern": {"c_proj": 2, "in_proj": 6}}}


@pytest.mark.parametrize("kind", KINDS)
def test_library_model_equals_peft_for_each_honoured_lora_field(kind, tiny_segmenter, tmp_path):
    """A library of peft adapters with this LoRA setting, fused per image by LibraryModel == peft's
    add_weighted_adapter(cat) forward; a single adapter through that reference == peft's own adapter."""
    from semla_lab.library.index import AdapterLibrary
    from semla_lab.library.predictor import LibraryModel
    lora = {"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS, **KINDS[kind]}
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(tiny_segmenter), LoraConfig(**lora, init_lora_weights=False),
                                adapter_name="a0")
    for n in ("a1", "a2"):
        peft_model.add_adapter(n, LoraConfig(**lora, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval().save_pretrained(tmp_path)                # adapters in tmp_path/<name>/
    library = AdapterLibrary.create(tmp_path / "lib", {"dim": 4}, None, lora)
    for i, n in enumerate(("a0", "a1", "a2")):
        library.add(n, tmp_path / n, torch.full((4,), float(i)), 1)
    model = LibraryModel(tiny_segmenter, library, "cpu")
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    text = torch.nn.functional.normalize(torch.randn(5, 64, generator=g), dim=-1)
    choices = [(["a2", "a0"], [0.6, 0.4]), (["a1", "a2"], [0.3, 0.7])]
    out = model.logits(images, text, torch.stack([model.fused.index(n) for n, _ in choices]),
                       torch.tensor([w for _, w in choices]))
    ref = torch.cat([peft_weighted_forward(peft_model, n, w, images[i:i + 1], text)
                     for i, (n, w) in enumerate(choices)])
    assert (out - ref).abs().max() < 2e-4, (kind, (out - ref).abs().max())
    with torch.no_grad():
        assert (out - tiny_segmenter(images, text)).abs().max() > 0.1, "adapters must change the output"
    peft_model.set_adapter("a1")
    peft_model.base_model.enable_adapter_layers()
    with torch.no_grad():
        single = peft_model(images, text)
    peft_model.base_model.disable_adapter_layers()
    assert torch.allclose(peft_weighted_forward(peft_model, ["a1"], [1.0], images, text), single, **TOL)
    if kind in ("rslora", "alpha_pattern"):    # scaling every module by alpha / r, as before, is measurably wrong
        plain = FusedAdapters(copy.deepcopy(tiny_segmenter), {n: (library.load_adapter_state(n), 2.0)
                                                              for n in model.names})
        with plain.select(model.fused.index(choices[0][0])[None], torch.tensor([choices[0][1]])), torch.no_grad():
            assert (plain.model(images[:1], text) - ref[:1]).abs().max() > 0.1


def test_each_lora_factor_is_stored_once(setup):
    """B lives once per fused layer (as Bt, what `cat` reads); `B` is a view of it, not a second copy."""
    _, _, _, fused, _, _ = setup
    for layer in fused.layers.values():
        assert {name for name, _ in layer.named_buffers(recurse=False)} == {"A", "Bt", "scaling"}
        assert layer.B.data_ptr() == layer.Bt.data_ptr() and layer.B.shape == (len(NAMES), layer.base.out_features, 4)


def _states(peft_model):
    return {n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in NAMES}


@pytest.mark.parametrize("failure", ["not a Linear", "error while building"])
def test_install_is_all_or_nothing(setup, monkeypatch, failure):
    """An error halfway through installing leaves the model exactly as it was: same modules, same output."""
    import semla_lab.core.fusion as fusion
    base, peft_model, _, _, images, text = setup
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    states = _states(peft_model)
    if failure == "not a Linear":          # a last target that cannot be fused, after every valid one
        norm = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
        for state in states.values():
            state[f"base_model.model.{norm}.lora_A.weight"] = torch.zeros(4, 64)
            state[f"base_model.model.{norm}.lora_B.weight"] = torch.zeros(64, 4)
    else:                                  # the fifth fused layer fails to build
        built, real = [], fusion.FusedLoRALinear.__init__

        def failing(self, *args):
            built.append(1)
            if len(built) == 5:
                raise RuntimeError("injected")
            real(self, *args)
        monkeypatch.setattr(fusion.FusedLoRALinear, "__init__", failing)
    with pytest.raises((ValueError, RuntimeError)):
        FusedAdapters(model, {n: (states[n], 2.0) for n in NAMES})
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    with torch.no_grad():
        assert torch.equal(model(images, text), base(images, text))


def test_install_finds_each_adapter_by_name_once_not_by_scanning():
    """Installing L adapters is linear in L: no name comparisons while placing each tensor (a scan of the name
    list per tensor made it quadratic)."""
    comparisons = []

    class Name(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            comparisons.append(1)
            return str.__eq__(self, other)

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    names = [Name(f"a{i}") for i in range(50)]
    state = {f"{m}.lora_{ab}.weight": torch.zeros(shape) for m, shapes in (("0", ((1, 3), (2, 1))),
                                                                          ("1", ((1, 2), (2, 1))))
             for ab, shape in zip("AB", shapes)}
    FusedAdapters(model, {n: (state, 1.0) for n in names})
    assert len(comparisons) == 0


def test_nested_select_restores_the_outer_selection(setup):
    base, _, fused_model, fused, images, text = setup
    outer = _fused(fused_model, fused, ["a0", "a1"], [0.7, 0.3], images, text)
    inner_only = _fused(fused_model, fused, ["a4"], [1.0], images, text)
    with fused.select(fused.index(["a0", "a1"]).expand(3, -1), torch.tensor([[0.7, 0.3]] * 3)), torch.no_grad():
        inner = _fused(fused_model, fused, ["a4"], [1.0], images, text)
        after = fused_model(images, text)
    with torch.no_grad():
        assert torch.equal(inner, inner_only) and torch.equal(after, outer)
        assert (after - base(images, text)).abs().max() > 1e-3, "the outer block must not fall back to the base"
        assert torch.equal(fused_model(images, text), base(images, text))


def test_threads_sharing_one_model_each_get_their_own_selection(setup):
    import threading
    base, _, fused_model, fused, images, text = setup
    choices = [(["a0", "a1"], [0.7, 0.3]), (["a2"], [1.0]), (["a3", "a4"], [0.5, 0.5]), None]
    expected = [_fused(fused_model, fused, *c, images, text) if c else base(images, text).detach() for c in choices]
    barrier, results = threading.Barrier(len(choices), timeout=60), {}

    def work(i):
        for step in range(3):
            if choices[i] is None:
                barrier.wait()              # the other threads are inside their select blocks now
                with torch.no_grad():
                    results[i, step] = fused_model(images, text)
                continue
            idx = fused.index(choices[i][0]).expand(3, -1)
            with fused.select(idx, torch.tensor(choices[i][1]).expand(3, -1)), torch.no_grad():
                barrier.wait()              # every thread has entered its own select before any runs the model
                results[i, step] = fused_model(images, text)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(choices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3 * len(choices)
    for (i, _), out in results.items():
        assert torch.equal(out, expected[i]), choices[i]


from hypothesis import given, settings, strategies as st  # noqa: E402

from semla_lab.core.fusion import FusedLoRALinear, Selection, selecting  # noqa: E402


def _layer(L=4, r=2, d_in=6, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out)
    A, B = torch.randn(L, r, d_in, generator=g), torch.randn(L, d_out, r, generator=g)
    return FusedLoRALinear(base, A, B, torch.full((L,), 2.0), key := object()), key


weights_st = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=3, max_size=3)


@settings(max_examples=40, deadline=None)
@given(w1=weights_st, w2=weights_st, a=st.floats(-2, 2), b=st.floats(-2, 2))
def test_property_fused_delta_linear_in_weights(w1, w2, a, b):
    layer, key = _layer()
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[0, 2, 3]] * 2)

    def delta(w):
        with selecting(key, Selection(idx, torch.tensor([w] * 2, dtype=torch.float32))):
            return layer(x) - layer.base(x)
    combined = delta([a * u + b * v for u, v in zip(w1, w2)])
    assert torch.allclose(combined, a * delta(w1) + b * delta(w2), atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(w=weights_st)
def test_property_fused_delta_is_sum_of_weighted_dw(w):
    """delta = x (sum_i w_i s_i B_i A_i)^T, the cat-fused weight update."""
    layer, key = _layer()
    x = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([[3, 0, 1]])
    with selecting(key, Selection(idx, torch.tensor([w], dtype=torch.float32))):
        out = layer(x) - layer.base(x)
    dW = sum(wi * 2.0 * layer.B[i] @ layer.A[i] for wi, i in zip(w, idx[0].tolist()))
    assert torch.allclose(out, x @ dW.T, atol=1e-4)
