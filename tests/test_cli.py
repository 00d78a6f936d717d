"""The command line: help, the activation table, and the demo job."""

import subprocess
import sys

import pytest

from polycom.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "activations" in out


def test_activations_table(capsys):
    assert main(["activations"]) == 0
    out = capsys.readouterr().out
    assert "swiglu" in out and "5504" in out and "polynorm" in out and "8256" in out


def test_demo_runs_every_activation(capsys):
    assert main(["demo", "--steps", "30", "--width", "8"]) == 0
    out = capsys.readouterr().out
    for name in ("relu", "swiglu", "polyrelu", "polynorm"):
        assert f"\n{name} " in out
    assert "lowest error" in out


def test_bad_argument_is_a_one_line_error(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_console_entry_point_module_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "polycom.cli", "activations"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
