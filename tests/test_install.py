"""A runtime-only install (no torch) or one without ONNX Runtime: each command says in one line
what to install. The missing package is blocked in a real interpreter (``sys.modules[name] = None``,
which makes it unimportable, as if it were not installed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

RUN_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from {module} import app
app(sys.argv[2:], prog_name="{prog}")
"""

COMMANDS = {
    "aae-train": ("aae_train.cli", ["mnist", "--epochs", "1"], "torch", "pip install '.[train,cpu]'"),
    "aae-train folder": ("aae_train.cli", ["folder", ".", "--size", "8"], "torch", "pip install '.[train,cpu]'"),
    "aae-export": ("export.cli", ["--checkpoint", "c.pt"], "torch", "pip install '.[train,cpu]'"),
    "aae-run": ("aae_runtime.cli", ["info", "--model", "m"], "onnxruntime", "pip install '.[cpu]'"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_missing_its_extra_says_what_to_install_in_one_line(name, tmp_path):
    module, args, blocked, extra = COMMANDS[name]
    code = RUN_WITHOUT.format(module=module, prog=name.split()[0])
    r = subprocess.run([sys.executable, "-c", code, blocked, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and extra in lines[0] and "internal error" not in lines[0], r.stderr


def test_demo_images_needs_no_torch(tmp_path, mnist_dir):
    code = RUN_WITHOUT.format(module="aae_train.cli", prog="aae-train")
    r = subprocess.run([sys.executable, "-c", code, "torch", "demo-images", "--out", str(tmp_path / "d"),
                        "--data-dir", str(mnist_dir), "--digits", "2", "--noise", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "d").rglob("*.png"))) == 3


def test_an_empty_package_folder_left_by_an_uninstall_is_not_an_install(tmp_path, monkeypatch):
    """`pip uninstall onnxruntime` beside onnxruntime-gpu (they share a module) can leave an empty
    onnxruntime/ folder, which imports as a namespace package: that is not ONNX Runtime installed."""
    from aae_runtime.install import _importable

    (tmp_path / "leftover_pkg_xyz").mkdir()
    (tmp_path / "real_pkg_xyz").mkdir()
    (tmp_path / "real_pkg_xyz" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not _importable("leftover_pkg_xyz") and _importable("real_pkg_xyz") and _importable("json")
