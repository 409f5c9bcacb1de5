"""Whole photos: crops for training, tiles and full-resolution maps for scoring (issue: real part images).

Real photographs (scikit-image's grass), real training through `aae-train folder --crop`, real
export and ONNX Runtime scoring; the numeric pieces (stitching, smoothing, SSIM) against
independent references (scipy, scikit-image).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aae_runtime import AAEModel
from aae_runtime.contract.errors import InputError, ModelError
from aae_runtime.contract.metadata import ModelMetadata
from aae_runtime.contract.scores import pixel_error, ssim_map
from aae_runtime.contract.tiling import Tiling, gaussian_smooth
from aae_train.crops import SCALE_RANGE, CropSampler, augment, split_photos
from tests.conftest import calibrate_copy, write_png

runner = CliRunner()
CROP = 32


@pytest.fixture(scope="module")
def grass():
    from skimage.data import grass

    return grass()  # (512, 512) uint8, a real photograph


def test_tiles_cover_the_photo_and_the_last_ones_are_flush_with_its_edges():
    t = Tiling((32, 32), (16, 16), 2.0)
    origins = t.origins(100, 70)
    rows, cols = sorted({r for r, _ in origins}), sorted({c for _, c in origins})
    assert rows == [0, 16, 32, 48, 64, 68] and cols == [0, 16, 32, 38]
    with pytest.raises(InputError, match="smaller than the model's 32 x 32 tile"):
        t.origins(31, 200)


def test_stitching_averages_overlapping_tiles_back_into_the_photo():
    rng = np.random.default_rng(0)
    photo = rng.random((3, 101, 77)).astype(np.float32)
    t = Tiling((32, 32), (13, 13), 0.0)
    # each tile's "error" is its own channel mean: the stitched average must give back the photo's
    raw = t.stitch(photo, lambda tiles: tiles.mean(axis=1), batch=5)
    assert raw.shape == (101, 77)
    np.testing.assert_allclose(raw, photo.mean(axis=0), rtol=1e-6)


def test_smoothing_matches_scipys_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    x = np.random.default_rng(1).random((90, 130)).astype(np.float32)
    for sigma in (0.7, 4.0, 40.0):  # a kernel wider than the map, too
        np.testing.assert_allclose(gaussian_smooth(x, sigma), gaussian_filter(x.astype(np.float64), sigma, mode="reflect",
                                                                             truncate=3.0), atol=1e-5)


def test_ssim_matches_scikit_image_and_the_torch_graph_formula(grass):
    from skimage.metrics import structural_similarity

    from aae_train.graphs import pixel_error as torch_pixel_error

    x = grass[:64, :64].astype(np.float32)[None, None] / 255
    y = np.clip(x + np.random.default_rng(2).normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    _, ref = structural_similarity(x[0, 0], y[0, 0], data_range=1.0, win_size=7, use_sample_covariance=False, full=True)
    np.testing.assert_allclose(ssim_map(x, y)[0, 0, 3:-3, 3:-3], ref[3:-3, 3:-3], atol=1e-5)  # skimage crops its border
    ours = torch_pixel_error(torch.from_numpy(x), torch.from_numpy(y), "ssim").numpy()
    np.testing.assert_allclose(ours, pixel_error(x, y, "ssim"), atol=1e-5)
    assert pixel_error(x, x, "ssim").max() < 1e-5  # a perfect reconstruction has no error
    rng = np.random.default_rng(3)
    for level in (0.02, 0.98):  # nearly black and nearly white parts: float32 must keep the small variances
        a = np.clip(level + 0.01 * rng.standard_normal((2, 1, 32, 32)), 0, 1).astype(np.float32)
        b = np.clip(a + 0.005 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
        np.testing.assert_allclose(torch_pixel_error(torch.from_numpy(a), torch.from_numpy(b), "ssim").numpy(),
                                   pixel_error(a, b, "ssim"), atol=1e-5)


def test_a_single_photo_holds_out_a_band_no_training_crop_can_reach(grass):
    photo = grass[None, :200, :300]
    split = split_photos([photo], ["grass.png"], CROP, 50, (), 0.25, 0, 1 / 255, 0.0)
    (train,) = split.sampler.photos
    assert train.shape == (1, 150, 300)  # the top rows only
    np.testing.assert_array_equal(train, photo[:, :150])
    band = photo[:, 150:].astype(np.float32) / 255
    places = set()
    for w in split.windows:  # held-out windows are windows of the band, 3/4 of its height, at several phases
        assert w.shape == (1, 37, 37)
        places |= {(r, c) for r in range(14) for c in range(264) if np.allclose(w, band[:, r : r + 37, c : c + 37], atol=1e-6)}
    assert len({r for r, _ in places}) >= 3 and len({c for _, c in places}) >= 10
    crops = split.sampler.draw(3)
    assert crops.shape == (50, 1, CROP, CROP) and crops.dtype == np.float32


def test_several_photos_hold_out_whole_photos(grass):
    photos = [grass[None, i * 100 : i * 100 + 100, :200] for i in range(5)]
    split = split_photos(photos, [f"{i}.png" for i in range(5)], CROP, None, (), 0.4, 0, 1 / 255, 0.0)
    held = [np.rint(w * 255).astype(np.uint8) for w in split.windows]
    assert len(held) == 2 and len(split.sampler.photos) == 3
    for h in held:  # no held-out photo is among the training photos
        assert not any(np.array_equal(h, t) for t in split.sampler.photos)


def test_crops_are_redrawn_each_epoch_and_the_same_on_resume(grass):
    s = CropSampler((grass[None, :128, :128],), CROP, 20, ("flip", "rot90"), 1 / 255, 0.0, seed=5)
    again = CropSampler((grass[None, :128, :128],), CROP, 20, ("flip", "rot90"), 1 / 255, 0.0, seed=5)
    np.testing.assert_array_equal(s.draw(4), again.draw(4))
    assert not np.array_equal(s.draw(4), s.draw(5))


def test_augmentations_only_move_pixels():
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (64, 1, 8, 8)).astype(np.uint8)
    out = augment(crops.copy(), ("flip", "rot90"), rng)
    assert not np.array_equal(out, crops)
    np.testing.assert_array_equal(np.sort(out.reshape(64, -1), axis=1), np.sort(crops.reshape(64, -1), axis=1))


def test_scale_cuts_each_crop_from_a_square_zoomed_within_the_range():
    # a ramp, one level a pixel to the right: a crop cut from a square of side `crop * f` and
    # resized to `crop` climbs 1 / f a pixel, so its slope shows the zoom it was drawn with
    ramp = np.tile(np.arange(240, dtype=np.uint8), (240, 1))[None]
    crops = CropSampler((ramp,), 32, 400, ("scale",), 1.0, 0.0, seed=3).draw(0)
    assert crops.shape == (400, 1, 32, 32)
    slopes = (crops[:, 0, 16, 26] - crops[:, 0, 16, 6]) / 20
    assert slopes.min() >= 1 / SCALE_RANGE - 0.02 and slopes.max() <= SCALE_RANGE + 0.02
    assert (slopes <= 0.9).mean() > 0.15 and (slopes >= 1.1).mean() > 0.15  # zoomed in and out, not only near 1
    np.testing.assert_array_equal(crops[:, :, 5], crops[:, :, 20])  # every row alike: resized, not sheared or turned


# -- the real pipeline --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiled_model(tmp_path_factory, grass):
    """A model trained on crops of one real photo, exported: (model folder, work folder)."""
    from aae_train.cli import app as train_app
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("tiled")
    write_png(root / "train" / "grass.png", grass[:160, :256])
    r = runner.invoke(train_app, ["folder", str(root / "train"), "--crop", str(CROP), "--crops-per-image", "128",
                                  "--epochs", "2", "--batch-size", "32", "--val-fraction", "0.3", "--augment", "flip",
                                  "--hidden", "64", "--threads", "1", "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    export_checkpoint(root / "run" / "checkpoint.pt", root / "model", log=lambda s: None)
    return root / "model", root


def test_export_says_when_few_held_out_photos_set_the_threshold(grass, tmp_path):
    from aae_train.cli import app as train_app
    from export.onnx_export import export_checkpoint

    for i in range(4):
        write_png(tmp_path / "train" / f"{i}.png", grass[100 * i : 100 * i + 96, :96])
    r = runner.invoke(train_app, ["folder", str(tmp_path / "train"), "--crop", str(CROP), "--crops-per-image", "16",
                                  "--epochs", "1", "--val-fraction", "0.5", "--hidden", "16", "--threads", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    lines = []
    export_checkpoint(tmp_path / "run" / "checkpoint.pt", tmp_path / "model", log=lines.append)
    log = "\n".join(lines)
    assert "99th percentile of the scores of 2 held-out photos" in log, log
    assert "note: only 2 held-out photos set this threshold" in log and "run aae-run calibrate on 10 or more normal images" in log, log


def test_a_tiled_model_requires_tiling_and_scores_photos_at_their_own_resolution(tiled_model, grass):

    model_dir, root = tiled_model
    m = AAEModel.load(model_dir, device="cpu")
    meta = m.metadata.raw
    assert meta["schema_version"] == 3 and meta["requires"] == ["tiling", "exif_orientation"]
    assert meta["tiling"]["tile"] == [CROP, CROP] and meta["preprocessing"]["orientation"] == "exif"
    assert meta["score"]["name"] == "mse" and "held out" in meta["threshold"]["split"]
    photo = grass[None, 200:333, 100:290].astype(np.float32) / 255  # not a multiple of the tile or stride
    score, smoothed = m.score_photo(photo, batch_size=7)
    assert smoothed.shape == (133, 190) and score == pytest.approx(float(smoothed.max()))
    # tile batches do not change the result, and the fused graph and the two graphs agree
    two_graph = AAEModel.load(model_dir, device="cpu", use_scorer=False)
    np.testing.assert_allclose(two_graph.score_photo(photo, batch_size=64)[1], smoothed, atol=1e-4)
    # a defect raises the map where it is, not elsewhere
    hit = photo.copy()
    hit[:, 60:70, 90:100] = 0.0
    _, bad_map = m.score_photo(hit)
    assert np.unravel_index(np.argmax(bad_map - smoothed), bad_map.shape) in {(r, c) for r in range(50, 80) for c in range(80, 110)}


def test_score_writes_full_resolution_maps_raw_maps_and_regions(tiled_model, grass, tmp_path):
    from aae_runtime.cli import app

    model_dir, _ = tiled_model
    photos = tmp_path / "photos"
    write_png(photos / "a.png", grass[300:420, 0:150])
    bad = grass[300:420, 200:350].copy()
    bad[40:56, 60:76] = 255
    write_png(photos / "b.png", bad)
    write_png(photos / "tiny.png", grass[:10, :10])
    r = runner.invoke(app, ["score", str(photos), "--model", str(model_dir), "--maps", str(tmp_path / "maps"), "--maps-raw",
                            "--regions", str(tmp_path / "regions.csv"), "--threshold", "0.05", "--output", str(tmp_path / "s.csv")])
    assert r.exit_code == 1, r.output  # tiny.png cannot be tiled: its own error row, the others scored
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in _csv_rows(tmp_path / "s.csv")}
    assert "smaller than the model's" in rows["tiny.png"]["error"] and rows["b.png"]["score"]
    index = _csv_rows(tmp_path / "maps" / "maps.csv")
    assert {"image", "map", "raw_map"} <= set(index[0])
    raw = {row["image"].rsplit("/", 1)[-1]: np.load(tmp_path / "maps" / row["raw_map"]) for row in index}
    assert raw["a.png"].shape == (120, 150) and raw["a.png"].dtype == np.float32
    from PIL import Image

    assert Image.open(tmp_path / "maps" / index[0]["map"]).height == 120  # panels at the photo's resolution
    regions = _csv_rows(tmp_path / "regions.csv")
    assert list(regions[0]) == ["path", "region", "x", "y", "width", "height", "area", "peak"]
    b_regions = [g for g in regions if g["path"].endswith("b.png")]
    assert b_regions and all(float(g["peak"]) > 0.05 for g in b_regions)
    box = b_regions[0]  # the highest peak covers the white square
    assert int(box["x"]) <= 68 <= int(box["x"]) + int(box["width"]) and int(box["y"]) <= 48 <= int(box["y"]) + int(box["height"])


def test_evaluate_reports_image_and_pixel_auroc_and_rates_at_the_threshold(tiled_model, grass, tmp_path):
    from aae_runtime.cli import app

    model_dir, _ = tiled_model
    rng = np.random.default_rng(0)
    for i in range(6):
        r, c = rng.integers(160, 400), rng.integers(0, 400)
        window = grass[r : r + 80, c : c + 80].copy()
        write_png(tmp_path / "normal" / f"n{i}.png", window)
        mask = np.zeros_like(window)
        mask[20:34, 30:44] = 255
        window[20:34, 30:44] = 0
        write_png(tmp_path / "defects" / "hole" / f"d{i}.png", window)
        write_png(tmp_path / "masks" / "hole" / f"d{i}.png", mask)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects"), "--model",
                            str(model_dir), "--masks", str(tmp_path / "masks"), "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["normal_images"] == 6 and e["anomalous_images"] == 6 and e["masked_images"] == 6
    assert 0.0 <= e["image_auroc"] <= 1.0 and e["pixel_auroc"] > 0.5  # a black square on grass is not subtle
    assert e["per_kind"] == {"hole": {"images": 6, "detected": e["detections"]}}
    assert "image AUROC" in r.stdout and "false alarms at threshold" in r.stdout


def _csv_rows(path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def _meta(model_dir):

    return dict(AAEModel.load(model_dir, device="cpu").metadata.raw)


def test_a_runtime_refuses_features_it_does_not_know_and_tiling_it_is_not_told_to_require(tiled_model):
    meta = _meta(tiled_model[0])
    with pytest.raises(ModelError, match="requires 'warp'.*upgrade aae"):
        ModelMetadata.from_dict(dict(meta, requires=["tiling", "warp"]), "encoder.onnx")
    with pytest.raises(ModelError, match="does not list it in 'requires'"):
        ModelMetadata.from_dict(dict(meta, requires=[]), "encoder.onnx")
    with pytest.raises(ModelError, match="malformed 'tiling'"):
        ModelMetadata.from_dict(dict(meta, tiling=dict(meta["tiling"], stride=[0, 16])), "encoder.onnx")
    with pytest.raises(ModelError, match="maximum of its per-pixel error map"):
        ModelMetadata.from_dict(dict(meta, score=dict(meta["score"], name="mse_absrel")), "encoder.onnx")


@pytest.mark.parametrize("args, message", [
    (["--crop", "32", "--size", "64"], "--crop and --size exclude each other"),
    (["--crops-per-image", "5"], "needs --crop"),
    (["--crop", "32", "--augment", "flip,shear"], "unknown shear; choose from flip, rot90, scale"),
    (["--crop", "32", "--family", "semi", "--labels", "all"], "--family semi needs whole labelled images"),
])
def test_crop_options_that_do_not_fit_are_one_line_errors(tmp_path, grass, args, message):
    from aae_train.cli import app as train_app

    write_png(tmp_path / "p" / "g.png", grass[:100, :100])
    r = runner.invoke(train_app, ["folder", str(tmp_path / "p"), *args, "--epochs", "1", "--out", str(tmp_path / "run")])
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())  # Rich's error box wraps long lines
    assert r.exit_code == 2 and message in text, r.output
    assert "Traceback" not in r.output


def test_calibrate_refits_a_tiled_models_threshold_on_whole_photos(tiled_model, grass, tmp_path):
    from aae_runtime.cli import app

    photos = [grass[200 + 20 * i : 280 + 20 * i, 100:200] for i in range(12)]
    m, scores = calibrate_copy(tiled_model[0], photos, tmp_path, "--percentile", "90")
    assert m.threshold == pytest.approx(float(np.percentile(scores, 90)), rel=1e-5) and m.tiling is not None
    r = runner.invoke(app, ["calibrate", str(tmp_path / "line"), "--model", str(tmp_path / "model"), "--score", "mse_absrel"])
    assert r.exit_code == 2 and "maximum of its per-pixel error map" in r.output
    # the photos are decoded one at a time as they are scored: those that fail are named after, the rest calibrate
    (tmp_path / "line" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    write_png(tmp_path / "line" / "tiny.png", grass[:10, :10])  # smaller than a tile
    write_png(tmp_path / "bad" / "b.png", np.full((80, 100), 255, np.uint8))
    r = runner.invoke(app, ["calibrate", str(tmp_path / "line"), "--model", str(tmp_path / "model"), "--anomalies", str(tmp_path / "bad"),
                            "--threads", "1"])
    assert r.exit_code == 1 and "skipped" in r.output and "broken.png" in r.output and "tiny.png" in r.output, r.output
    t = AAEModel.load(tmp_path / "model", device="cpu").metadata.threshold
    assert t["method"] == "f1" and t["stats"]["count"] == 12 and t["anomaly_count"] == 1
    for name in ("0.png", "1.png", "2.png", "3.png", "4.png", "5.png", "6.png", "7.png"):
        (tmp_path / "line" / name).unlink()
    r = runner.invoke(app, ["calibrate", str(tmp_path / "line"), "--model", str(tmp_path / "model")])
    assert r.exit_code == 2 and "found 4 readable normal photos in the given paths; calibration needs at least 10" in r.output, r.output
    assert "skipped" in r.output and "broken.png" in r.output, r.output  # which ones failed, though the calibration stopped
    # anomalies none of which can be read are found before the normal photos are scored (the anomalies go first)
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "x.png").write_bytes(b"not an image")
    r = runner.invoke(app, ["calibrate", str(tmp_path / "line"), "--model", str(tmp_path / "model"),
                            "--anomalies", str(tmp_path / "unreadable")])
    assert r.exit_code == 2 and "no readable anomalous images in --anomalies" in r.output and "x.png" in r.output, r.output


def test_a_resumed_crop_run_draws_the_same_crops_and_reaches_the_same_weights(grass, tmp_path):
    from aae_train.cli import app as train_app

    write_png(tmp_path / "p" / "g.png", grass[:128, :160])
    common = ["folder", str(tmp_path / "p"), "--crop", str(CROP), "--crops-per-image", "64", "--batch-size", "32",
              "--hidden", "32", "--augment", "flip,rot90,scale", "--val-fraction", "0.3", "--threads", "1"]
    assert runner.invoke(train_app, [*common, "--epochs", "2", "--out", str(tmp_path / "straight")]).exit_code == 0
    assert runner.invoke(train_app, [*common, "--epochs", "1", "--out", str(tmp_path / "split")]).exit_code == 0
    r = runner.invoke(train_app, ["folder", str(tmp_path / "p"), "--resume", str(tmp_path / "split" / "checkpoint.pt"),
                                  "--epochs", "2", "--threads", "1", "--out", str(tmp_path / "split")])
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for net in ("encoder", "decoder", "discriminator"):
        for name, tensor in a[net].items():
            assert torch.equal(tensor, b[net][name]), f"{net}.{name}"
    # --augment on --resume without --crop: the checkpoint's crop; in another order it is the same
    resume = ["folder", str(tmp_path / "p"), "--resume", str(tmp_path / "split" / "checkpoint.pt"), "--epochs", "2",
              "--threads", "1", "--out", str(tmp_path / "split")]
    r = runner.invoke(train_app, [*resume, "--augment", "scale,rot90,flip"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(train_app, [*resume, "--augment", "flip"])
    assert r.exit_code == 2 and "--augment flip (checkpoint: flip,rot90,scale)" in r.output, r.output


def test_export_with_defective_photos_sets_an_f1_threshold_on_whole_photos(tiled_model, grass, tmp_path):
    from export.onnx_export import export_checkpoint

    _, root = tiled_model
    for i in range(4):
        bad = grass[200 + 60 * i : 300 + 60 * i, 300:420].copy()
        bad[30:50, 40:60] = 0
        write_png(tmp_path / "bad" / f"{i}.png", bad)
    result = export_checkpoint(root / "run" / "checkpoint.pt", tmp_path / "model", anomalies=[tmp_path / "bad"], log=lambda s: None)
    t = result.metadata["threshold"]
    assert t["method"] == "f1" and t["value"] > 0 and t["anomaly_count"] == 4


def test_evaluate_refuses_masks_of_another_size_and_masks_without_defects(tiled_model, grass, tmp_path):
    from aae_runtime.cli import app

    for i in range(3):
        write_png(tmp_path / "normal" / f"n{i}.png", grass[300:380, 80 * i : 80 * i + 80])
        write_png(tmp_path / "defects" / f"d{i}.png", grass[400:480, 80 * i : 80 * i + 80])
        write_png(tmp_path / "small" / f"d{i}_mask.png", np.full((40, 40), 255, np.uint8))
        write_png(tmp_path / "black" / f"d{i}.png", np.zeros((80, 80), np.uint8))
    args = ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects"), "--model", str(tiled_model[0])]
    r = runner.invoke(app, [*args, "--masks", str(tmp_path / "small")])
    assert r.exit_code == 2 and "give masks of the photos' own size" in " ".join(r.output.split())
    r = runner.invoke(app, [*args, "--masks", str(tmp_path / "black")])
    assert r.exit_code == 2 and "mark no defect pixel" in " ".join(r.output.split())
    # a mask declaring a photo far beyond the limits, and one in a format photos are never read in: one line each
    from tests.hostile_inputs import png_bomb

    (tmp_path / "hostile").mkdir()
    (tmp_path / "hostile" / "d0.png").write_bytes(png_bomb(30_000, 30_000))
    r = runner.invoke(app, [*args, "--masks", str(tmp_path / "hostile")])
    assert r.exit_code == 2 and "too large" in r.output and "internal" not in r.output, r.output
    (tmp_path / "hostile" / "d0.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 80 80\n")
    r = runner.invoke(app, [*args, "--masks", str(tmp_path / "hostile")])
    assert r.exit_code == 2 and "not one of the accepted formats" in r.output, r.output
    # the same photos as normal and as defective
    r = runner.invoke(app, ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "normal" / "n0.png"),
                            "--model", str(tiled_model[0])])
    assert r.exit_code == 2 and "is given as normal and as defective" in " ".join(r.output.split()), r.output


def test_evaluate_never_takes_another_kinds_mask_of_the_same_name(tiled_model, grass, tmp_path):
    from aae_runtime.cli import app

    for i, kind in enumerate(("scratch", "stain")):
        write_png(tmp_path / "normal" / f"n{i}.png", grass[300:380, 80 * i : 80 * i + 80])
        write_png(tmp_path / "defects" / kind / "d1.png", grass[400:480, 80 * i : 80 * i + 80])
    mask = np.zeros((80, 80), np.uint8)
    mask[10:20, 10:20] = 255
    write_png(tmp_path / "masks" / "scratch" / "d1.png", mask)  # stain's d1 has none
    r = runner.invoke(app, ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects"), "--model",
                            str(tiled_model[0]), "--masks", str(tmp_path / "masks"), "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["masked_images"] == 1  # scratch's own; stain's is not borrowed
    assert "1 defective photo without a mask under" in " ".join(r.output.split()) and "stain" in r.output, r.output
    # a mask of 0s and 1s (a common label format) marks its 1s; a mask marking nothing is named
    write_png(tmp_path / "masks" / "stain" / "d1.png", (mask > 0).astype(np.uint8))
    write_png(tmp_path / "normal" / "n2.png", grass[300:380, 160:240])
    write_png(tmp_path / "defects" / "blot" / "d1.png", grass[400:480, 160:240])
    write_png(tmp_path / "masks" / "blot" / "d1.png", np.zeros((80, 80), np.uint8))
    r = runner.invoke(app, ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects"), "--model",
                            str(tiled_model[0]), "--masks", str(tmp_path / "masks"), "--output", str(tmp_path / "e01.json")])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and json.loads((tmp_path / "e01.json").read_text())["masked_images"] == 3, r.output
    assert "1 defective photo with a mask that marks no pixel" in text and "blot" in text and "without a mask" not in text, r.output
    for gone in ("masks/stain/d1.png", "masks/blot/d1.png", "defects/blot/d1.png", "normal/n2.png"):  # as it was
        (tmp_path / gone).unlink()
    # the kinds given as root folders themselves, and a 16-bit mask saved with 0 and 255
    (tmp_path / "masks" / "scratch" / "d1.png").unlink()
    import PIL.Image

    PIL.Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "masks" / "scratch" / "d1.png")
    r = runner.invoke(app, ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects" / "scratch"),
                            str(tmp_path / "defects" / "stain"), "--model", str(tiled_model[0]), "--masks",
                            str(tmp_path / "masks"), "--output", str(tmp_path / "e2.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e2.json").read_text())["masked_images"] == 1


def test_regions_and_evaluate_refuse_paths_that_do_not_exist(tiled_model, grass, tmp_path):
    from aae_runtime.cli import app

    write_png(tmp_path / "p" / "a.png", grass[:80, :80])
    r = runner.invoke(app, ["score", str(tmp_path / "p"), "--model", str(tiled_model[0]), "--regions",
                            str(tmp_path / "no" / "such" / "r.csv")])
    assert r.exit_code == 2 and not (tmp_path / "no").exists()  # nothing created, nothing scored
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p"), "--anomalies", str(tmp_path / "missing"), "--model",
                            str(tiled_model[0])])
    assert r.exit_code == 2 and "missing does not exist" in " ".join(r.output.split())


def test_the_server_bounds_the_photo_a_tiled_model_tiles(tiled_model, grass, tmp_path):
    """--max-megapixels: a photo larger than the service takes gets its error row before decoding."""
    import io

    from PIL import Image

    from tests.test_serve import Server

    def png(pixels) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    s = Server(tiled_model[0], "--max-megapixels", "0.01")  # 10,000 pixels
    try:
        status, small, _ = s.score(png(grass[:64, :96]))
        assert status == 200 and small["results"][0]["score"] is not None
        status, big, _ = s.score(png(grass[:200, :200]))
        assert status == 422 and "too large for this service" in big["results"][0]["error"], big
    finally:
        assert s.stop() == 0


def test_score_on_a_terminal_counts_a_photos_tiles_while_it_is_scored(tiled_model, grass, tmp_path):
    from tests.test_console import _in_a_terminal

    write_png(tmp_path / "photo.png", grass[:200, :200])  # 12 x 12 tiles of 32: 11 at stride 16, one flush with the edge
    write_png(tmp_path / "tiny.png", grass[:10, :10])  # smaller than a tile: its error row, as without a terminal
    shown = _in_a_terminal(["aae-run", "score", str(tmp_path / "photo.png"), str(tmp_path / "tiny.png"),
                            "--model", str(tiled_model[0]), "--batch-size", "8", "--threads", "1"])
    assert re.search(rb"\rscored 0 of 2 images; photo\.png: 8 of 144 tiles \(0:00:0\d\)\x1b\[K", shown), shown
    assert re.search(rb"scored 1 image: \d+ anomalous, 1 failed", shown) and b"internal error" not in shown, shown


def test_calibrate_on_a_terminal_says_which_photo_it_is_scoring(tiled_model, grass, tmp_path):
    import shutil

    from tests.test_console import _in_a_terminal

    shutil.copytree(tiled_model[0], tmp_path / "model")
    for i in range(10):
        write_png(tmp_path / "line" / f"{i}.png", grass[200 + 20 * i : 280 + 20 * i, 100:200])
    write_png(tmp_path / "bad" / "b.png", np.full((80, 100), 255, np.uint8))
    shown = _in_a_terminal(["aae-run", "calibrate", str(tmp_path / "line"), "--anomalies", str(tmp_path / "bad"),
                            "--model", str(tmp_path / "model"), "--threads", "1"])
    assert b"\rscoring anomalous photo 1 of 1: b.png (0:00:0" in shown, shown
    assert b"\rscoring normal photo 10 of 10: 9.png (0:00:" in shown, shown
    assert b"\r\x1b[Krecalibrated " in shown, shown  # the line erased before the result
    few = _in_a_terminal(["aae-run", "calibrate", *(str(tmp_path / "line" / f"{i}.png") for i in range(3)),
                          "--model", str(tmp_path / "model"), "--threads", "1"])
    assert b"\rscoring normal photo 3 of 3: 2.png" in few and re.search(rb"\r\x1b\[K(\x1b\[31m)?error:", few), few  # erased before an error too


def test_palette_and_colour_masks_mark_their_defects(tmp_path):
    from PIL import Image

    from aae_runtime.images import load_gray

    indices = np.zeros((8, 8), np.uint8)
    indices[2:4, 2:4] = 1
    palette = Image.fromarray(indices, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # VOC / labelme: index 1 is dark red
    palette.save(tmp_path / "voc.png")
    red = np.zeros((8, 8, 3), np.uint8)
    red[2:4, 2:4] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.png")
    for name in ("voc.png", "red.png"):
        mask = load_gray(tmp_path / name, mask=True)
        assert (mask > 127).sum() == 4 and mask[2, 2] == 255, name


def test_evaluate_and_score_refuse_outputs_that_overlap_their_inputs(tiled_model, grass, tmp_path):
    import subprocess

    from aae_runtime.cli import app

    write_png(tmp_path / "normal" / "n0.png", grass[300:380, :80])
    write_png(tmp_path / "defects" / "d0.png", grass[400:480, :80])
    write_png(tmp_path / "defects" / "d0_mask.png", np.full((80, 80), 255, np.uint8))
    model = str(tiled_model[0])
    r = runner.invoke(app, ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects"),
                            "--masks", str(tmp_path / "defects"), "--model", model])  # masks beside their photos
    assert r.exit_code == 2 and "the masks would be scored as photos" in " ".join(r.output.split()), r.output
    for maps in (tmp_path / "normal" / "maps", Path(model)):  # the next run would score them; a calibration prunes them
        r = runner.invoke(app, ["score", str(tmp_path / "normal"), "--model", model, "--maps", str(maps)])
        assert r.exit_code == 2 and "--maps" in r.output and not (tmp_path / "normal" / "maps").exists(), r.output
    r = subprocess.run(["aae-run", "evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects"),
                        str(tmp_path / "more"), "--model", model], capture_output=True, text=True)  # A B: B is not anomalous
    assert r.returncode == 2 and "--anomalies takes one path each time" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_file_counts_once_however_it_is_reached_and_a_hard_link_is_the_same_file(tmp_path, monkeypatch):
    import os

    from aae_runtime.images import distinct_files, find_images, first_shared

    write_png(tmp_path / "good" / "a.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "good" / "b.png", np.ones((8, 8), np.uint8))
    (tmp_path / "bad").mkdir()
    os.link(tmp_path / "good" / "a.png", tmp_path / "bad" / "z.png")  # the same file under another name
    listed = find_images([tmp_path / "good", tmp_path / "good" / "a.png", tmp_path / "bad" / "z.png"])
    assert len(listed) == 3 and [p.name for p in distinct_files(listed)] == ["a.png", "b.png"]  # the same spelling: once already
    assert first_shared(find_images([tmp_path / "good"]), find_images([tmp_path / "bad"])) == tmp_path / "bad" / "z.png"
    import aae_runtime.images as images

    monkeypatch.setattr(images, "file_identity", lambda path: None)  # a file system that numbers no inodes (0)
    assert [p.name for p in distinct_files(listed)] == ["a.png", "b.png", "z.png"]  # told apart by their paths


def test_masks_are_checked_before_any_photo_is_scored(tiled_model, grass, tmp_path, monkeypatch):
    from aae_runtime.evaluate import evaluate

    write_png(tmp_path / "normal" / "n0.png", grass[300:380, :80])
    for kind in ("scratch", "stain"):
        write_png(tmp_path / "defects" / kind / "d0.png", grass[400:480, :80])
    mask = np.zeros((80, 80), np.uint8)
    mask[10:20, 10:20] = 255
    write_png(tmp_path / "masks" / "d0.png", mask)  # at the top: both kinds' d0.png would take it
    model = AAEModel.load(tiled_model[0], device="cpu")
    monkeypatch.setattr(model, "iter_score_paths", lambda *a, **k: pytest.fail("scored before the masks were checked"))
    with pytest.raises(InputError, match="matches two defective photos"):
        evaluate(model, [tmp_path / "normal"], [tmp_path / "defects"], tmp_path / "masks")
    (tmp_path / "masks" / "d0.png").unlink()
    write_png(tmp_path / "masks" / "scratch" / "d0.png", mask)
    (tmp_path / "masks" / "stain").mkdir()
    (tmp_path / "masks" / "stain" / "d0.png").write_bytes((tmp_path / "masks" / "scratch" / "d0.png").read_bytes()[:60])
    with pytest.raises(InputError, match="mask .*stain.d0.png: .*fix or remove it"):  # truncated
        evaluate(model, [tmp_path / "normal"], [tmp_path / "defects"], tmp_path / "masks")
    write_png(tmp_path / "masks" / "stain" / "d0.png", mask[:40])
    with pytest.raises(InputError, match="give masks of the photos' own size"):
        evaluate(model, [tmp_path / "normal"], [tmp_path / "defects"], tmp_path / "masks")


def test_masks_whose_marks_vanish_at_an_untiled_maps_size_leave_the_other_figures(tiny_model_dir, mnist_test, tmp_path):
    """An untiled model's map has the model input's size, so a mask is resized to it: a mark of
    one pixel can fall between the nearest-neighbour samples. The run then reports every other
    figure and says why there is no pixel AUROC, instead of failing after scoring everything."""
    from PIL import Image

    from aae_runtime.cli import app

    images, _ = mnist_test
    (tmp_path / "defects").mkdir()
    for i in range(3):
        write_png(tmp_path / "normal" / f"n{i}.png", images[i])
        Image.fromarray(images[10 + i]).resize((280, 280)).save(tmp_path / "defects" / f"d{i}.png")
        mask = np.zeros((280, 280), np.uint8)
        mask[0, 0] = 255  # nearest-neighbour to 28 x 28 samples pixel 5, 15, ...: the mark is lost
        write_png(tmp_path / "masks" / f"d{i}.png", mask)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "normal"), "--anomalies", str(tmp_path / "defects"), "--model",
                            str(tiny_model_dir), "--masks", str(tmp_path / "masks"), "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["pixel_auroc"] is None and result["image_auroc"] is not None and result["anomalous_images"] == 3
    assert "no mask of a scored defective photo marks a pixel at the maps' size (28x28)" in " ".join(r.output.split()), r.output
    assert result["masked_images"] == 3
    assert "3 normal photos and 3 defective: one photo scored otherwise moves the image AUROC by up to 0.33" in (
        " ".join(r.output.split()))
    for i in range(20):  # enough of each: no such note
        write_png(tmp_path / "n20" / f"n{i}.png", images[i])
        write_png(tmp_path / "d20" / f"d{i}.png", images[100 + i])
    r = runner.invoke(app, ["evaluate", str(tmp_path / "n20"), "--anomalies", str(tmp_path / "d20"), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and "moves the image AUROC" not in r.output, r.output
