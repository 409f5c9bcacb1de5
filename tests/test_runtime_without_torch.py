"""The runtime never imports torch: checked in fresh interpreters, through the API and the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap


from tests.conftest import write_png


def test_api_scoring_and_sampling_leave_torch_unimported(tiny_model_dir, tmp_path, mnist_test):
    images, _ = mnist_test
    write_png(tmp_path / "imgs" / "a.png", images[0])
    code = textwrap.dedent(f"""
        import sys
        from aae_runtime import AAEModel
        from aae_runtime.cli import app  # the CLI module too
        m = AAEModel.load({str(tiny_model_dir)!r}, device="auto")
        rows = m.score_paths([{str(tmp_path / "imgs")!r}])
        assert rows[0].ok, rows
        m.sample(4, seed=0)
        bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "aae_train", "export"))
        print("LEAKED", bad)
        sys.exit(1 if bad else 0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_scoring_and_sampling_leave_torch_unimported(tiny_model_dir, tmp_path, mnist_test):
    images, _ = mnist_test
    write_png(tmp_path / "a.png", images[0])
    code = textwrap.dedent(f"""
        import sys
        from aae_runtime.cli import app
        for argv in (["score", {str(tmp_path / "a.png")!r}, "--model", {str(tiny_model_dir)!r}],
                     ["sample", "--model", {str(tiny_model_dir)!r}, "-n", "4", "--out", {str(tmp_path / "g.png")!r}]):
            try:
                app(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
        # nor Rich: its import and one table were some 25 ms of a cold start (aae_runtime.console)
        sys.exit(3 if "torch" in sys.modules else 4 if "rich" in sys.modules else 0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_importing_any_runtime_module_has_no_side_effects():
    # Every module of the runtime package, imported in a fresh interpreter: no warning filter or
    # ONNX Runtime log setting changes, and reading the version or an error class loads neither
    # ONNX Runtime nor Pillow.
    code = textwrap.dedent("""
        import importlib, pkgutil, sys, warnings
        import aae_runtime
        from aae_runtime.contract.errors import ModelError
        from aae_runtime.contract import metadata, preprocessing, priors, scores, fileio
        aae_runtime.__version__, aae_runtime.InputError
        heavy = sorted(m for m in ("onnxruntime", "PIL", "typer", "rich") if m in sys.modules)
        assert not heavy, f"loaded at import: {heavy}"
        import numpy, onnxruntime, PIL.Image, typer, rich.console, concurrent.futures  # their own filters
        before = list(warnings.filters)
        names = [m.name for m in pkgutil.walk_packages(aae_runtime.__path__, "aae_runtime.")]
        for name in names:
            importlib.import_module(name)
        assert warnings.filters == before, [f for f in warnings.filters if f not in before]
        bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "aae_train", "export"))
        assert not bad, bad
        print(len(names))
    """)
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split()[-1]) >= 15  # every module was imported
