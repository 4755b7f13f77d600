"""The semla-lab command: world, the build recipe (quick), training commands, and one-line errors."""
import json

import pytest

from semla_lab.cli import main
from semla_lab.core.runtime import assets_dir

SHIPPED_LIBRARY = str(assets_dir() / "library")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_world_summary_lists_every_domain(capsys):
    code, out, _ = run(capsys, "world", "--summary", "--count", "8")
    assert code == 0
    for name in ("source", "acdc_fog", "muses_snow_night", "nyu", "coconut"):
        assert name in out
    assert "pixel shares" in out


def test_world_writes_dataset_and_preview(capsys, tmp_path):
    code, out, _ = run(capsys, "world", "nyu", "--out", str(tmp_path), "--count", "3", "--splits", "test",
                       "--preview", str(tmp_path / "p.png"), "--per-domain", "2")
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 1000
    manifest = json.loads((tmp_path / "nyu" / "manifest.json").read_text())
    assert len(manifest["samples"]) == 3 and manifest["classes"][0] == "wall"


@pytest.mark.parametrize("argv, message", [
    (["world", "atlantis"], "unknown domain 'atlantis'"),
    (["world", "missing.yaml"], "domain spec file not found: missing.yaml"),
    (["evaluate", "--library", "/nonexistent/lib"], "library folder not found: /nonexistent/lib"),
    (["evaluate", "--k", "0", "--targets", "nyu"], "k must be an int >= 1, got 0"),
    (["evaluate", "--tau", "-1", "--targets", "nyu"], "tau must be > 0, got -1.0"),
    (["evaluate", "--targets", "nyu", "--methods", "magic"], "unknown method"),
    (["evaluate", "--targets", "real:acdc_fog"], "set SEMLA_ACDC_ROOT to that folder"),
    (["zero-shot", "--device", "cdua"], "'cdua' is not a torch device"),
    (["build-library", "--out", "lib", "--domains", "nyu", "--strength", "1.5"],
     "AdapterConfig.strength must be in (0, 1], got 1.5"),
    (["segment", "photo.png", "--out", "o.png", "--classes", ",".join(f"c{i}" for i in range(256))],
     "at most 255 classes fit an 8-bit mask, got 256"),
    (["beyond", "--libraries", SHIPPED_LIBRARY, "--variant", "index"], "bad variant part 'index'"),
    (["beyond", "--libraries", SHIPPED_LIBRARY, "--variant", "text_weight=x"], "bad value in variant part"),
    (["beyond", "--libraries", SHIPPED_LIBRARY, "--variant", "index=centroid"], "turns no option beyond the paper on"),
])
def test_bad_arguments_print_one_line_and_exit_2(capsys, argv, message, monkeypatch, tmp_path):
    monkeypatch.setenv("SEMLA_DATA_ROOT", str(tmp_path))
    code, out, err = run(capsys, *argv)
    assert code == 2
    last = err.strip().splitlines()[-1]          # progress bars may precede it on stderr
    assert last.startswith("semla-lab: error:") and message in last
    assert "Traceback" not in err


def test_build_recipe_runs_quickly_end_to_end(capsys, tmp_path):
    """The `make assets` recipe with a few steps per stage: proves it still works."""
    code, out, _ = run(capsys, "build", "all", "--quick", "--quiet", "--out", str(tmp_path))
    assert code == 0
    for name in ("tiny_clip.safetensors", "segmenter.safetensors", "manifest.json", "library/index.json"):
        assert (tmp_path / name).is_file(), name
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) == {"tiny_clip", "segmenter", "library"}
    from semla_lab.models.clip import TINY_CLIP
    from semla_lab.evaluation.embedding_space import nearest_centroid_accuracy
    from semla_lab.models.clip import load_clip
    clip = load_clip(TINY_CLIP, checkpoint=tmp_path / "tiny_clip.safetensors", device="cpu")
    assert manifest["tiny_clip"]["nearest_centroid_accuracy"] == nearest_centroid_accuracy(clip, ["cityscapes", "nyu"])
    from semla_lab.library.index import AdapterLibrary
    assert AdapterLibrary(tmp_path / "library").names() == ["cityscapes", "acdc_fog"]


