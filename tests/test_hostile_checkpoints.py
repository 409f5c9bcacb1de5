"""Checkpoints under attack and under faults: no code runs, no work is lost, no broken model saved.

- crafted pickles that would run code are refused by `load_checkpoint` and by `aae-export`;
- damaged checkpoints fail in one line;
- writes are atomic (temporary file + rename);
- a real `aae-train` run killed with SIGKILL mid-epoch resumes from its last checkpoint;
- a run whose weights diverge (absurd learning rates) stops with a clear message, saving nothing.

The subprocesses (each pays for importing torch) run concurrently, started by one fixture.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aae_runtime.contract.fileio import atomic_write, atomic_write_bytes, remove_stale_temporaries
from aae_train.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint

TIMEOUT = 240
KILLED_RUN_EPOCHS = 200
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # 2 shared cores: no thread oversubscription


class RunsCode:
    """Unpickling this calls os.system: the marker file appears if any loader unpickles unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoints(root: Path, marker: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": RunsCode(marker), "epoch": 1}
    files = {"torch zip": root / "zip.pt", "raw pickle p2": root / "raw2.pt", "raw pickle p5": root / "raw5.pt"}
    torch.save(payload, files["torch zip"])  # saving only records (os.system, args): nothing runs here
    files["raw pickle p2"].write_bytes(pickle.dumps(payload, protocol=2))
    files["raw pickle p5"].write_bytes(pickle.dumps(payload, protocol=5))
    return files


def train_cmd(out: Path, mnist_dir: Path, *extra: str) -> list[str]:
    return ["aae-train", "mnist", "--data-dir", str(mnist_dir), "--out", str(out), "--device", "cpu", "--limit", "600",
            "--hidden", "16", "--latent-dim", "2", "--batch-size", "20", "--seed", "0", *extra]


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_dir):
    """Start every subprocess at once; tests pick up their results."""
    root = tmp_path_factory.mktemp("ckpt")
    marker = root / "CODE_RAN"
    evil = crafted_checkpoints(root / "evil", marker)
    procs = {}
    for name, path in list(evil.items())[:1]:  # the loader test covers all three; each export pays for torch
        procs[f"export {name}"] = subprocess.Popen(
            ["aae-export", "--checkpoint", str(path), "--out", str(root / f"out-{path.stem}")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    procs["diverge"] = subprocess.Popen(
        train_cmd(root / "diverge", mnist_dir, "--epochs", "3", "--lr-recon", "1e6", "--lr-disc", "1e6", "--lr-gen", "1e6"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    killed = kill_mid_epoch(root / "killed", mnist_dir)
    results = {name: (p.communicate(timeout=TIMEOUT), p.returncode) for name, p in procs.items()}
    return {"root": root, "marker": marker, "evil": evil, "results": results, "killed": killed}


def kill_mid_epoch(run_dir: Path, mnist_dir: Path) -> dict:
    """Ask for far more epochs than it will reach; SIGKILL the process once the first checkpoint
    exists and it trains on (an epoch of this tiny run takes a fraction of a second)."""
    proc = subprocess.Popen(train_cmd(run_dir, mnist_dir, "--epochs", str(KILLED_RUN_EPOCHS)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + TIMEOUT
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # well into the next epoch (one epoch here takes seconds)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    return {"alive_when_killed": alive, "returncode": proc.returncode, "stderr": stderr, "run_dir": run_dir}


# -- crafted pickles ------------------------------------------------------------------------------
def test_crafted_pickles_are_refused_by_the_loader(runs):
    for name, path in runs["evil"].items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert "refused" in str(info.value) and "\n" not in str(info.value), name
    assert not runs["marker"].exists()


@pytest.mark.parametrize("name", ["torch zip"])
def test_crafted_pickles_are_refused_by_aae_export(runs, name):
    (out, err), code = runs["results"][f"export {name}"]
    assert code == 2 and "Traceback" not in err, err
    line = one_error_line(err)
    assert "was refused" in line, line
    assert not runs["marker"].exists()
    assert not (runs["root"] / f"out-{runs['evil'][name].stem}").exists()  # nothing written, not even the folder


def test_the_refusal_names_what_would_have_run(runs):
    with pytest.raises(CheckpointError, match="system"):  # posix.system / nt.system
        load_checkpoint(runs["evil"]["torch zip"])


# -- damaged checkpoints --------------------------------------------------------------------------
def test_damaged_checkpoints_fail_in_one_line(runs, tmp_path):
    good = runs["killed"]["run_dir"] / "checkpoint.pt"
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "first bytes only": data[:100],
        "empty": b"",
        "text": b"this is not a checkpoint\n",
        "zip of nothing": b"PK\x05\x06" + b"\0" * 18,
    }
    for name, content in cases.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "epoch": "1"}, tmp_path / "keys.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for path in sorted(tmp_path.glob("*.pt")):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value) and len(str(info.value)) < 400, (path.name, str(info.value))
    with pytest.raises(CheckpointError, match="upgrade aae"):
        load_checkpoint(tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


# -- atomic writes --------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = atomic_write_bytes(tmp_path / "checkpoint.pt", b"previous")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_save_checkpoint_failing_mid_write_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint({"config": {}, "epoch": 1, "encoder": {}, "decoder": {}}, tmp_path / "checkpoint.pt")
    broken = {"config": {}, "epoch": 2, "encoder": {"w": torch.zeros(1000)}, "decoder": {"f": lambda x: x}}
    with pytest.raises((pickle.PicklingError, AttributeError)):  # torch.save cannot pickle the lambda, after writing the tensor
        save_checkpoint(broken, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_only_the_temporaries_of_the_named_targets_are_removed(tmp_path):
    stale = [tmp_path / ".checkpoint.pt.x1y2.tmp", tmp_path / ".checkpoint.pt.z3.tmp"]
    kept = [tmp_path / "checkpoint.pt", tmp_path / ".notes.txt.ab.tmp", tmp_path / "user.tmp",
            tmp_path / ".checkpoint.pt.keep"]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = remove_stale_temporaries([tmp_path / "checkpoint.pt", tmp_path / "missing-dir" / "config.json"])
    assert sorted(removed) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


A_KILLED_WRITER = """
import sys, time
from aae_runtime.contract.fileio import atomic_write
def slow(f):
    f.write(b"new" * 1000); f.flush()
    print("writing", flush=True)
    time.sleep(60)
atomic_write(sys.argv[1], slow)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path):
    target = atomic_write_bytes(tmp_path / "checkpoint.pt", b"previous")
    proc = subprocess.Popen([sys.executable, "-c", A_KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.read_bytes() == b"previous"


# -- SIGKILL and resume ---------------------------------------------------------------------------
def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint(runs, mnist_dir):
    killed = runs["killed"]
    run_dir = killed["run_dir"]
    assert killed["alive_when_killed"] and killed["returncode"] == -signal.SIGKILL
    state = load_checkpoint(run_dir / "checkpoint.pt")  # intact, though the process died mid-run
    done = state["epoch"]
    assert 1 <= done < KILLED_RUN_EPOCHS
    before = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(before) >= done  # the metrics of every checkpointed epoch are on disk
    target = done + 1
    # What a kill during a write leaves (the kill above may have left one too): an empty and a
    # half-written temporary beside the checkpoint, one beside a plot.
    (run_dir / ".checkpoint.pt.killed1.tmp").write_bytes(b"")
    (run_dir / ".checkpoint.pt.killed2.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    (run_dir / ".samples.png.killed3.tmp").write_bytes(b"\x89PNG")
    r = subprocess.run(train_cmd(run_dir, mnist_dir, "--epochs", str(target), "--resume", str(run_dir / "checkpoint.pt")),
                       capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    final = load_checkpoint(run_dir / "checkpoint.pt")
    assert final["epoch"] == target
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == list(range(1, target + 1))
    assert history[:done] == before[:done]  # only the work after the checkpoint was redone
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # the resumed run cleared them


# -- divergence -----------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_a_clear_message_and_saves_nothing(runs):
    (out, err), code = runs["results"]["diverge"]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    line = one_error_line(err)
    assert "NaN or infinite" in line and "lower the learning rates" in line, line
    assert not (runs["root"] / "diverge" / "checkpoint.pt").exists()
