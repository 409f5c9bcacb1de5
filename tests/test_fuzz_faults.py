"""Fuzzing the fault paths: model-folder updates killed at random moments under a reader, and
scoring runs stopped by random signals at random moments. Each example is a few real processes,
so the default count is small; AAE_FUZZ_EXAMPLES=N (scaled down here) and AAE_FUZZ_RANDOM=1 hunt
longer."""

from __future__ import annotations

import csv
import json
import re
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aae_runtime import AAEModel
from aae_runtime.contract.modelfolder import STAGING_PREFIX
from tests.conftest import write_png

EXAMPLES = max(3, int(os.environ.get("AAE_FUZZ_EXAMPLES", "200")) // 40)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("AAE_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CALIBRATE = textwrap.dedent("""
    import sys
    from aae_runtime.cli import app
    app(["calibrate", sys.argv[1], "--model", sys.argv[2], "--percentile", sys.argv[3]], prog_name="aae-run")
""")


@pytest.fixture(scope="module")
def normal(tmp_path_factory, mnist_test) -> Path:
    folder = tmp_path_factory.mktemp("normal")
    for i in range(20):
        write_png(folder / f"{i:02d}.png", mnist_test[0][i])
    return folder


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzzed") / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


@FUZZ
@given(kills=st.lists(st.floats(0.05, 2.5), min_size=1, max_size=3), percentile=st.floats(80, 99.9))
def test_calibrations_killed_at_random_moments_never_leave_a_folder_that_does_not_load(model, normal, kills, percentile):
    for delay in kills:
        run = subprocess.Popen([sys.executable, "-c", CALIBRATE, str(normal), str(model), f"{percentile:.3f}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
        m = AAEModel.load(model, device="cpu")  # the old model or the new, whole
        m.score(np.zeros((1, *m.input_shape), np.float32))
        m.sample(1, seed=0)
    done = subprocess.run([sys.executable, "-c", CALIBRATE, str(normal), str(model), "99"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(model.glob(STAGING_PREFIX + "*"))


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slowfuzz")
    photo = root / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (700, 700), dtype=np.uint8)).save(photo)
    folder = root / "inbox"
    folder.mkdir()
    for i in range(600):
        (folder / f"{i:04d}.png").symlink_to(photo)
    return folder


@FUZZ
@given(suffix=st.sampled_from([".csv", ".jsonl", ".json"]), sig=st.sampled_from([signal.SIGTERM, signal.SIGINT]),
       delay=st.floats(0.0, 2.0), batch=st.sampled_from([1, 7, 64]))
def test_scoring_stopped_at_random_moments_keeps_a_readable_prefix(slow_folder, tiny_model_dir, tmp_path_factory,
                                                                   suffix, sig, delay, batch):
    out = tmp_path_factory.mktemp("stop") / f"rows{suffix}"
    run = subprocess.Popen(["aae-run", "score", str(slow_folder), "--model", str(tiny_model_dir), "--device", "cpu",
                            "--batch-size", str(batch), "--output", str(out), "--show", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    if run.returncode == 0:  # it finished first
        rows = _rows(out)
        assert len(rows) == 600
        return
    assert run.returncode in (130, 143, -sig), stderr  # -sig: stopped before Python set its handlers
    if run.returncode < 0:
        return
    written = out.with_name(out.name + ".partial") if suffix == ".json" else out
    assert "interrupted" in stderr, stderr
    if written.exists():
        rows = _rows(written)
        assert len(rows) <= 600 and all(r["path"].endswith(".png") for r in rows)
        for said in (r"after (\d+) images?", r"wrote (\d+) rows?"):  # what it says it kept is what the file holds
            for n in re.findall(said, stderr):
                assert int(n) == len(rows), stderr
        if "after the run had ended" in stderr:
            assert len(rows) == 600, stderr


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return list(csv.DictReader(path.open()))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())



def test_a_signal_while_a_row_is_recorded_leaves_the_row_in_both_or_neither(tiny_model_dir, mnist_test, tmp_path, monkeypatch):
    """Ctrl-C landing inside the writing of a row (a real SIGINT, sent from within the write): the
    rows the run counts, shows and says it kept are the rows its file holds."""
    from aae_runtime import cli
    from aae_runtime.model import AAEModel
    from aae_runtime.report import ResultStream

    class SignalledStream(ResultStream):
        def write(self, results):
            if self.rows == 5:
                os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: inside this write
            super().write(results)

    for i in range(12):
        write_png(tmp_path / "in" / f"{i:02d}.png", mnist_test[0][i])
    monkeypatch.setattr(cli, "ResultStream", SignalledStream)
    m = AAEModel.load(tiny_model_dir, device="cpu")
    out = tmp_path / "rows.csv"
    with cli._stop_signals() as signals:
        results, stream, stopped = cli._collect(m.iter_score_paths([tmp_path / "in"], batch_size=4), out, m.threshold,
                                                None, 4, signals)
    assert stopped == "Ctrl-C" and stream.rows == len(results) == len(_rows(out)) == 6

    class SignalledClose(ResultStream):  # the last image scored, Ctrl-C while the file is closed
        def close(self, complete=True):
            os.kill(os.getpid(), signal.SIGINT)
            return super().close(complete)

    monkeypatch.setattr(cli, "ResultStream", SignalledClose)
    with cli._stop_signals() as signals:
        results, stream, stopped = cli._collect(m.iter_score_paths([tmp_path / "in"], batch_size=4), out, m.threshold,
                                                None, 4, signals)
        assert stopped is None and len(_rows(out)) == len(results) == 12  # the run was whole: it reports so first
        with pytest.raises(KeyboardInterrupt):  # then the signal, at the end of what prints the rows (`_end`)
            with signals.held():
                pass
