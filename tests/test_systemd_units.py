"""The example systemd units in docs/systemd verify (systemd-analyze, where installed) and run the
commands they name with options `aae-run` has."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[1] / "docs" / "systemd").glob("*.service"))


def exec_start(unit: Path) -> list[str]:
    line = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart="))
    return shlex.split(line.split("=", 1)[1])


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_the_unit_names_a_real_command_with_real_options(unit):
    argv = exec_start(unit)
    assert Path(argv[0]).name == "aae-run"
    from typer.testing import CliRunner
    import typer.main

    from aae_runtime.cli import app

    command = typer.main.get_command(app).commands[argv[1]]
    options = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
    assert {a for a in argv[2:] if a.startswith("--")} <= options
    assert CliRunner().invoke(app, [argv[1], "--help"]).exit_code == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verifies_the_unit(unit, tmp_path):
    real = Path(sys.executable).with_name("aae-run")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/aae/venv/bin/aae-run", str(real)))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
