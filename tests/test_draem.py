"""The draem family: synthetic defects (aae_train.anomalies), a segmenter trained to find them, its
map exported in the scorer graph and used by the runtime's tiled scoring (issue: real part images).

Real photographs (scikit-image's grass), real training through `aae-train folder --crop`, real
export and ONNX Runtime scoring.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aae_runtime.contract.errors import ModelError
from aae_runtime.contract.metadata import ModelMetadata
from aae_train import anomalies
from tests.conftest import calibrate_copy, write_png

runner = CliRunner()
CROP = 32


@pytest.fixture(scope="module")
def grass():
    from skimage.data import grass

    return grass()  # (512, 512) uint8, a real photograph


def _crops(grass, n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, 512 - size, n), rng.integers(0, 512 - size, n)
    return torch.from_numpy(np.stack([grass[r : r + size, c : c + size] for r, c in zip(rows, cols)])[:, None] / 255).float()


def test_synthetic_defects_are_confined_in_range_and_only_on_their_share_of_crops(grass):
    x = _crops(grass, 256)
    draws = [torch.from_numpy(d) for d in anomalies.draw(len(x), np.random.default_rng(1))]
    out, mask = anomalies.synthesize(x, draws, 0.5, 0.0, 1.0)
    again, mask_again = anomalies.synthesize(x, draws, 0.5, 0.0, 1.0)
    assert torch.equal(out, again) and torch.equal(mask, mask_again)  # a function of the draws: resume stays exact
    assert out.shape == x.shape and mask.shape == (256, 1, 64, 64) and 0.0 <= out.min() and out.max() <= 1.0
    has = draws[-1][:, anomalies.HAS] < 0.5
    assert torch.equal(out[~has], x[~has]) and mask[~has].sum() == 0  # the others untouched, to the bit
    area = mask[has].flatten(1).mean(1)
    assert 0.3 < has.float().mean() < 0.7 and (area > 0).float().mean() > 0.95  # almost every defect leaves a mask
    assert area.median() < 0.15 and area.max() < 0.6  # a defect is a part of the crop, not the crop
    changed = (out - x).abs().flatten(1).sum(1)[has]
    inside = ((out - x).abs() * mask).flatten(1).sum(1)[has]
    assert (inside / changed.clamp_min(1e-6)).median() > 0.7  # the change lies mostly where the mask says
    kinds = (draws[-1][has, anomalies.FILL] * anomalies.FILLS).long()
    assert set(kinds.tolist()) == set(range(anomalies.FILLS))
    curves = draws[-1][has, anomalies.CURVE] < 0.3
    assert area[curves].median() < area[~curves].median()  # curves are thin


@pytest.fixture(scope="module")
def draem_model(tmp_path_factory, grass):
    """A draem model trained on crops of one real photo, exported: (model folder, work folder, metrics)."""
    from aae_train.cli import app as train_app
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("draem")
    write_png(root / "train" / "grass.png", grass[:192, :256])
    r = runner.invoke(train_app, ["folder", str(root / "train"), "--crop", str(CROP), "--family", "draem", "--crops-per-image",
                                  "640", "--epochs", "8", "--batch-size", "32", "--val-fraction", "0.3", "--hidden", "32",
                                  "--segment-width", "8", "--segment-input", "image", "--recon-loss", "mse", "--threads", "1",
                                  "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    export_checkpoint(root / "run" / "best.pt", root / "model", log=lambda s: None)
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root / "model", root, metrics


def test_the_segmenter_learns_to_find_synthetic_defects_on_held_out_crops(draem_model):
    _, _, metrics = draem_model
    losses = [m["val_segment_loss"] for m in metrics]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses  # a fixed draw of defects, the same every epoch
    assert all(k in metrics[-1] for k in ("recon_loss", "segment_loss", "val_recon_loss"))


def test_a_draem_model_maps_whole_photos_from_its_scorer_graph(draem_model, grass):
    from aae_runtime import AAEModel

    model_dir, _, _ = draem_model
    m = AAEModel.load(model_dir, device="cpu")
    meta = m.metadata.raw
    assert meta["family"] == "draem" and meta["requires"] == ["tiling", "segmentation", "exif_orientation"]
    assert meta["score"]["name"] == "segment" and meta["graphs"]["scorer"]["pixel_error"] == "segment"
    photo = grass[None, 200:333, 100:290].astype(np.float32) / 255
    score, smoothed = m.score_photo(photo, batch_size=5)
    assert smoothed.shape == (133, 190) and 0.0 <= smoothed.min() and smoothed.max() <= 1.0  # probabilities
    assert score == pytest.approx(float(smoothed.max()))
    np.testing.assert_allclose(m.score_photo(photo, batch_size=64)[1], smoothed, atol=1e-5)  # batches change nothing
    # the maps need the segmenter, which only the scorer graph runs
    with pytest.raises(ModelError, match="only scorer.onnx runs"):
        AAEModel.load(model_dir, device="cpu", use_scorer=False)
    with pytest.raises(ModelError, match="does not list 'segmentation'"):
        ModelMetadata.from_dict(dict(meta, requires=["tiling"]), "encoder.onnx")


def test_aae_run_scores_maps_and_lists_regions_of_a_draem_model(draem_model, grass, tmp_path):
    from aae_runtime.cli import app

    model_dir, _, _ = draem_model
    write_png(tmp_path / "photos" / "a.png", grass[300:420, 0:150])
    r = runner.invoke(app, ["score", str(tmp_path / "photos"), "--model", str(model_dir), "--maps", str(tmp_path / "maps"),
                            "--maps-raw", "--regions", str(tmp_path / "regions.csv"), "--output", str(tmp_path / "s.csv")])
    assert r.exit_code == 0, r.output
    raw = np.load(next((tmp_path / "maps").glob("*.npy")))
    assert raw.shape == (120, 150) and raw.dtype == np.float32
    assert (tmp_path / "regions.csv").read_text().startswith("path,region,x,y,width,height,area,peak")


def test_calibrate_refits_a_draem_models_threshold_through_its_scorer(draem_model, grass, tmp_path):
    from aae_runtime.cli import app

    photos = [grass[200 + 20 * i : 260 + 20 * i, 100:180] for i in range(10)]
    m, scores = calibrate_copy(draem_model[0], photos, tmp_path, "--percentile", "90")
    assert m.threshold == pytest.approx(float(np.percentile(scores, 90)), rel=1e-5) and m.score_name == "segment"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "line"), "--model", str(tmp_path / "model"), "--score", "mse"])
    assert r.exit_code == 2 and "computes segment" in " ".join(r.output.split()), r.output


def test_a_draem_model_without_its_scorer_file_is_refused_in_one_line(draem_model, tmp_path):
    import shutil

    from aae_runtime.cli import app
    from aae_runtime.contract.modelfolder import current_version

    model_dir, _, _ = draem_model
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (current_version(copy) / "scorer.onnx").unlink()
    r = runner.invoke(app, ["info", "--model", str(copy)])
    assert r.exit_code == 2 and "scorer.onnx is missing" in r.output and "Traceback" not in r.output, r.output


def test_draem_export_refuses_variants_without_the_scorer(draem_model, tmp_path):
    from export.cli import app

    _, root, _ = draem_model
    r = runner.invoke(app, ["--checkpoint", str(root / "run" / "best.pt"), "--out", str(tmp_path / "m"), "--quantize", "int8"])
    assert r.exit_code == 2 and "exported in float32 with that graph" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "m").exists()


def test_a_resumed_draem_run_reaches_the_weights_of_an_uninterrupted_one(grass, tmp_path):
    from aae_train.cli import app as train_app

    write_png(tmp_path / "train" / "grass.png", grass[:128, :192])
    common = ["--crop", str(CROP), "--family", "draem", "--crops-per-image", "64", "--batch-size", "16", "--hidden", "16",
              "--segment-width", "4", "--threads", "1"]
    for out, epochs in (("straight", "2"), ("first", "1")):
        r = runner.invoke(train_app, ["folder", str(tmp_path / "train"), *common, "--epochs", epochs, "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    r = runner.invoke(train_app, ["folder", str(tmp_path / "train"), "--resume", str(tmp_path / "first" / "checkpoint.pt"),
                                  "--epochs", "2", "--threads", "1", "--out", str(tmp_path / "first")])
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=True)
    for net in ("encoder", "decoder", "segmenter"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net


@pytest.mark.parametrize("args, message", [
    (["--size", "64"], "--family draem learns defect maps of whole photos: train on crops"),
    (["--crop", "36"], "--crop 36 is not a multiple of 8 of at least 16"),
    (["--crop", "8"], "--crop 8 is not a multiple of 8 of at least 16"),
    (["--crop", "32", "--segment-input", "edges"], "unknown segment input 'edges'; choose one of image+reconstruction, image"),
])
def test_draem_options_that_do_not_fit_are_one_line_errors(tmp_path, grass, args, message):
    from aae_train.cli import app as train_app

    write_png(tmp_path / "p" / "g.png", grass[:100, :100])
    write_png(tmp_path / "p" / "h.png", grass[100:200, :100])
    r = runner.invoke(train_app, ["folder", str(tmp_path / "p"), "--family", "draem", *args, "--epochs", "1", "--threads", "1",
                                  "--out", str(tmp_path / "run")])
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())  # Rich's error box wraps long lines
    assert r.exit_code == 2 and message in text and "Traceback" not in r.output, r.output


def test_draem_options_on_another_family_are_refused(tmp_path, grass):
    from aae_train.cli import app as train_app

    write_png(tmp_path / "p" / "g.png", grass[:100, :100])
    r = runner.invoke(train_app, ["folder", str(tmp_path / "p"), "--crop", "32", "--defect-share", "0.3", "--epochs", "1",
                                  "--out", str(tmp_path / "run")])
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())
    assert r.exit_code == 2 and "applies to --family draem, not aae" in text, r.output


def test_an_rgb_draem_model_with_the_reconstruction_beside_the_crop_exports_and_maps(tmp_path):
    from skimage.data import astronaut

    from aae_runtime import AAEModel
    from aae_train.cli import app as train_app
    from export.onnx_export import export_checkpoint

    write_png(tmp_path / "train" / "a.png", astronaut()[:160, :160])  # (H, W, 3): RGB photos (--color in either case), the default segment input
    r = runner.invoke(train_app, ["folder", str(tmp_path / "train"), "--crop", str(CROP), "--color", "rgb", "--family", "draem",
                                  "--arch", "conv", "--crops-per-image", "64", "--epochs", "1", "--batch-size", "16",
                                  "--hidden", "16", "--segment-width", "4", "--threads", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    result = export_checkpoint(tmp_path / "run" / "checkpoint.pt", tmp_path / "model", log=lambda s: None)
    assert max(result.max_abs_diff.values()) < 1e-4 and "scorer.pixel_error" in result.max_abs_diff
    m = AAEModel.load(tmp_path / "model", device="cpu")
    score, smoothed = m.score_photo(astronaut()[300:400, 200:330].transpose(2, 0, 1).astype(np.float32) / 255)
    assert smoothed.shape == (100, 130) and 0 <= score <= 1


def test_synthetic_defects_are_made_in_float32_under_bf16_autocast(grass):
    from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from aae_train.families import get_family

    pre = {"color_mode": "L", "size": [CROP, CROP], "resample": "bilinear", "scale": 1 / 255, "offset": 0.0}
    cfg = RunConfig(model=ModelConfig(image_shape=(1, CROP, CROP), latent_dim=8, arch="conv", hidden=16,
                                      prior={"name": "gaussian", "dim": 8, "std": 1.0}),
                    data=DataConfig(source="folder", crop=CROP, preprocessing=pre), train=TrainConfig(device="cpu"), family="draem")
    kind = get_family("draem")
    family = kind(cfg, kind.networks(cfg), torch.device("cpu"))
    x = _crops(grass, 8, CROP)
    draws = [torch.from_numpy(d) for d in anomalies.draw(8, np.random.default_rng(0))]
    plain = family.with_defects(x, draws)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = family.with_defects(x, draws)
    assert under[0].dtype == torch.float32 and all(torch.equal(a, b) for a, b in zip(plain, under))


def test_the_segment_score_belongs_to_draem_models_only(tiny_run, tiny_model_dir, tmp_path, mnist_test):
    import shutil

    from aae_runtime.cli import app
    from export.cli import app as export_app

    r = runner.invoke(export_app, ["--checkpoint", str(tiny_run.checkpoint), "--out", str(tmp_path / "m"), "--score", "segment"])
    assert r.exit_code == 2 and "segmenter's map of a --family draem model" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "m").exists()
    images, _ = mnist_test
    for i in range(12):
        write_png(tmp_path / "normal" / f"{i}.png", images[i])
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    r = runner.invoke(app, ["calibrate", str(tmp_path / "normal"), "--model", str(tmp_path / "model"), "--score", "segment"])
    assert r.exit_code == 2 and "which this model has not" in " ".join(r.output.split()), r.output


def test_an_epoch_of_fewer_crops_than_one_minibatch_trains_as_one_step(tmp_path, grass):
    from aae_train.cli import app as train_app

    write_png(tmp_path / "p" / "g.png", grass[:100, :100])
    r = runner.invoke(train_app, ["folder", str(tmp_path / "p"), "--family", "draem", "--crop", "32", "--crops-per-image", "20",
                                  "--hidden", "16", "--segment-width", "4", "--epochs", "1", "--threads", "1",
                                  "--out", str(tmp_path / "run")])  # 20 crops, minibatches of 64: the draws were made for 64
    assert r.exit_code == 0, r.output
