"""`aae-train folder` and the prior/posterior/arch options: real files, real decoding, CliRunner."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from aae_runtime.images import load_image
from aae_train.cli import app, parse_size
from aae_train.config import DataConfig
from aae_train.data import DataWarning, folder_preprocessing, load_dataset
from aae_train.plots import project_2d
from tests.conftest import write_png

runner = CliRunner()


@pytest.fixture(scope="module")
def parts(tmp_path_factory, mnist_test):
    """30 digits in good/ and scratched/ (PNG, JPEG, BMP, 16-bit TIFF), plus 2 unreadable files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("parts")
    images, _ = mnist_test
    for i in range(30):
        sub = root / ("good" if i % 2 else "scratched") / ("deep" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        if i % 7 == 3:
            Image.fromarray(images[i].astype(np.uint16) * 257).save(sub / f"{i}.tif")
        else:
            write_png(sub / f"{i}.{['png', 'jpg', 'bmp'][i % 3]}", images[i])
    (root / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, not even looked at")
    return root


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(source="folder", path=str(root), image_size=(20, 24), color_mode="L", val_fraction=0.2, **kw)


def test_folder_images_are_decoded_exactly_as_the_runtime_decodes_them(parts):
    with pytest.warns(DataWarning, match=r"skipped 2 of 32 files"):
        data = load_dataset(_cfg(parts))
    assert data.train.shape[1:] == (1, 20, 24) and len(data.train) + len(data.val) == 30
    assert data.class_names == ("good", "scratched") and set(data.train_labels) <= {0, 1}
    pre = folder_preprocessing(_cfg(parts))
    assert data.preprocessing == pre
    # The same bytes through aae_runtime.images.load_image give the same arrays, bit for bit.
    from aae_runtime.images import find_images

    readable = [p for p in find_images([parts]) if p.stat().st_size > 0 and p.name != "broken.png"]
    decoded = {p.name: load_image(p, pre) for p in readable}
    for x in np.concatenate([data.train, data.val]):
        assert any(np.array_equal(x, y) for y in decoded.values())
    assert len(data.notes) == 1 and ("broken.png" in data.notes[0] or "empty.jpg" in data.notes[0])


def test_new_folder_runs_read_exif_orientation_and_runs_from_before_keep_the_stored_pixels(parts):
    from aae_train.config import RunConfig

    assert folder_preprocessing(_cfg(parts)).orientation == "exif"
    cfg = RunConfig(data=_cfg(parts))
    assert RunConfig.from_dict(cfg.to_dict()).data.orientation == "exif"
    before = cfg.to_dict()
    del before["data"]["orientation"]  # a checkpoint written before the field: resumed and exported as it trained
    assert RunConfig.from_dict(before).data.orientation == "stored"
    with pytest.raises(ValueError, match="orientation"):
        DataConfig(source="folder", orientation="sideways")


def test_split_is_stable_and_rebuilt_from_the_config_alone(parts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        a, b = load_dataset(_cfg(parts)), load_dataset(_cfg(parts))
        other = load_dataset(_cfg(parts, split_seed=1))
    assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.val, other.val)


def test_rgb_folder_gives_three_channels(parts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        data = load_dataset(DataConfig(source="folder", path=str(parts), image_size=(16, 16), color_mode="RGB"))
    assert data.val.shape[1:] == (3, 16, 16) and data.val.dtype == np.float32
    assert 0.0 <= data.train.min() and data.train.max() <= 1.0


def test_cli_folder_trains_and_warns_once_about_skipped_files(parts, tmp_path):
    out = tmp_path / "run [red]x[/]\x1b[2J"  # printed as it is: neither markup nor a terminal command
    result = runner.invoke(app, ["folder", str(parts), "--size", "24x20", "--epochs", "1", "--hidden", "16",
                                 "--latent-dim", "3", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped 2 of 32 files") == 1
    assert f"run folder {tmp_path}/run [red]x[/]\\x1b[2J" in result.output and "\x1b" not in result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["arch"] == "conv" and cfg["model"]["image_shape"] == [1, 20, 24]
    assert cfg["data"]["preprocessing"]["size"] == [20, 24] and cfg["data"]["source"] == "folder"
    assert cfg["data"]["preprocessing"]["orientation"] == "exif" and cfg["data"]["orientation"] == "exif"
    assert (out / "latent.png").exists() and (out / "loss_curves.png").exists()


@pytest.mark.parametrize("args,message", [
    (["folder", "{missing}"], "not a folder"),
    (["folder", "{parts}", "--size", "0"], "--size"),
    (["folder", "{parts}", "--size", "abc"], "--size"),
    (["folder", "{parts}", "--color", "CMYK"], "--color"),
    (["mnist", "--prior", "gaussian", "--mog-radius", "3"], "applies to --prior mog"),
    (["mnist", "--prior", "swissroll", "--latent-dim", "3"], "swissroll"),
    (["mnist", "--prior", "banana"], "banana"),
    (["mnist", "--posterior", "bayes"], "bayes"),
    (["mnist", "--arch", "transformer"], "transformer"),
    (["mnist", "--lr-schedule", "linear"], "linear"),
])
def test_bad_options_fail_in_one_line_with_exit_2(args, message, parts, tmp_path):
    args = [a.format(parts=parts, missing=tmp_path / "nope") for a in args]
    result = runner.invoke(app, args + ["--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # Typer boxes and wraps the message
    assert message in text and "Traceback" not in text
    assert not (tmp_path / "x").exists()


def test_parse_size_reads_width_by_height():
    assert parse_size("64") == (64, 64)
    assert parse_size("96x64") == (64, 96)  # (height, width)
    assert parse_size("32X16") == (16, 32)


def test_latent_projection_is_the_identity_in_2d_and_pca_beyond():
    rng = np.random.default_rng(0)
    z2 = rng.normal(size=(50, 2))
    assert np.array_equal(project_2d(z2)[0], z2)
    z = rng.normal(size=(400, 6)) * np.array([5.0, 3.0, 0.1, 0.1, 0.1, 0.1])
    pts, title = project_2d(z)
    assert pts.shape == (400, 2) and "PCA" in title
    assert np.var(pts[:, 0]) == pytest.approx(np.var(z[:, 0]), rel=0.2)  # the largest-variance axis comes first


def test_the_latent_plot_of_a_single_held_out_code_is_drawn(tmp_path):
    """A validation split of one image (a tiny folder) has one code: one principal axis, not two."""
    from aae_train.plots import plot_latent

    assert project_2d(np.ones((1, 8)))[0].shape == (1, 2)
    prior = np.random.default_rng(0).normal(size=(50, 8))
    assert plot_latent(np.ones((1, 8)), np.array([0]), tmp_path / "latent.png", prior_samples=prior).is_file()


def test_hidden_files_are_dropped_after_the_split_that_existing_checkpoints_were_drawn_on(tmp_path, mnist_test):
    """A checkpoint's held-out images were chosen over the folder's whole listing, hidden files
    (a notebook's checkpoints) included; they are dropped after that choice, so an old run's
    validation images stay its validation images, and the hidden copies are not data."""
    from aae_runtime.images import find_images
    from aae_train.config import DataConfig
    from aae_train.data import load_dataset, split_indices
    from tests.conftest import write_png

    for i in range(40):
        write_png(tmp_path / "f" / f"{i:02d}.png", mnist_test[0][i])
    for i in range(3):
        write_png(tmp_path / "f" / ".ipynb_checkpoints" / f"{i}.png", mnist_test[0][100 + i])
    cfg = DataConfig(source="folder", image_size=(28, 28), color_mode="L", val_fraction=0.2)
    data = load_dataset(cfg, str(tmp_path / "f"))
    files = find_images([tmp_path / "f"], follow_links=False)
    _, va = split_indices(len(files), cfg.val_fraction, cfg.split_seed)  # the split as drawn before hidden files were dropped
    expected = [files[i] for i in va if ".ipynb_checkpoints" not in str(files[i])]
    assert len(data.train) + len(data.val) == 40 and len(data.val) == len(expected)
    from aae_runtime.images import load_image
    from aae_train.data import folder_preprocessing

    pre = folder_preprocessing(cfg)
    assert {x.tobytes() for x in data.val} == {load_image(f, pre).tobytes() for f in expected}


def test_an_image_linked_under_a_second_name_is_used_once_and_never_both_held_out_and_trained_on(tmp_path, mnist_test):
    """A link (symbolic or hard) is the same image: held out under one name, it must not be
    trained on under the other, or the threshold is set on a training image. The held-out
    images stay those of the listing's split, as for hidden files."""
    import os

    from PIL import Image

    folder = tmp_path / "f"
    for i in range(20):
        write_png(folder / f"{i:02d}.png", mnist_test[0][i])
        os.symlink(f"{i:02d}.png", folder / f"link to {i:02d}.png")
    os.link(folder / "00.png", folder / "hard 00.png")
    cfg = DataConfig(source="folder", image_size=(28, 28), color_mode="L", val_fraction=0.25)
    with pytest.warns(DataWarning, match=r"are another listed image under a second name \(a link\): each image is used once"):
        data = load_dataset(cfg, str(folder))
    train, val = {x.tobytes() for x in data.train}, {x.tobytes() for x in data.val}
    assert not train & val and len(train) == len(data.train) and len(train | val) == 20
    assert len(val) == len(data.val)  # none held out twice under two names (the threshold counted it twice)
    # whole photos for crops: a linked photo is one photo, so it cannot be held out and trained on
    (tmp_path / "p").mkdir()
    for i in range(3):
        Image.fromarray(np.tile(mnist_test[0][i], (3, 3))).save(tmp_path / "p" / f"{i}.png")
        os.symlink(f"{i}.png", tmp_path / "p" / f"copy {i}.png")
    crops = DataConfig(source="folder", color_mode="L", crop=32, crops_per_image=8, val_fraction=0.34)
    with pytest.warns(DataWarning, match=r"file\(s\) under .* are another listed image"):
        data = load_dataset(crops, str(tmp_path / "p"))
    train, held = [p.tobytes() for p in data.crops.photos], [p.tobytes() for p in data.windows.photos]
    assert data.held_out.startswith("2 whole photos held out")  # drawn over all 6 files, as runs before this rule were
    assert not set(train) & set(held) and len(set(train)) == len(train) >= 1 and len(set(held)) == len(held)


def test_resume_and_export_refuse_a_folder_whose_files_changed_and_take_a_moved_one(tmp_path, mnist_test):
    """The held-out split is drawn over the folder's listing: with a file added it would be drawn
    again, and images the run trained on would become its validation images (best.pt) and
    export's threshold images. Refused in one line; the same files under another path are fine."""
    from export.cli import app as export_app

    folder = tmp_path / "f"
    for i in range(24):
        write_png(folder / f"{i:02d}.png", mnist_test[0][i])
    common = ["--size", "16", "--hidden", "16", "--latent-dim", "3", "--batch-size", "8", "--device", "cpu"]
    result = runner.invoke(app, ["folder", str(folder), *common, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    listing = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["listing"]
    assert listing.startswith("24:")
    write_png(folder / "24.png", mnist_test[0][24])  # one more image: the split would change
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    result = runner.invoke(app, ["folder", str(folder), "--resume", str(checkpoint), "--epochs", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "no longer lists the image files this run was trained on (24 then, 25 now" in text
    assert "restore the folder as it was" in text
    result = runner.invoke(export_app, ["--checkpoint", str(checkpoint), "--data-dir", str(folder),
                                        "--out", str(tmp_path / "model")])
    assert result.exit_code != 0 and "no longer lists" in " ".join(result.output.split())
    assert not (tmp_path / "model").exists()
    (folder / "24.png").unlink()
    folder.rename(tmp_path / "moved")  # the same files elsewhere: resumed
    result = runner.invoke(app, ["folder", str(tmp_path / "moved"), "--resume", str(checkpoint), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["listing"] == listing
