"""The model folder's layout (aae_runtime.contract.modelfolder): whole-model atomic updates,
serialised writers, writers killed at any instant, readers during writes, the old flat layout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from aae_runtime import AAEModel, ModelError
from aae_runtime.contract import modelfolder
from aae_runtime.contract.modelfolder import POINTER, STAGING_PREFIX, VERSIONS, current_version
from tests.conftest import write_png

# `aae-run calibrate` in a process whose renames announce themselves and wait PAUSE seconds
# first, so that a test can kill it (or start a second writer) at a chosen step.
CALIBRATE = textwrap.dedent("""
    import os, sys, time
    pause, real_replace = float(os.environ.get("PAUSE", "0")), os.replace
    def announced_replace(src, dst):
        print("replace", os.path.basename(str(dst)), flush=True)
        time.sleep(pause)
        real_replace(src, dst)
        print("replaced", os.path.basename(str(dst)), flush=True)
        time.sleep(float(os.environ.get("PAUSE_AFTER", "0")))
    os.replace = announced_replace
    from aae_runtime.cli import app
    app(["calibrate", sys.argv[1], "--model", sys.argv[2], "--percentile", sys.argv[3]], prog_name="aae-run")
""")


@pytest.fixture(scope="module")
def normal(tmp_path_factory, mnist_test) -> Path:
    folder = tmp_path_factory.mktemp("normal")
    for i in range(30):
        write_png(folder / f"{i:02d}.png", mnist_test[0][i])
    return folder


@pytest.fixture()
def model(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def calibrate(normal: Path, model: Path, percentile: float, pause: float = 0.0, pause_after: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CALIBRATE, str(normal), str(model), str(percentile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PAUSE": str(pause), "PAUSE_AFTER": str(pause_after)})


def wait_for(run: subprocess.Popen, line: str) -> None:
    for got in run.stdout:
        if got.strip() == line:
            return
    raise AssertionError(f"the writer ended before printing {line!r}: {run.stderr.read()[-500:]}")


def loads_and_scores(model: Path) -> dict:
    m = AAEModel.load(model, device="cpu")
    m.score(np.zeros((1, *m.input_shape), np.float32))
    return m.metadata.raw


def test_an_export_is_a_pointer_to_one_complete_version(model):
    pointer = json.loads((model / POINTER).read_text())
    version = current_version(model)
    assert pointer["current"] == f"{VERSIONS}/{version.name}" and version.parent == model / VERSIONS
    assert sorted(p.name for p in version.iterdir()) == ["decoder.onnx", "encoder.onnx", "metadata.json", "scorer.onnx"]


def test_two_calibrations_at_once_are_serialised_and_both_succeed(model, normal):
    first = calibrate(normal, model, 90, pause=1.0)
    wait_for(first, "replace " + POINTER)  # the first holds the lock and is about to switch
    second = calibrate(normal, model, 95)
    results = [(r.wait(timeout=300), r.stderr.read()) for r in (first, second)]
    assert all(code == 0 for code, _ in results), results
    assert loads_and_scores(model)["threshold"]["percentile"] == 95  # the second waited, then went last
    versions = sorted(p.name for p in (model / VERSIONS).iterdir())
    assert len(versions) == 2 and versions[-1].startswith("0003-")  # export + 2; oldest pruned
    assert not list(model.glob(STAGING_PREFIX + "*"))


def test_a_calibration_waiting_for_another_writer_says_so_then_goes_on(model, normal):
    with modelfolder.writer_lock(model):  # another writer (this test) holds the folder
        r = subprocess.Popen(["aae-run", "calibrate", str(normal), "--model", str(model), "--percentile", "97"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in r.stderr:  # the lock is only asked for once the images are scored
            if line.startswith(f"waiting for another process writing to {model}"):
                break
        else:
            raise AssertionError(f"calibrate ended without saying it waited: {r.wait()}")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0 and "recalibrated" in out, err
    assert loads_and_scores(model)["threshold"]["percentile"] == 97


# (the line after which the writer is killed, the model the folder then holds)
KILL_POINTS = [("replace " + "VERSION", "old"), ("replaced " + "VERSION", "old"), ("replace " + POINTER, "old"),
               ("replaced " + POINTER, "new")]


@pytest.mark.parametrize("point,expected", KILL_POINTS)
def test_a_calibration_killed_at_each_step_leaves_a_folder_that_loads(model, normal, point, expected):
    before = loads_and_scores(model)["threshold"]
    version = f"{len(list((model / VERSIONS).iterdir())) + 1:04d}-{current_version(model).name.split('-', 1)[1]}"
    run = calibrate(normal, model, 97, pause=0.5)
    wait_for(run, point.replace("VERSION", version))
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    threshold = loads_and_scores(model)["threshold"]
    assert (threshold == before) if expected == "old" else (threshold["percentile"] == 97)
    done = calibrate(normal, model, 99.5)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    assert loads_and_scores(model)["threshold"]["percentile"] == 99.5
    assert not list(model.glob(STAGING_PREFIX + "*"))  # whatever the killed writer left, the next one removed


def test_readers_during_calibrations_see_the_old_model_or_the_new_never_a_mix(model, normal):
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, numpy as np
        from aae_runtime import AAEModel
        end, n = time.time() + 6, 0
        while time.time() < end:
            m = AAEModel.load({str(model)!r}, device="cpu")
            m.score(np.zeros((1, *m.input_shape), np.float32))
            m.sample(1, seed=0)  # the decoder's session is made now, from the version loaded
            n += 1
        print(n)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for p in (91, 92, 93):
        writer = calibrate(normal, model, p)
        assert writer.wait(timeout=300) == 0, writer.stderr.read()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    assert int(out) > 0


def test_the_flat_layout_of_earlier_exports_loads_and_is_converted_by_its_first_update(model, normal, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(current_version(model), flat)
    assert current_version(flat) == flat and loads_and_scores(flat)
    run = calibrate(normal, flat, 90)
    assert run.wait(timeout=300) == 0, run.stderr.read()
    assert (flat / POINTER).exists() and not (flat / "encoder.onnx").exists()
    assert loads_and_scores(flat)["threshold"]["percentile"] == 90


@pytest.mark.parametrize("pointer", ['{"layout": "aae-model-folder", "current": "../../etc"}', "not json",
                                     '{"layout": "aae-model-folder", "current": "versions/0009-gone"}', "x" * 10_000])
def test_a_damaged_pointer_is_one_line(model, pointer):
    (model / POINTER).write_text(pointer)
    with pytest.raises(ModelError) as info:
        AAEModel.load(model, device="cpu")
    assert POINTER in str(info.value) and "\n" not in str(info.value)


def test_a_reader_never_writes(model):
    before = {p: p.stat().st_mtime_ns for p in model.rglob("*")}
    os.chmod(model, 0o555)
    try:
        loads_and_scores(model)
    finally:
        os.chmod(model, 0o755)
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*")} == before


def test_a_calibration_overtaken_by_a_new_export_writes_nothing(model):
    """An export switched the folder while a calibration computed its statistics on the model
    before: those statistics must not be stamped onto the new weights."""
    from aae_runtime.recalibrate import rewrite_metadata

    loaded = current_version(model)
    meta = AAEModel.load(loaded, device="cpu").metadata.raw
    rewrite_metadata(model, dict(meta, export_id="f" * 32))  # what an export does: new graphs, a new export id
    exported = current_version(model)
    calibrated = dict(meta, threshold=dict(meta["threshold"], value=123.0))
    with pytest.raises(ModelError, match="got a new export while this calibration ran"):
        rewrite_metadata(model, calibrated, expected=loaded)
    assert current_version(model) == exported and loads_and_scores(model)["export_id"] == "f" * 32
    assert not list(model.glob(STAGING_PREFIX + "*"))
    rewrite_metadata(model, dict(calibrated, export_id="f" * 32), expected=loaded)  # the same export: last writer wins
    assert loads_and_scores(model)["threshold"]["value"] == 123.0


@pytest.mark.parametrize("point,sig,changed", [("replace VERSION", signal.SIGINT, False),
                                               ("replaced " + POINTER, signal.SIGTERM, True)])
def test_a_stopped_calibration_says_whether_the_model_changed_and_leaves_no_version_the_pointer_never_named(
        model, normal, point, sig, changed):
    before = current_version(model)
    version = f"{int(before.name[:4]) + 1:04d}-{before.name.split('-', 1)[1]}"
    run = calibrate(normal, model, 97, pause=2.0, pause_after=2.0)  # the signal lands in the pause
    wait_for(run, point.replace("VERSION", version))
    run.send_signal(sig)
    _, err = run.communicate(timeout=60)
    assert run.returncode == (130 if sig == signal.SIGINT else 143), err
    now = current_version(model)
    if changed:
        assert f"holds the new calibration ({now.name})" in err and now.name == version, err
        assert loads_and_scores(model)["threshold"]["percentile"] == 97
    else:
        assert "this calibration changed nothing in" in err and now == before, err
        assert sorted(p.name for p in (model / VERSIONS).iterdir()) == [before.name]  # the new one removed


def test_writers_remove_what_a_killed_writer_left_and_keep_the_version_that_was_current(model, normal):
    """A version renamed into versions/ whose writer died before the pointer named it is never
    current: the next writer removes it (and the pointer's temporaries), and keeps the version
    that was current before its own as the previous one."""
    before = current_version(model)
    orphan = model / VERSIONS / f"{int(before.name[:4]) + 1:04d}-killed"
    shutil.copytree(before, orphan)
    (model / f".{POINTER}.abc123.tmp").write_text("{")
    run = calibrate(normal, model, 90)
    assert run.wait(timeout=300) == 0, run.stderr.read()
    now = current_version(model)
    assert sorted(p.name for p in (model / VERSIONS).iterdir()) == [before.name, now.name] and now != before
    assert not list(model.glob(f".{POINTER}.*"))


def test_a_writer_refuses_a_version_folder_given_as_the_model(model, normal):
    """A version holds graphs but no pointer, like a folder of the layout before versions: a
    writer would 'convert' it and delete the current version's graphs."""
    version = current_version(model)
    files = sorted(p.name for p in version.iterdir())
    r = subprocess.run(["aae-run", "calibrate", str(normal), "--model", str(version)], capture_output=True, text=True)
    assert r.returncode == 2 and f"lies inside the versions of the model folder {model}" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and sorted(p.name for p in version.iterdir()) == files
    os.symlink(version, model.parent / "current")  # the same version reached through a link
    r = subprocess.run(["aae-run", "calibrate", str(normal), "--model", str(model.parent / "current")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "lies inside the versions of the model folder" in r.stderr, r.stderr
    assert sorted(p.name for p in version.iterdir()) == files
    from export.onnx_export import check_model_folder  # noqa: F401  (export goes through the same writer)
    from aae_runtime.contract.modelfolder import write_version

    with pytest.raises(ModelError, match="lies inside the versions"):
        with write_version(version / "nested", "x"):
            pass


def test_a_damaged_pointer_names_the_versions_the_folder_holds_and_a_bom_is_read(model):
    version = current_version(model)
    text = (model / POINTER).read_text()
    (model / POINTER).write_bytes(b"\xef\xbb\xbf" + text.encode())  # saved by a Windows editor
    assert current_version(model) == version
    (model / POINTER).write_text('{"layout": "aae-model-folder", "current": "versions/0009-gone"}')
    with pytest.raises(ModelError) as info:
        current_version(model)
    assert f'"current": "versions/{version.name}"' in str(info.value) and "\n" not in str(info.value)


def test_the_lock_file_is_never_followed_as_a_link(model, tmp_path):
    victim = tmp_path / "victim"
    (model / modelfolder.LOCK).unlink(missing_ok=True)
    os.symlink(victim, model / modelfolder.LOCK)
    with pytest.raises(ModelError, match="is a link, not the folder's lock file"):
        with modelfolder.writer_lock(model):
            pass
    assert not victim.exists()


def test_a_full_disk_while_writing_a_version_is_one_line_and_changes_nothing(model, normal):
    """A file-size limit makes the graph writes fail as a full disk does (EFBIG instead of ENOSPC)."""
    import resource

    before = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = subprocess.run(["aae-run", "calibrate", str(normal), "--model", str(model)], capture_output=True, text=True,
                       preexec_fn=limited)
    assert r.returncode == 2 and f"cannot write a new version into {model} (File too large): the model it holds is " \
        "unchanged" in r.stderr and "internal error" not in r.stderr, r.stderr
    assert {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_a_long_running_reader_outlives_the_pruning_of_the_version_it_loaded(model):
    """A watcher or server keeps the model it loaded while writers prune its version: a model
    scored by its two graphs opened both at load; a graph opened later says what happened."""
    two_graphs = AAEModel.load(model, device="cpu", use_scorer=False)
    fused = AAEModel.load(model, device="cpu")
    shutil.rmtree(current_version(model))  # as two later writers would
    x = np.zeros((2, *two_graphs.input_shape), np.float32)
    assert np.isfinite(two_graphs.score(x)).all() and np.isfinite(fused.score(x)).all()
    with pytest.raises(ModelError, match=r"is gone: the model folder was updated since this model was loaded"):
        fused.sample(1, seed=0)


def test_a_new_folder_whose_first_version_cannot_be_written_is_not_left_behind(model, tmp_path):
    """aae-export into a new folder on a full disk left the folder holding only its lock file."""
    import errno

    with pytest.raises(ModelError, match=r"cannot write a new version into .*No space left on device.*unchanged"):
        with modelfolder.write_version(tmp_path / "new", "x") as staging:
            _version_files(model, staging)
            raise OSError(errno.ENOSPC, "No space left on device")  # as a graph's write on a full disk
    assert not (tmp_path / "new").exists()


def test_a_writer_that_waited_on_a_folder_removed_meanwhile_is_told_to_run_again(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / modelfolder.LOCK).touch()
    import fcntl

    fd = os.open(folder / modelfolder.LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    waiter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from aae_runtime.contract.modelfolder import writer_lock
        from aae_runtime import ModelError
        from pathlib import Path
        try:
            with writer_lock(Path({str(folder)!r}), waiting=lambda line: print("waiting", flush=True)):
                print("locked")
        except ModelError as exc:
            print(exc)
    """)], stdout=subprocess.PIPE, text=True)
    assert waiter.stdout.readline().strip() == "waiting"  # it opened the lock file and waits
    (folder / modelfolder.LOCK).unlink()  # as a failed writer that created the folder removes it
    os.close(fd)
    out, _ = waiter.communicate(timeout=60)
    assert "was removed by the writer this one waited for" in out, out


def _version_files(model: Path, staging: Path) -> None:
    for f in current_version(model).iterdir():
        if f.is_file() and f.name in (*modelfolder.GRAPH_NAMES, modelfolder.METADATA_JSON):
            shutil.copy(f, staging / f.name)


def test_without_flock_a_writer_never_removes_another_writers_version(model, monkeypatch):
    """On a file system without flock (some NFS, FUSE) writers are not serialised: one that runs
    while another is between its rename and its switch must not take the other's version for a
    dead writer's orphan, and neither prunes what the other's pointer names."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)

    def second_writer(name: str) -> None:  # runs while the first has renamed its version in, before its switch
        with modelfolder.write_version(model, "second") as staging:
            _version_files(model, staging)

    with modelfolder.write_version(model, "first", switching=second_writer) as staging:
        _version_files(model, staging)
    assert current_version(model).name.endswith("-first") and loads_and_scores(model)
    names = sorted(p.name for p in (model / VERSIONS).iterdir())
    assert any(n.endswith("-second") for n in names) and len(names) == 3, names


def test_a_file_that_cannot_be_removed_after_the_switch_does_not_fail_the_write(model, tmp_path, monkeypatch):
    """The old layout's top-level graphs are removed after the pointer names the new version: a
    permission error there (a graph of another user in a sticky folder) must not report a write
    that took effect as failed."""
    flat = tmp_path / "flat"
    shutil.copytree(current_version(model), flat)
    real_unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self.name in modelfolder.GRAPH_NAMES and self.parent == flat:
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    with modelfolder.write_version(flat, "new") as staging:
        _version_files(flat, staging)
    assert current_version(flat).name.endswith("-new") and loads_and_scores(flat)
