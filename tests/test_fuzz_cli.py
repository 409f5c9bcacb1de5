"""Property tests (hypothesis) of the command lines: random argument lists.

- `aae-run` (score, info, sample, calibrate) is really invoked (typer's CliRunner, in-process)
  on a copy of the tiny model: every run ends in exit code 0, 1 or 2, never in an exception.
- `aae-train`, `aae-export` and `aae-run bench` are only parsed (their runs train, export or time
  for minutes): parsing either succeeds or fails with a usage error that names the argument.
"""

from __future__ import annotations

import os
import shutil

import pytest
import typer
import typer.main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer._click.core import Context
from typer._click.exceptions import ClickException
from typer.testing import CliRunner

from aae_runtime.cli import app as run_app
from tests.conftest import write_png

EXAMPLES = int(os.environ.get("AAE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("AAE_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

NUMBERS = ["0", "1", "-1", "2", "64", "4096", "4097", "1e9", "-1e9", "0.5", "99", "100", "101", "nan", "inf", "-inf",
           "1e400", "0x10", "", " ", "abc", "9" * 30]
# No "/" or "..": a folder argument is walked recursively, and walking the whole disk is just slow.
JUNK = ["", "-", "--", "---x", "--model", "-m", "--help", "--version", "ü", "[/]", "a\nb", "\x1b[2J", "%s", "{}"]


class World(tuple):
    def __repr__(self) -> str:  # short hypothesis reports
        return "<model copy, image folder, paths>"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, mnist_test):
    root = tmp_path_factory.mktemp("cli_fuzz")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)  # calibrate may rewrite its metadata
    imgs = root / "imgs"
    for i in range(3):
        write_png(imgs / f"d{i}.png", mnist_test[0][i])
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = [str(model), str(imgs), str(imgs / "d0.png"), str(imgs / "broken.png"), str(root / "missing"),
             str(root / "out.csv"), str(root / "out.json"), str(root / "out.png"), str(root / "out.npy"),
             str(root / "out.txt"), str(root / "maps"), str(root / "sub" / "deep" / "out.csv"), "/proc/version", "/dev/null"]
    # Commands write default outputs (samples.png) and folders named by odd arguments into the cwd.
    cwd = os.getcwd()
    os.chdir(root / "cwd" if (root / "cwd").mkdir() is None else root)
    try:
        yield World((root, model, imgs, paths))
    finally:
        os.chdir(cwd)


