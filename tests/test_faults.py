"""Faults that used to lose work: options silently ignored on --resume, files written in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aae_train.config import RunConfig
from aae_train.train import resume_conflicts


def test_options_that_differ_from_a_resumed_checkpoint_are_named_and_equal_ones_pass():
    from dataclasses import replace

    saved = RunConfig()
    built = saved.replace(model=replace(saved.model, latent_dim=saved.model.latent_dim + 1,
                                        prior=dict(saved.model.prior, dim=saved.model.latent_dim + 1)),
                          train=replace(saved.train, lr_recon=saved.train.lr_recon * 2, epochs=99))
    given = {"epochs": 99, "threads": 1, "hidden": saved.model.hidden, "latent_dim": saved.model.latent_dim + 1,
             "lr_recon": saved.train.lr_recon * 2, "threshold_magic": 3}
    assert resume_conflicts(saved, built, given) == [
        f"--latent-dim {saved.model.latent_dim + 1} (checkpoint: {saved.model.latent_dim})",
        f"--lr-recon {saved.train.lr_recon * 2} (checkpoint: {saved.train.lr_recon})", "--threshold-magic 3"]
    assert resume_conflicts(saved, saved, {"epochs": 3, "device": "cpu", "out": "x", "overwrite": True,
                                           "hidden": saved.model.hidden}) == []


def test_resume_with_a_changed_architecture_is_refused_in_one_line(tiny_run, tmp_path, mnist_dir):
    r = subprocess.run(["aae-train", "mnist", "--resume", str(tiny_run.checkpoint), "--out", str(tmp_path / "r"),
                        "--epochs", "5", "--hidden", "7", "--threads", "1", "--data-dir", str(mnist_dir)],
                       capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(errors) == 1 and "--hidden 7 (checkpoint:" in errors[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_resume_of_a_run_that_has_every_epoch_says_so_and_announces_no_training(tiny_run, tmp_path, mnist_dir):
    r = subprocess.run(["aae-train", "mnist", "--resume", str(tiny_run.checkpoint), "--out", str(tmp_path / "r"),
                        "--epochs", "2", "--threads", "1", "--data-dir", str(mnist_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "holds 2 epochs already, and --epochs is 2: nothing to train" in r.stderr, r.stderr
    assert "training on" not in r.stderr and "epoch   1" not in r.stderr, r.stderr


def test_resume_with_the_other_data_command_is_refused_in_one_line(tiny_run, tmp_path, mnist_test):
    from tests.conftest import write_png

    for i in range(4):
        write_png(tmp_path / "photos" / f"{i}.png", mnist_test[0][i])
    r = subprocess.run(["aae-train", "folder", str(tmp_path / "photos"), "--resume", str(tiny_run.checkpoint), "--out",
                        str(tmp_path / "r"), "--epochs", "5", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is a run of aae-train mnist, not folder" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("suffix", [".npy", ".png"])
def test_sample_replaces_its_output_by_a_rename_never_writing_into_the_old_file(tiny_model_dir, tmp_path, suffix):
    out = tmp_path / f"s{suffix}"
    out.write_bytes(b"previous contents")
    keep = tmp_path / "hardlink"
    os.link(out, keep)  # an in-place write would change the bytes behind this link too
    r = subprocess.run(["aae-run", "sample", "--model", str(tiny_model_dir), "-n", "4", "--seed", "1", "--out", str(out),
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert keep.read_bytes() == b"previous contents" and out.stat().st_ino != keep.stat().st_ino
    if suffix == ".npy":
        assert np.load(out).shape[0] == 4


def test_a_compressed_checkpoint_that_inflates_to_gigabytes_is_refused_before_loading(tmp_path, tiny_run):
    import time
    import zipfile

    from aae_train.checkpoint import CheckpointError, load_checkpoint

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(tiny_run.checkpoint) as good, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in good.infolist():
            out.writestr(info.filename, good.read(info.filename))
        with out.open("archive/data/999", "w", force_zip64=True) as big:  # 1.2 GB of zeros, ~1 MB deflated
            chunk = bytes(1 << 24)
            for _ in range(72):
                big.write(chunk)
    assert bomb.stat().st_size < 8 << 20
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="inflate to"):
        load_checkpoint(bomb)
    assert time.monotonic() - start < 2


def test_a_folder_tree_1200_levels_deep_is_walked(tiny_model_dir, tmp_path, mnist_test):
    from tests.conftest import write_png

    root = tmp_path / "deep"
    here = os.getcwd()
    root.mkdir()
    os.chdir(root)
    try:  # relative steps: the absolute path grows past what one mkdir call takes at once
        for _ in range(1200):
            os.mkdir("d")
            os.chdir("d")
        write_png(Path("x.png"), mnist_test[0][0])
    finally:
        os.chdir(here)
    try:
        r = subprocess.run(["aae-run", "score", str(root), "--model", str(tiny_model_dir), "--device", "cpu"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "scored 1 image:" in r.stdout, r.stderr
    finally:
        _remove_deep(root)


def _remove_deep(root: Path) -> None:
    """Remove a tree too deep for shutil.rmtree's recursion (pytest would fail to clean it up)."""
    here = os.getcwd()
    os.chdir(root)
    try:
        depth = 0
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for name in os.listdir("."):
            os.unlink(name)
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(here)


