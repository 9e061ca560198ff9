"""The `vlm` command: help for every sub-command, one-line errors."""
import subprocess
import sys

import pytest

from vlm.cli import build_parser, main


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "shards" in out and "parts" in out


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    assert "shards" in names
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert "usage: vlm " + name in capsys.readouterr().out


def test_parts_lists_kinds(capsys):
    assert main(["parts"]) == 0
    out = capsys.readouterr().out
    for kind in ("tower:", "projector:", "llm:", "adapter:"):
        assert kind in out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "vlm", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: vlm" in r.stdout