def run_args(paths: list[str]):
    options = ["--model", "-m", "--output", "-o", "--out", "--threshold", "--threshold-percentile", "--maps",
               "--maps-only-flagged", "--batch-size", "--show", "--device", "-n", "--num", "--seed", "--percentile",
               "--help"]
    token = st.one_of(st.sampled_from(options), st.sampled_from(paths), st.sampled_from(NUMBERS),
                      st.sampled_from(["auto", "cpu", "cuda", "gpu"]), st.sampled_from(JUNK), st.text(max_size=6))
    return st.tuples(st.sampled_from(["score", "info", "sample", "calibrate", "nope", "--version"]), st.lists(token, max_size=8))


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))  # each run loads the model: ~0.1 s
@given(data=st.data())
def test_aae_run_never_raises(world, runner, data):
    root, model, imgs, paths = world
    command, args = data.draw(run_args(paths))
    # Half the runs get a real model and images, so that the commands get past argument checks.
    if data.draw(st.booleans(), label="with model"):
        args = ["--model", str(model), *([str(imgs)] if command in ("score", "calibrate") else []), "--device", "cpu", *args]
    result = runner.invoke(run_app, [command, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"aae-run {command} {args!r} raised {result.exception!r}") from result.exception
    assert result.exit_code in (0, 1, 2), (command, args, result.exit_code, result.output[-2000:])
    assert "Traceback" not in result.output


def parse_only(app: typer.Typer, prog: str, args: list[str]) -> None:
    """Parse and validate ``args`` as the command would, without running it."""
    cmd = typer.main.get_command(app)
    try:
        if hasattr(cmd, "commands"):
            if args and args[0] in cmd.commands:
                cmd.commands[args[0]].make_context(args[0], args[1:], parent=Context(cmd, info_name=prog))
            else:
                cmd.make_context(prog, list(args))
        else:
            cmd.make_context(prog, list(args))
    except ClickException as exc:
        message = exc.format_message()
        assert message and "Traceback" not in message
        if getattr(exc, "param", None) is not None:  # errors about a value name the option
            names = {*exc.param.opts, *exc.param.secondary_opts, exc.param.name or ""}
            assert any(n and n in message for n in names) or exc.param.param_type_name == "argument" or \
                hasattr(exc, "param_hint"), message
    except typer.Exit:
        pass  # --help, --version


TRAIN_OPTIONS = ["--data-dir", "--out", "--epochs", "--batch-size", "--latent-dim", "--arch", "--hidden", "--dropout", "--prior",
                 "--prior-std", "--posterior", "--lr-recon", "--lr-disc", "--lr-gen", "--recon-loss", "--classes", "--limit",
                 "--val-fraction", "--seed", "--device", "--resume", "--threads", "--color", "--size", "--resample", "--help"]
EXPORT_OPTIONS = ["--checkpoint", "--out", "--data-dir", "--score", "--percentile", "--anomalies", "--fused", "--no-fused",
                  "--quantize", "--precision", "--help"]
BENCH_OPTIONS = ["--model", "--out-dir", "--batch-sizes", "--device", "--rounds", "--slice", "--cold-start-runs",
                 "--folder-images", "--sweep", "--help"]
CHOICES = ["auto", "cpu", "cuda", "mlp", "conv", "gaussian", "mog", "uniform", "swissroll", "deterministic", "universal",
           "bce", "mse", "int8", "fp16", "fp32", "L", "RGB", "bilinear", "0,3", "1,2,3", "10", "28,28"]


def args_from(options: list[str], paths: list[str]):
    token = st.one_of(st.sampled_from(options), st.sampled_from(NUMBERS), st.sampled_from(CHOICES), st.sampled_from(paths),
                      st.sampled_from(JUNK), st.text(max_size=6))
    return st.lists(token, max_size=10)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # --help tokens render Rich help: slow-ish
@given(data=st.data())
def test_aae_train_arguments(world, data):
    from aae_train.cli import app

    command = data.draw(st.sampled_from(["mnist", "folder", "demo-images", "nope"]))
    parse_only(app, "aae-train", [command, *data.draw(args_from(TRAIN_OPTIONS, world[3]))])


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # --help tokens render Rich help: slow-ish
@given(data=st.data())
def test_aae_export_arguments(world, data):
    from export.cli import app

    parse_only(app, "aae-export", data.draw(args_from(EXPORT_OPTIONS, world[3])))


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # --help tokens render Rich help: slow-ish
@given(data=st.data())
def test_aae_run_bench_arguments(world, data):
    parse_only(run_app, "aae-run", ["bench", *data.draw(args_from(BENCH_OPTIONS, world[3]))])


@pytest.mark.parametrize("args, option", [
    (["score", "x.png", "--model", "m", "--device", "gpu"], "--device"),
    (["score", "x.png", "--model", "m", "--batch-size", "0"], "--batch-size"),
    (["score", "x.png", "--model", "m", "--threshold", "nan"], "--threshold"),
    (["score", "x.png", "--model", "m", "--output", "rows.txt"], "--output"),
    (["score", "x.png", "--model", "m", "--threshold-percentile", "101"], "--threshold-percentile"),
    (["score", "x.png", "--model", "m", "--threshold-percentile", "nan"], "--threshold-percentile"),
    (["calibrate", "x", "--model", "m", "--percentile", "nan"], "--percentile"),
    (["sample", "--model", "m", "-n", "0"], "-n"),
    (["sample", "--model", "m", "--out", "s.gif"], "--out"),
    (["info"], "--model"),
])
def test_usage_errors_name_the_argument_and_exit_2(runner, args, option):
    result = runner.invoke(run_app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert option in result.output, result.output


@pytest.mark.parametrize("args, option", [
    (["mnist", "--device", "gpu"], "--device"),
    (["mnist", "--epochs", "0"], "--epochs"),
    (["mnist", "--lr-recon", "-1"], "--lr-recon"),
    (["mnist", "--lr-gen", "1e9"], "--lr-gen"),
    (["mnist", "--val-fraction", "0.95"], "--val-fraction"),
    (["mnist", "--resume", "/no/such/checkpoint.pt"], "--resume"),
    (["mnist", "--batch-size", "1"], "--batch-size"),
    (["mnist", "--lr-recon", "nan"], "--lr-recon"),
    (["mnist", "--val-fraction", "nan"], "--val-fraction"),
    (["mnist", "--code-noise", "nan"], "--code-noise"),
    (["mnist", "--gradient-penalty", "nan"], "--gradient-penalty"),
    (["mnist", "--disc-noise", "inf"], "--disc-noise"),
    (["mnist", "--out", ""], "--out"),
    (["mnist", "--prior", "uniform", "--uniform-low", "5", "--uniform-high", "1"], "--prior"),
    (["folder", ".", "--family", "semi", "--labels", "2", "--unlabelled-dir", "../x"], "--unlabelled-dir"),
])
def test_aae_train_usage_errors_name_the_argument(runner, args, option):
    from aae_train.cli import app

    result = runner.invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert option in result.output, result.output