def test_a_negative_seed_is_a_usage_error(tiny_model_dir, tmp_path):
    r = subprocess.run(["aae-run", "sample", "--model", str(tiny_model_dir), "--seed", "-1", "--out", str(tmp_path / "s.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--seed" in r.stderr and "internal" not in r.stderr


@pytest.mark.parametrize("change,words", [
    (lambda m: m["score"].update(pixel_error_scale=-1.0), "pixel_error_scale"),
    (lambda m: m["score"].update(pixel_error_scale=float("nan")), "pixel_error_scale"),
    (lambda m: m["input"].update(value_range=[1.0, 0.0]), "value_range"),
    (lambda m: m["input"].update(value_range="wide"), "value_range"),
])
def test_map_fields_are_validated(tiny_model_dir, change, words):
    import json

    from aae_runtime import ModelError
    from aae_runtime.contract.metadata import ModelMetadata
    from aae_runtime.contract.modelfolder import current_version
    from aae_runtime.contract.onnxwire import read_graph_file

    meta = json.loads(read_graph_file(current_version(tiny_model_dir) / "encoder.onnx").custom_metadata_map["aae"])
    change(meta)
    with pytest.raises(ModelError, match=words):
        ModelMetadata.from_json(json.dumps(meta), "encoder.onnx")


def test_a_checkpoint_with_a_damaged_config_is_one_line(tiny_run, tmp_path):
    import torch

    from aae_train.checkpoint import CheckpointError, load_trained

    state = torch.load(tiny_run.checkpoint, weights_only=True)
    for damage in ({"model": "not a dict"}, {"model": {"latent_dim": [1, 2]}}, {"train": {"epochs": {"x": 1}}}):
        bad = tmp_path / "bad.pt"
        torch.save({**state, "config": {**state["config"], **damage}}, bad)
        with pytest.raises(CheckpointError) as info:
            load_trained(bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("preset,expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_aae_train_sets_a_short_openmp_spin_unless_the_user_chose_one(tmp_path, preset, expected):
    code = ("import os, sys\nfrom aae_train.cli import app\n"
            "try:\n    app(['demo-images', '--out', sys.argv[1], '--digits', '0', '--noise', '1'], prog_name='aae-train')\n"
            "except SystemExit:\n    pass\nprint(os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True, env={**env, **preset})
    assert r.stdout.strip().splitlines()[-1] == str(expected), r.stderr


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_old_one_stays(tmp_path, monkeypatch):
    import errno

    import torch

    from aae_train.checkpoint import CheckpointError, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()
    failures = (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 26250752 vs 26250640"),
                OSError(errno.ENOSPC, "No space left on device"))
    for failure in failures:
        def full(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(torch, "save", full)
        with pytest.raises(CheckpointError, match=r"cannot write .*checkpoint.pt .*the file it would replace is kept whole"):
            save_checkpoint({"epoch": 2}, path)
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_run_set_aside_by_a_killed_overwrite_is_named_where_its_checkpoint_is_missing(tmp_path):
    from aae_train.checkpoint import REPLACED, CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint({"epoch": 1}, tmp_path / REPLACED / "checkpoint.pt")  # what --overwrite moved aside, then SIGKILL
    with pytest.raises(CheckpointError, match=f"the run it replaced waits in .*{REPLACED}"):
        load_checkpoint(tmp_path)
