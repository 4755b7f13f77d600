"""docs/cli.md is the current `semla-lab --help` and every subcommand's help."""
import importlib.util
from pathlib import Path

GEN = Path(__file__).resolve().parents[1] / "docs" / "gen_cli.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_is_current(monkeypatch):
    gen = load_generator()
    monkeypatch.setenv("COLUMNS", gen.WIDTH)
    assert gen.PAGE.read_text() == gen.render(), "docs/cli.md is stale: run python docs/gen_cli.py"


def test_every_subcommand_has_a_section():
    gen = load_generator()
    page = gen.PAGE.read_text()
    for name in gen.subcommands(gen.help_text(["--help"])):
        assert f"## semla-lab {name}\n" in page, name
