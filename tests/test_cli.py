"""The `fastchat` entry point routes every subcommand to its driver's main(argv)."""
import importlib

import pytest

from fastchat_core import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in list(cli.COMMANDS) + [f"    {s}" for g in cli.GROUPS.values() for s in g]:
        assert name in out


@pytest.mark.parametrize("argv", [["nope"], ["train"], ["train", "nope"], ["bench", "nope"]])
def test_bad_commands_exit_2_with_a_hint(argv, capsys):
    assert cli.main(argv) == 2
    assert "fastchat" in capsys.readouterr().err


def test_every_target_module_has_main():
    for module, _ in list(cli.COMMANDS.values()) + [v for g in cli.GROUPS.values() for v in g.values()]:
        assert callable(importlib.import_module(module).main), module


def test_subcommand_gets_the_rest_of_the_argv(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "base", "--help"])
    assert e.value.code == 0
    assert "--depth" in capsys.readouterr().out
