"""The error contract: user errors are SemlaError (and still the built-in they used to be); the CLI prints
them as one line with exit status 2 and lets anything else (a bug) propagate with its traceback."""
import pytest

from semla_lab import cli
from semla_lab.models.clip import ClipLoadError
from semla_lab.data.datasets import DataError
from semla_lab.core.errors import MissingFileError, SemlaError, UnknownNameError, UsageError
from semla_lab.library.index import LibraryError
from semla_lab.data.real_data import MissingDataError
from semla_lab.data.world.spec import SpecError


@pytest.mark.parametrize("cls, builtin", [
    (UsageError, ValueError), (MissingFileError, FileNotFoundError), (UnknownNameError, KeyError),
    (SpecError, ValueError), (DataError, ValueError), (MissingDataError, ValueError), (LibraryError, ValueError),
    (ClipLoadError, RuntimeError)])
def test_user_errors_are_semla_errors_and_their_old_builtin(cls, builtin):
    assert issubclass(cls, SemlaError) and issubclass(cls, builtin)


def test_unknown_name_prints_its_message_unquoted():
    assert str(UnknownNameError("unknown domain 'x'")) == "unknown domain 'x'"


@pytest.mark.parametrize("argv, message", [
    (["world", "atlantis"], "unknown domain 'atlantis'"),
    (["evaluate", "--targets", "nyu", "--methods", "magic"], "unknown method"),
    (["evaluate", "--k", "0", "--targets", "nyu"], "k must be"),
    (["summarize", "/nonexistent/run"], "no results.json"),
    (["world", "--device", "cdua"], "'cdua' is not a torch device"),
    (["world", "--threads", "0"], "positive integer"),
])
def test_user_error_prints_one_line_and_exits_2(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("semla-lab: error: ") and message in err[-1]


@pytest.mark.parametrize("bug", [KeyError("typo"), RuntimeError("CUDA out of memory"), ValueError("internal")])
def test_internal_error_propagates_with_its_traceback(monkeypatch, capsys, bug):
    def cmd_world(args):
        raise bug
    monkeypatch.setattr(cli, "cmd_world", cmd_world)
    with pytest.raises(type(bug)) as caught:
        cli.main(["world"])
    assert caught.value is bug and "semla-lab: error" not in capsys.readouterr().err
