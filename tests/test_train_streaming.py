"""Folders larger than memory: `aae-train folder --loader stream` decodes minibatches from disk in
DataLoader workers (real files, real worker processes) and trains exactly as a folder held in
memory; what it holds does not grow with the folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from aae_runtime.contract.priors import make_prior_spec
from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from aae_train.data import DataWarning, load_dataset
from aae_train.families import get_family
from aae_train.mnist import DataError
from aae_train.streaming import FolderImages, Stream, choose_loader, eval_chunk
from aae_train.train import train


def _folder(root: Path, n: int, size: int, classes: tuple[str, ...] = ("good", "worn"), corrupt: bool = True) -> Path:
    from PIL import Image

    rng = np.random.default_rng(n)
    for i in range(n):
        sub = root / classes[i % len(classes)]
        sub.mkdir(parents=True, exist_ok=True)
        base = 60 + 120 * (i % len(classes))  # the classes differ in brightness
        Image.fromarray(np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)).save(sub / f"{i:05d}.png")
    if corrupt:
        (root / classes[0] / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("parts"), 120, 12)


def _cfg(root: Path, family: str = "aae", **options) -> RunConfig:
    model = ModelConfig(image_shape=(3, 12, 12), latent_dim=2, hidden=32, prior=make_prior_spec("gaussian", 2, std=1.0))
    data = DataConfig(source="folder", path=str(root), image_size=(12, 12), color_mode="RGB", val_fraction=0.25)
    return RunConfig(model=model, data=data, train=TrainConfig(epochs=2, batch_size=20, device="cpu", ema=0.9),
                     family=family, options=get_family(family).options_class(**options))


def _figures(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in history]


@pytest.mark.parametrize("family, options", [("aae", {}), ("semi", {"labels": 10})])
def test_a_streamed_folder_trains_exactly_as_one_held_in_memory(folder, tmp_path, family, options):
    torch.set_num_threads(1)
    with pytest.warns(DataWarning, match=r"skipped 1 of 121 files .*truncated\.png"):
        held = train(_cfg(folder, family, **options), tmp_path / "memory", loader="memory")
    with pytest.warns(DataWarning, match=r"skipped 1 of 121 files .*truncated\.png"):
        streamed = train(_cfg(folder, family, **options), tmp_path / "stream", loader="stream", workers=2)
    assert len(held.metrics) == 2
    assert _figures(streamed.metrics) == _figures(held.metrics)  # the same batches, bit for bit
    a, b = (torch.load(r.checkpoint, weights_only=True) for r in (held, streamed))
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])


def test_a_streamed_run_resumes_as_it_would_have_gone_on(folder, tmp_path):
    cfg = _cfg(folder)
    with pytest.warns(DataWarning):
        whole = train(cfg, tmp_path / "whole", loader="memory")
        first = train(cfg.replace(train=TrainConfig(**{**vars(cfg.train), "epochs": 1})), tmp_path / "part", loader="stream",
                      workers=1)
        resumed = train(cfg, tmp_path / "part", resume=first.checkpoint, loader="stream", workers=0)
    assert _figures(resumed.metrics) == _figures(whole.metrics)


def test_the_cli_streams_says_so_warns_once_and_export_reads_only_the_held_out_images(folder, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(["aae-train", "folder", str(folder), "--size", "12", "--color", "RGB", "--hidden", "16", "--epochs", "1",
                        "--batch-size", "20", "--threads", "1", "--loader", "stream", "--workers", "1", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "streamed from disk by 1 worker process" in r.stderr
    assert r.stderr.count("skipped 1 of 121 files") == 1 and "Traceback" not in r.stderr
    e = subprocess.run(["aae-export", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "model")],
                       capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    with pytest.warns(DataWarning):
        held_out = len(load_dataset(replace(_cfg(folder).data, val_fraction=0.2), loader="memory").val)  # the CLI's default
    assert f"{held_out} held-out normal images" in e.stdout + e.stderr


def test_a_file_that_becomes_unreadable_after_the_scan_stops_training_with_its_name(tmp_path):
    root = _folder(tmp_path / "parts", 40, 12, corrupt=False)
    data = load_dataset(_cfg(root).data, loader="stream", workers=1)
    victim = Path(data.train.files[3])
    victim.write_bytes(b"GIF89a truncated")
    stream = Stream(data.train, workers=1, device=torch.device("cpu"))
    with pytest.raises(DataError, match=rf"{victim.name} can no longer be read .*restore it and --resume"):
        list(stream.batches([range(0, 10)]))
    assert len(list(stream.batches([range(10, 20), range(20, 30)]))) == 2  # the workers go on serving


def test_auto_streams_a_folder_larger_than_a_quarter_of_what_the_process_may_use():
    # Under an address-space limit (ulimit -v) 600 MB above what the process maps: 100 MB stays in
    # memory, 200 MB is streamed; without the limit (24 GB here) both stay in memory.
    code = textwrap.dedent("""
        import resource, sys
        from aae_train.streaming import choose_loader
        before = choose_loader("auto", 200 << 20)
        mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (600 << 20), resource.RLIM_INFINITY))
        print(before, choose_loader("auto", 100 << 20), choose_loader("auto", 200 << 20))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["memory", "memory", "stream"]
    assert choose_loader("memory", 1 << 50) == "memory" and choose_loader("stream", 1) == "stream"
    with pytest.raises(DataError, match="unknown loader 'disk'; choose one of auto, memory, stream"):
        choose_loader("disk", 1)


