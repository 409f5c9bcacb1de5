"""The training run's outputs: checkpoint (safe load, full config), metrics, grids."""

from __future__ import annotations

import json

import torch
from PIL import Image

from aae_train.config import RunConfig


def test_checkpoint_loads_with_weights_only_and_carries_its_config(tiny_run):
    state = torch.load(tiny_run.checkpoint, weights_only=True)
    cfg = RunConfig.from_dict(state["config"])
    assert cfg.model.latent_dim == 4 and cfg.model.hidden == 64 and cfg.train.epochs == 2
    assert cfg.data.preprocessing["size"] == [28, 28]
    assert state["epoch"] == 2
    assert {"encoder", "decoder", "discriminator", "optimizers", "rng"} <= state.keys()


def test_metrics_jsonl_has_one_line_per_epoch_with_all_losses(tiny_run):
    lines = (tiny_run.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("recon_loss", "disc_loss", "disc_acc", "gen_loss", "val_recon_loss"):
            assert isinstance(r[key], float)
        assert 0 <= r["disc_acc"] <= 1 and len(r["latent_mean"]) == 4
    assert rows[1]["recon_loss"] < rows[0]["recon_loss"]


def test_sample_and_reconstruction_grids_are_written(tiny_run):
    for name in ("samples.png", "reconstructions.png"):
        with Image.open(tiny_run.run_dir / name) as img:
            assert img.mode == "L" and img.width > 28 * 4


def test_no_temporary_files_are_left_in_the_run_dir(tiny_run):
    assert not [p for p in tiny_run.run_dir.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # the writer's lock stays
