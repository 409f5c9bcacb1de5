"""Data-parallel training through the real torchrun (gloo on the CPU): 2 processes, and 2 "nodes"
on loopback, against a single process with the same global minibatch."""

from __future__ import annotations

import json
import signal
import time
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TOLERANCE = 0.03  # relative, on the last epoch's losses: the ranks' prior draws differ from one process's


def common(mnist_dir, family: str) -> list[str]:
    extra = ["--labels", "50"] if family == "semi" else []
    return ["mnist", "--data-dir", str(mnist_dir), "--epochs", "2", "--limit", "800", "--hidden", "48", "--batch-size", "40",
            "--threads", "1", "--family", family, *extra]


def last(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def torchrun(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def single(mnist_dir, family: str, out: Path) -> dict:
    r = subprocess.run(["aae-train", *common(mnist_dir, family), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return last(out)


def close(a: dict, b: dict, keys=("recon_loss", "val_recon_loss")) -> None:
    for k in keys:
        assert abs(a[k] - b[k]) <= TOLERANCE * abs(b[k]), (k, a[k], b[k])


@pytest.mark.parametrize("family", ["aae", "semi"])
def test_two_processes_train_like_one_with_the_same_global_batch(mnist_dir, tmp_path, family):
    ref = single(mnist_dir, family, tmp_path / "one")
    r = torchrun("--standalone", "--nproc-per-node", "2", "--log-dir", str(tmp_path / "logs"), "-m", "aae_train", *common(mnist_dir, family), "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-2000:]
    got = last(tmp_path / "two")
    close(got, ref)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone writes
    assert (tmp_path / "two" / "checkpoint.pt").is_file() and (tmp_path / "two" / "samples.png").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_and_a_checkpoint_of_two_resumes_on_one(mnist_dir, tmp_path):
    ref = single(mnist_dir, "aae", tmp_path / "one")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", "aae-test", "--log-dir", str(tmp_path / f"logs{k}"), "-m", "aae_train", *common(mnist_dir, "aae"), "--out", str(tmp_path / "nodes")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for k in (0, 1)]
    results = [(n.wait(timeout=300), n.stderr.read()) for n in nodes]
    assert all(code == 0 for code, _ in results), [e[-1500:] for _, e in results]
    close(last(tmp_path / "nodes"), ref)
    r = subprocess.run(["aae-train", "mnist", "--resume", str(tmp_path / "nodes" / "checkpoint.pt"), "--epochs", "3",
                        "--threads", "1", "--data-dir", str(mnist_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert last(tmp_path / "nodes")["epoch"] == 3


def test_nproc_wraps_torchrun_and_an_uneven_batch_is_refused(mnist_dir, tmp_path):
    scratch = tmp_path / "tmp"  # the system's temporary folder for this run
    scratch.mkdir()
    r = subprocess.run(["aae-train", *common(mnist_dir, "aae"), "--out", str(tmp_path / "w"), "--nproc", "2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert last(tmp_path / "w")["epoch"] == 2
    # torchrun's own log folder (torchelastic_*, one a run) is removed; torch's compile cache (torchinductor_USER) is shared
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    args = common(mnist_dir, "aae")
    args[args.index("--batch-size") + 1] = "41"
    r = subprocess.run(["aae-train", *args, "--out", str(tmp_path / "odd"), "--nproc", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not split evenly over 2 processes" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run(["aae-train", *common(mnist_dir, "aae"), "--out", str(tmp_path / "w"), "--nproc", "2"],
                       capture_output=True, text=True, timeout=300)  # the ranks refuse a folder holding a run
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "ChildFailedError" not in r.stderr and "torch/distributed" not in r.stderr  # nor torchrun's log lines
    assert r.stderr.count("already holds a run") == 1, r.stderr  # both ranks refuse it; the user reads it once
    r = torchrun("--standalone", "--nproc-per-node", "2", "--log-dir", str(tmp_path / "logs"), "-m", "aae_train", *args, "--out", str(tmp_path / "odd"))
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: --batch-size 41")]
    assert r.returncode != 0 and ours and not (tmp_path / "odd").exists()  # torchrun adds its own report after our line


def test_nproc_an_error_of_rank_0_alone_is_one_line_and_too_few_images_are_refused(mnist_dir, tmp_path):
    # rank 0 alone creates the run folder: the other rank only sees its peer go, which is no bug of its own
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = subprocess.run(["aae-train", *common(mnist_dir, "aae"), "--out", str(blocker / "run"), "--nproc", "2"],
                       capture_output=True, text=True, timeout=300, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "a file is in the way" in lines[0], r.stderr[-2000:]
    args = common(mnist_dir, "aae")
    args[args.index("--limit") + 1] = "2"  # one training image, one held out
    r = subprocess.run(["aae-train", *args, "--out", str(tmp_path / "few"), "--nproc", "2"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: a minibatch of 1 training image cannot be shared by 2 processes (each needs at least one): use fewer "
        "processes, or more images"], r.stderr[-2000:]
    assert not (tmp_path / "few").exists()


def test_the_launcher_prints_only_the_rank_errors_that_say_something_new(tmp_path, capsys):
    from aae_train.cli import _print_other_ranks_errors, _rank_lines

    for rank, line in ((0, "no images under x"), (1, "no images under x"), (2, "cuda:2 is not available"), (3, "cuda:2 is not available")):
        (tmp_path / f"rank{rank}.txt").write_text(line)
    _print_other_ranks_errors(_rank_lines(tmp_path))
    assert capsys.readouterr().err.splitlines() == ["error: rank 2: cuda:2 is not available"]
    # a rank that only lost its peers is not news when another rank said why; alone, it is
    from aae_train.cli import PEER_LOST

    (tmp_path / "rank4.txt").write_text(f"{PEER_LOST} (Connection closed by peer)")
    _print_other_ranks_errors(_rank_lines(tmp_path))
    assert capsys.readouterr().err.splitlines() == ["error: rank 2: cuda:2 is not available"]
    for rank in (0, 1, 2, 3):
        (tmp_path / f"rank{rank}.txt").unlink()
    _print_other_ranks_errors(_rank_lines(tmp_path))
    assert capsys.readouterr().err.splitlines() == [f"error: rank 4: {PEER_LOST} (Connection closed by peer)"]


def test_only_a_peer_that_went_away_counts_as_a_lost_peer(monkeypatch):
    from aae_train.cli import _lost_peer

    monkeypatch.delenv("AAE_DEBUG", raising=False)
    assert _lost_peer(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:46476"))
    assert _lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection reset by peer"))
    # this process's own failures stay bugs (or their own errors): a rendezvous, a timeout, another type
    assert not _lost_peer(RuntimeError("The server socket has failed to listen on any local network address (port in use)"))
    assert not _lost_peer(RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation to complete"))
    assert not _lost_peer(ValueError("Connection closed by peer"))
    monkeypatch.setenv("AAE_DEBUG", "1")  # the traceback of anything, as asked
    assert not _lost_peer(RuntimeError("Connection closed by peer"))


def test_uneven_shares_train_as_one_process_and_a_resumed_batch_is_checked_against_its_checkpoint(mnist_dir, tmp_path):
    """Three training images over two processes: shares of 2 and 1, averaged weighted by their
    rows, give what one process gives (the per-epoch figures of every phase). A resumed run keeps
    its checkpoint's batch: 3 does not split over 2, whatever the command line's default says."""
    args = ["mnist", "--data-dir", str(mnist_dir), "--limit", "4", "--val-fraction", "0.25", "--epochs", "2", "--hidden", "32",
            "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # batch 3 alone, 100 on two processes: either way one step of the three images (the minibatch is all of them)
    one = subprocess.run(["aae-train", *args, "--batch-size", "3", "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300)
    two = subprocess.run(["aae-train", *args, "--out", str(tmp_path / "two"), "--nproc", "2"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = last(tmp_path / "one"), last(tmp_path / "two")
    for k in ("recon_loss", "val_recon_loss", "disc_loss", "disc_acc", "gen_loss"):
        assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a[k], b[k])
    r = subprocess.run(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--resume", str(tmp_path / "one" / "checkpoint.pt"),
                        "--epochs", "3", "--threads", "1", "--nproc", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "--batch-size 3 does not split evenly over 2 processes" in r.stderr, r.stderr[-2000:]
    assert "a resumed run keeps its batch size" in r.stderr and r.stderr.count("error:") == 1, r.stderr


def _slow_nproc_run(mnist_dir, out: Path) -> subprocess.Popen:
    run = subprocess.Popen(["aae-train", "mnist", "--data-dir", str(mnist_dir), "--hidden", "1000", "--limit", "30000",
                            "--epochs", "2", "--threads", "1", "--nproc", "2", "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in run.stderr:
        if line.startswith("training on"):
            return run
    raise AssertionError(f"the run ended before training began: {run.wait()}")


def _ranks(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes the launcher started."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(pid)
    return out


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:  # reaped since
            return True
        time.sleep(0.2)
    return False


def test_a_killed_rank_is_named_with_its_signal_and_ranks_stop_when_their_launcher_is_killed(mnist_dir, tmp_path):
    run = _slow_nproc_run(mnist_dir, tmp_path / "rank")
    ranks = _ranks(run.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 137, err  # the signal's code (128 + 9), not 2 (bad input)
    assert err.strip().splitlines()[-1] == "error: rank 1 was killed (SIGKILL): the run stopped; nothing saved", err
    assert "pair.cc" not in err and "Traceback" not in err
    run = _slow_nproc_run(mnist_dir, tmp_path / "launcher")
    ranks = _ranks(run.pid)
    run.kill()  # SIGKILL: the launcher cannot stop them itself
    run.wait(timeout=60)
    assert all(_gone(pid, 30) for pid in ranks.values()), "ranks trained on after their launcher was killed"


@pytest.mark.parametrize("codes,left,code,said", [
    # a rank's internal error (printed by itself), the other lost it, torchrun stopped the first: its own error, 2
    ({0: 2, 1: -15}, {0: "2\nstopped: another process of this run stopped or cannot be reached; nothing saved",
                      1: "2!\ninternal error (ValueError)"}, 2, []),
    ({0: 1, 1: 143}, {}, 1, []),  # rank 0 failed without a line (its output said why); rank 1 stopped after it
    ({0: 143, 1: -15}, {0: "143\ninterrupted while loading the data: nothing written"}, 143, []),  # rank 0 said it
    ({0: 2, 1: -9}, {0: "2\nstopped: another process of this run stopped or cannot be reached; nothing saved"}, 137,
     ["error: rank 1 was killed (SIGKILL): the run stopped; nothing saved"]),
    ({0: -9, 1: 2}, {1: "2\nstopped: another process of this run stopped or cannot be reached"}, 137,
     ["error: rank 0 was killed (SIGKILL): the run stopped; nothing saved"]),
    ({0: 2, 1: 143}, {0: "2\nstopped: another process of this run stopped or cannot be reached; nothing saved"}, 143,
     ["error: rank 1 was stopped by SIGTERM: the run stopped; nothing saved"]),
])
def test_the_launcher_names_the_cause_of_a_failed_run_once(codes, left, code, said, tmp_path, capsys):
    from aae_train.cli import _report_failed_ranks

    for rank, text in left.items():
        (tmp_path / f"rank{rank}.txt").write_text(text)
    assert _report_failed_ranks(codes, tmp_path, tmp_path / "run") == code
    assert capsys.readouterr().err.splitlines() == said


def test_the_rank_folder_of_a_launcher_killed_outright_is_removed_by_the_next(tmp_path):
    from aae_train.cli import RANKS_PREFIX, _remove_orphaned_rank_folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan, alive, other = (tmp_path / f"{RANKS_PREFIX}{dead.pid}-abc", tmp_path / f"{RANKS_PREFIX}{os.getppid()}-def",
                            tmp_path / f"{RANKS_PREFIX}x-ghi")
    for folder in (orphan, alive, other):
        (folder / "torchrun").mkdir(parents=True)
    _remove_orphaned_rank_folders(tmp_path)
    assert not orphan.exists() and alive.exists() and other.exists()