def test_validation_chunks_are_bounded_in_bytes():
    assert eval_chunk((1, 28, 28)) == 1000
    assert eval_chunk((3, 512, 512)) * 3 * 512 * 512 * 4 <= 16 << 20
    assert eval_chunk((3, 8192, 8192)) == 1


def _peak_rss(args: list[str]) -> int:
    """Peak resident set of the largest process of ``args`` (the training process), in bytes."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    rc, kib = r.stdout.split()
    assert rc == "0", r.stderr
    return int(kib) * 1024


def test_memory_held_while_streaming_does_not_grow_with_the_folder(tmp_path):
    # Both beyond a validation chunk (152 images of 96 x 96 RGB) and a minibatch; the large one 265 MB decoded.
    small = _folder(tmp_path / "small", 800, 96, classes=("a",), corrupt=False)
    large = _folder(tmp_path / "large", 2400, 96, classes=("a",), corrupt=False)
    decoded = 2400 * 3 * 96 * 96 * 4

    def peak(folder: Path, loader: str) -> int:
        return _peak_rss(["aae-train", "folder", str(folder), "--size", "96", "--color", "RGB", "--arch", "mlp", "--hidden", "16",
                          "--epochs", "1", "--threads", "1", "--loader", loader, "--workers", "1",
                          "--out", str(tmp_path / f"run-{folder.name}-{loader}")])

    stream_small, stream_large, memory_large = peak(small, "stream"), peak(large, "stream"), peak(large, "memory")
    assert stream_large - stream_small < 0.2 * decoded, (stream_small, stream_large)  # held in memory: 0.67 x
    assert memory_large - stream_large > 0.7 * decoded, (memory_large, stream_large)


def test_folder_images_index_like_an_array(tmp_path):
    root = _folder(tmp_path / "parts", 6, 12, corrupt=False)
    data = load_dataset(_cfg(root).data, loader="stream", workers=0)
    held = load_dataset(_cfg(root).data, loader="memory")
    assert isinstance(data.train, FolderImages) and data.train.shape == held.train.shape
    assert np.array_equal(data.train[np.array([2, 0])], held.train[[2, 0]])
    assert np.array_equal(data.val[:], held.val) and np.array_equal(data.train_labels, held.train_labels)
    assert json.dumps(data.preprocessing.to_dict()) == json.dumps(held.preprocessing.to_dict())
