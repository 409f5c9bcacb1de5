"""A run folder is one run's: two trainings never write into one at once, --overwrite keeps the
old run until the new one has a checkpoint, and a stop before the first checkpoint (Ctrl-C,
SIGTERM) leaves what was there before, through the real `aae-train` command."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

SLOW = ["--hidden", "1000", "--limit", "30000", "--epochs", "1"]  # an epoch of many seconds on one thread


def train(mnist_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--threads", "1", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def until_training(run: subprocess.Popen) -> None:
    """Read the run's stderr up to its 'training on' line (the folder is locked and prepared by then)."""
    for line in run.stderr:
        if line.startswith("training on"):
            return
    raise AssertionError("the run ended before training began")


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, mnist_dir) -> Path:
    out = tmp_path_factory.mktemp("old") / "not yet" / "run"
    r = train(mnist_dir, out, "--hidden", "32", "--limit", "500", "--epochs", "1")
    assert r.wait(timeout=300) == 0, r.stderr.read()
    assert f"created folder {out.parent} for --out\n" in r.stderr.read()  # the folder above it was missing: said, as --output's
    return out


def test_a_second_training_into_a_folder_in_use_is_refused_in_one_line(mnist_dir, tmp_path):
    run_dir = tmp_path / "made" / "for it" / "run"  # two folders above it made for --out: removed with it
    first = train(mnist_dir, run_dir, *SLOW)
    until_training(first)
    second = subprocess.run(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--threads", "1", "--out",
                             str(run_dir), "--hidden", "32", "--limit", "500", "--epochs", "1", "--overwrite"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "in use by another training" in second.stderr, second.stderr
    assert second.stderr.count("error:") == 1 and "Traceback" not in second.stderr
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and f"nothing saved ({tmp_path / 'made'} removed)" in err, err
    assert list(tmp_path.iterdir()) == [], err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_overwrite_stopped_before_its_first_checkpoint_leaves_the_old_run(mnist_dir, tmp_path, old_run, sig, code):
    run_dir = tmp_path / "run"
    shutil.copytree(old_run, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    r = train(mnist_dir, run_dir, *SLOW, "--overwrite")
    until_training(r)
    r.send_signal(sig)
    _, err = r.communicate(timeout=120)
    assert r.returncode == code and "holds the run it held before" in err, err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before and not (run_dir / ".replaced").exists()


def test_an_out_that_is_a_file_or_under_one_is_one_line(mnist_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        r = subprocess.run(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--threads", "1", "--out", str(out),
                            "--hidden", "32", "--limit", "500", "--epochs", "1"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "a file is in the way" in r.stderr and "internal" not in r.stderr, r.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_an_overwrite_killed_outright_gives_the_old_run_back_to_the_next_start(mnist_dir, tmp_path, old_run):
    run_dir = tmp_path / "run"
    shutil.copytree(old_run, run_dir)
    before = (run_dir / "checkpoint.pt").read_bytes()
    r = train(mnist_dir, run_dir, *SLOW, "--overwrite")
    until_training(r)
    r.kill()  # SIGKILL: no handler runs; the old run waits in .replaced/
    r.wait(timeout=60)
    again = subprocess.run(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--threads", "1", "--out", str(run_dir),
                            "--hidden", "32", "--limit", "500", "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == before and not (run_dir / ".replaced").exists()


def test_a_file_system_without_locks_trains_unlocked(monkeypatch, tmp_path):
    import errno
    import fcntl

    from aae_runtime.contract.modelfolder import writer_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with writer_lock(tmp_path, 0):  # as on Windows: writers are not serialised, nothing fails
        pass


def test_runs_and_exported_models_never_share_a_folder(mnist_dir, tmp_path, old_run, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    for extra in ((), ("--overwrite",)):  # a run never goes into a model's folder, --overwrite or not
        r = subprocess.run(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--threads", "1", "--out", str(model),
                            "--hidden", "32", "--limit", "500", "--epochs", "1", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "holds an exported model, not a run" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before
    run_files = sorted(p.name for p in old_run.iterdir())
    for extra in ((), ("--overwrite",)):  # nor a model into a run's
        r = subprocess.run(["aae-export", "--checkpoint", str(old_run / "checkpoint.pt"), "--out", str(old_run), *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "holds a training run (checkpoint.pt" in r.stderr and f"--out {old_run / 'model'}" in r.stderr, r.stderr
    assert sorted(p.name for p in old_run.iterdir()) == run_files

    from aae_train.train import TrainingError, check_run_folder
    mixed = tmp_path / "mixed"  # a model exported into its run's folder before runs and models were kept apart
    shutil.copytree(old_run, mixed)
    for name in ("MODEL.json", "versions"):
        (shutil.copytree if (model / name).is_dir() else shutil.copy)(model / name, mixed / name)
    with pytest.raises(TrainingError, match=f"move its MODEL.json and versions/ into a folder of their own .*{mixed / 'model'}"):
        check_run_folder(mixed, mixed / "checkpoint.pt", overwrite=False)
    with pytest.raises(TrainingError, match="that is an exported model, not a training run"):  # --resume MODEL
        check_run_folder(model, model, overwrite=False)
    from aae_train.checkpoint import CheckpointError, load_checkpoint
    with pytest.raises(CheckpointError, match="is an exported model, not a training run: pass the checkpoint.pt"):
        load_checkpoint(model)  # aae-export --checkpoint MODEL


def test_a_run_written_into_the_folder_while_this_one_loaded_its_data_is_not_replaced(mnist_dir, tmp_path, tiny_run, monkeypatch):
    """Two trainings into one new --out: the folder is checked again once its lock is held, so
    the slower one is refused instead of silently replacing the run that finished first."""
    from aae_runtime.contract.priors import make_prior_spec
    from aae_train import train as training
    from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    out = tmp_path / "shared"
    loaded = training.load_dataset

    def meanwhile(*args, **kwargs):  # the other training finishes while this one loads its data
        data = loaded(*args, **kwargs)
        out.mkdir(exist_ok=True)
        shutil.copy(tiny_run.checkpoint, out / "checkpoint.pt")
        return data

    monkeypatch.setattr(training, "load_dataset", meanwhile)
    cfg = RunConfig(model=ModelConfig(latent_dim=4, hidden=32, prior=make_prior_spec("gaussian", 4, std=1.0)),
                    data=DataConfig(source="mnist", path=str(mnist_dir), limit=300, val_fraction=0.2),
                    train=TrainConfig(epochs=1, batch_size=50, seed=0, device="cpu"))
    other = (out / "checkpoint.pt")
    with pytest.raises(training.TrainingError, match="now holds a run that another training wrote"):
        training.train(cfg, out)
    assert other.read_bytes() == Path(tiny_run.checkpoint).read_bytes()


def test_a_run_folder_inside_the_training_images_is_refused(tmp_path):
    from tests.conftest import write_png

    for i in range(4):
        write_png(tmp_path / "parts" / f"{i}.png", np.full((16, 16), 40 * i, np.uint8))
    r = subprocess.run(["aae-train", "folder", str(tmp_path / "parts"), "--size", "16", "--epochs", "1", "--threads", "1",
                        "--out", str(tmp_path / "parts" / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "would be read as training images" in r.stderr, r.stderr
    assert not (tmp_path / "parts" / "run").exists()


def test_sighup_stops_a_run_as_sigterm_does_unless_nohup_ignores_it(mnist_dir, tmp_path):
    """A closed terminal's SIGHUP: the run stops with its line and tidies up (exit 129); under
    nohup (SIGHUP ignored) it trains on, as it always did."""
    run = train(mnist_dir, tmp_path / "hup", *SLOW)
    until_training(run)
    run.send_signal(signal.SIGHUP)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 129 and "interrupted before the first epoch ended: nothing saved" in err, err
    assert not (tmp_path / "hup").exists()

    def ignore_hup():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    run = subprocess.Popen(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--threads", "1", "--out",
                            str(tmp_path / "nohup"), "--hidden", "256", "--limit", "3000", "--epochs", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_hup)
    until_training(run)
    run.send_signal(signal.SIGHUP)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0 and (tmp_path / "nohup" / "checkpoint.pt").is_file(), err
