"""How the step runs (aae_train.speed): bfloat16 autocast with float32 losses (--precision bf16),
torch.compile (--compile), and the device benchmark that measures them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aae_runtime.contract.priors import make_prior_spec
from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from aae_train.families import get_family
from aae_train.models import build_models
from aae_train.speed import compile_networks, step_context
from aae_train.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_device  # noqa: E402
import train_floor  # noqa: E402


def _cfg(mnist_dir, family: str = "aae", **train_options) -> RunConfig:
    return RunConfig(model=ModelConfig(latent_dim=4, hidden=48, prior=make_prior_spec("gaussian", 4, std=1.0)),
                     data=DataConfig(source="mnist", path=str(mnist_dir), limit=600),
                     train=TrainConfig(epochs=1, batch_size=50, device="cpu", seed=0, **train_options), family=family)


def _figures(result) -> dict:
    return {k: v for k, v in result.metrics[-1].items() if isinstance(v, float) and k != "seconds"}


@pytest.mark.parametrize("loss", ["bce", "mse", "ssim"])
def test_reconstruction_loss_is_float32_under_bf16_autocast(loss, mnist_dir):
    cfg = _cfg(mnist_dir, recon_loss=loss)
    enc, dec, disc = build_models(cfg.model)
    family = get_family("aae")(cfg, {"encoder": enc, "decoder": dec, "discriminator": disc}, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=g)
    recon = torch.rand(4, 1, 28, 28, generator=g).clamp(0.01, 0.99).bfloat16()
    with step_context(torch.device("cpu"), "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on
        got = family.recon_loss(recon, x)
    want = family.recon_loss(recon.float(), x)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_bf16_precision_trains_near_fp32_and_is_kept_in_the_config(tmp_path, mnist_dir):
    fp32 = train(_cfg(mnist_dir), tmp_path / "fp32")
    bf16 = train(_cfg(mnist_dir, precision="bf16"), tmp_path / "bf16")
    a, b = _figures(fp32), _figures(bf16)
    assert all(math.isfinite(v) for v in b.values())
    assert a["val_recon_loss"] != b["val_recon_loss"]  # the passes really ran in bfloat16
    assert abs(a["val_recon_loss"] - b["val_recon_loss"]) < 0.05 * a["val_recon_loss"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["train"]["precision"] == "bf16"


def test_compiled_networks_train_as_eager_ones_and_keep_their_state_dicts(tmp_path, mnist_dir):
    eager = train(_cfg(mnist_dir, family="semi"), tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(_cfg(mnist_dir, family="semi"), tmp_path / "compiled", compile_mode="default")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4  # encoder, decoder, both discriminators
    assert not any("recompile_limit" in str(k) for k in torch._dynamo.utils.counters["recompiles"])
    a, b = _figures(eager), _figures(compiled)
    assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=2e-3, abs_tol=1e-4) for k in a), (a, b)
    keys = lambda path: set(torch.load(path, weights_only=True)["encoder"])  # noqa: E731
    assert keys(compiled.checkpoint) == keys(eager.checkpoint)


def test_compile_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="choose one of off, default"):
        compile_networks({}, "fastest")


@pytest.mark.parametrize("option,value,allowed", [("--precision", "fp16", "fp32, bf16"), ("--compile", "fast", "off, default")])
def test_unknown_speed_options_are_one_line_errors(option, value, allowed, tmp_path):
    r = subprocess.run(["aae-train", "mnist", option, value, "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and option in r.stderr and allowed in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", [["--device", "cpu"], ["--nproc", "2"], ["--device", "auto"]])  # auto: this machine has no GPU
def test_cuda_graph_steps_need_a_gpu_and_one_process(where, tmp_path, mnist_dir):
    """--compile cuda-graph captures the step on a GPU (aae_train.cudagraph): elsewhere a one-line error, nothing written
    (before torchrun starts processes, and before data is read where the command line says enough)."""
    r = subprocess.run(["aae-train", "mnist", "--compile", "cuda-graph", *where, "--limit", "300", "--epochs", "1",
                        "--threads", "1", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(errors) == 1 and "cuda-graph captures the step on one GPU" in errors[0], r.stderr
    assert "--device cuda" in errors[0] and "one process" in errors[0]
    assert not (tmp_path / "r").exists()


def test_resume_with_another_precision_is_refused(tiny_run, tmp_path, mnist_dir):
    r = subprocess.run(["aae-train", "mnist", "--resume", str(tiny_run.checkpoint), "--out", str(tmp_path / "r"), "--epochs", "5",
                        "--precision", "bf16", "--threads", "1", "--data-dir", str(mnist_dir)], capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(errors) == 1 and "--precision bf16 (checkpoint: fp32)" in errors[0], r.stderr


def test_device_benchmark_runs_its_grid_on_the_cpu_and_skips_finished_cases(tmp_path, mnist_dir):
    argv = ["--data-dir", str(mnist_dir), "--device", "cpu", "--limit", "400", "--epochs", "2", "--precisions", "fp32",
            "--compile", "off", "--batch-sizes", "200", "--work-dir", str(tmp_path / "runs"), "--results", str(tmp_path)]
    assert train_device.main(argv) == 0
    report = json.loads((tmp_path / "train_device_cpu.json").read_text())
    assert [(c["batch_size"], len(c["epoch_seconds"])) for c in report["cases"]] == [(100, 2), (200, 2)]
    assert report["fastest_at_100"]["compile"] == "off" and "| fp32 | off | 200 |" in (tmp_path / "train_device_cpu.md").read_text()
    stamp = (tmp_path / "runs" / "fp32-off-100" / "checkpoint.pt").stat().st_mtime
    assert train_device.main(argv) == 0
    assert (tmp_path / "runs" / "fp32-off-100" / "checkpoint.pt").stat().st_mtime == stamp  # finished: not trained again


def test_floor_benchmark_takes_thread_counts_in_turn_and_compares_the_fastest_epoch_with_the_lowest_floor(
        tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")  # the script sets it for its process: undone after the test
    threads = torch.get_num_threads()
    try:
        train_floor.main(["--data-dir", str(mnist_dir), "--limit", "1200", "--threads", "1,2", "--out", str(tmp_path / "floor")])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "floor.json").read_text())
    rows = report["epochs"]
    assert [r["threads"] for r in rows] == [1, 2, 1, 2, 1, 2]  # the first of seven epochs warms up
    for r in rows:  # the seconds are rounded to 0.01 s, the ratio is of the unrounded ones: within what rounding moves
        slack = 0.005 / r["epoch_s"] + 0.005 / r["floor_s"] + 0.002
        assert r["floor_s"] > 0 and r["ratio"] == pytest.approx(r["epoch_s"] / r["floor_s"], rel=slack), r
    counts, machine = report["by_threads"], report["best"]
    assert set(counts) == {"1", "2"} and all(c["epochs"] == 3 for c in counts.values())
    assert machine["epoch_s"] == min(c["epoch_s"] for c in counts.values())
    assert machine["floor_s"] == min(c["floor_s"] for c in counts.values())
    text = (tmp_path / "floor.md").read_text()
    assert "| 2 | 3 |" in text and f"Machine: {report['machine']} (" in text


def test_floor_benchmark_refuses_bad_thread_counts(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_floor.main(["--data-dir", ".", "--threads", "1,1"])
    assert exit_.value.code == 2 and "distinct thread counts" in capsys.readouterr().err