@pytest.mark.parametrize("argv, strength", [
    (["build-library", "--out", "lib"], 0.9),
    (["build-library", "--out", "lib", "--strength", "1"], 1.0),
    (["train-adapter", "--domain", "nyu", "--out", "a", "--strength", "0.5"], 0.5),
    (["scale", "--out", "s", "--strength", "0.75"], 0.75),
])
def test_strength_option_reaches_the_adapter_recipe(argv, strength):
    from semla_lab.cli import _adapter_config, build_parser
    assert _adapter_config(build_parser().parse_args(argv)).strength == strength


SHARED = ("--library", "--clip", "--pretrained", "--checkpoint", "--segmenter", "--ray", "--ray-address", "--num-cpus",
          "--steps", "--strength", "--seed", "--rank", "--k", "--tau", "--targets")


def test_each_shared_option_is_defined_once():
    """A flag that several subcommands take means the same everywhere: one help text, one type, one default
    (grids take comma-separated values of the same knob)."""
    from semla_lab.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.choices and "evaluate" in a.choices).choices
    seen = {}
    for command, parser in sub.items():
        for action in parser._actions:
            for flag in set(action.option_strings) & set(SHARED):
                if command in ("build", "scale") and flag in ("--seed", "--targets"):
                    continue        # the build's seed seeds every stage; scale's targets default to held-out domains
                seen.setdefault(flag, {}).setdefault((action.help or "").split(" (default")[0], []).append(command)
    drift = {flag: helps for flag, helps in seen.items() if len(helps) > 1}
    assert drift == {}
    assert len(seen["--clip"][next(iter(seen["--clip"]))]) >= 8 and set(seen) == set(SHARED)


def test_retrieval_defaults_live_in_the_config_dataclass():
    from semla_lab.cli import build_parser
    from semla_lab.core.retrieval import RetrievalConfig
    parse = build_parser().parse_args
    for argv in (["evaluate"], ["segment", "a.png", "--classes", "road", "--out", "o.png"], ["analyze", "a", "--out", "o"],
                 ["scale", "--out", "s"]):
        assert (parse(argv).k, getattr(parse(argv), "tau", RetrievalConfig.tau)) == (RetrievalConfig.k, RetrievalConfig.tau)
    assert parse(["ablate"]).k == [RetrievalConfig.k] and parse(["ablate"]).tau == [RetrievalConfig.tau]
    own = parse(["segment", "a.png", "--classes", "road", "--out", "o.png", "--index", "kmeans:4", "--text-weight", "0.5"])
    from semla_lab.cli import _config_fields
    assert RetrievalConfig(**_config_fields(own, RetrievalConfig)) == RetrievalConfig(index="kmeans:4", text_weight=0.5)


def test_a_ray_command_may_name_cuda_on_a_head_without_a_gpu(monkeypatch):
    """With --ray/--ray-address, --device cuda is the workers' device: a driver without a GPU accepts it;
    without Ray it is still one clear error."""
    import torch
    from semla_lab.cli import build_parser, command_device
    from semla_lab.core.errors import UsageError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parse = build_parser().parse_args
    assert command_device(parse(["evaluate", "--ray-address", "auto", "--device", "cuda"])) == torch.device("cuda")
    assert command_device(parse(["build-library", "--out", "L", "--ray", "--device", "cuda:1"])) == torch.device("cuda:1")
    assert command_device(parse(["evaluate", "--ray", "--device", "cpu"])) == torch.device("cpu")
    with pytest.raises(UsageError, match="sees no GPU"):
        command_device(parse(["evaluate", "--device", "cuda"]))
