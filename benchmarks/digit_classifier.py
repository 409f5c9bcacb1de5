"""A separate MNIST digit classifier: the judge of generated digits.

    python benchmarks/digit_classifier.py --data-dir ../shared/data/mnist --out runs/digit-classifier/cnn.pt

A supervised AAE is asked for digits of a given label; whether it delivers is measured as the
accuracy of this classifier's predictions on 10,000 generated digits against the labels that were
requested (target >= 99 %). The judge is a separate network, trained only on real MNIST images,
and shares no weights, code path or training signal with the models it judges: a model judged by
its own encoder (or by anything trained alongside it) could agree with itself on digits that a
person would not read as the requested label.

It is a small CNN (two conv blocks of 32 and 64 channels with max-pooling, dropout, a 128-unit
dense layer) trained with random shifts of up to 2 pixels. The training split is the first 55,000
images of a seeded permutation of the 60,000 MNIST training images; the last 5,000 are the
validation split, and the epoch kept is the one with the best validation accuracy. Test accuracy
on the 10,000 test images is reported, and never used for any choice.

The file written (``--out``) holds the weights and a record of the settings and results;
running the same command again reports the record and skips the training. The results table
goes to benchmarks/results/digit_classifier.md. Inputs follow the model convention: float32
pixels / 255 in [0, 1], shape (N, 1, 28, 28).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aae_runtime.contract.preprocessing import pixels_to_input  # noqa: E402
from aae_train.data import MNIST_PREPROCESSING  # noqa: E402
from aae_train.mnist import ensure_mnist, load_mnist  # noqa: E402

RESULTS_MD = REPO / "benchmarks" / "results" / "digit_classifier.md"
# Validation images: the last VAL_SIZE of the seeded permutation of the 60,000 training images.
VAL_SIZE = 5000
# Default number of epochs: enough for >= 99.3 % test accuracy in a few minutes on one CPU thread.
EPOCHS = 8
# Images per optimisation step.
BATCH_SIZE = 128
# Adam's initial learning rate; it decays to zero along a cosine over all steps.
LR = 2e-3
# Largest random shift of a training image, in pixels, along each axis (zeros shifted in).
SHIFT = 2
# Dropout after the conv blocks and before the output layer.
DROPOUT = (0.25, 0.5)
# Images per forward pass when predicting.
PREDICT_BATCH = 1000


def build_model() -> nn.Module:
    """The CNN: (N, 1, 28, 28) in [0, 1] -> (N, 10) logits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(DROPOUT[0]), nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(DROPOUT[1]),
        nn.Linear(128, 10),
    )


def settings(epochs: int, seed: int, limit: int | None) -> dict:
    """Everything that decides the trained weights; a finished run with the same settings is skipped."""
    return {"epochs": epochs, "seed": seed, "limit": limit, "val_size": VAL_SIZE, "batch_size": BATCH_SIZE,
            "lr": LR, "shift": SHIFT, "dropout": list(DROPOUT)}


def split_data(data_dir: Path, seed: int, limit: int | None):
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)); ``limit`` caps train and val sizes."""
    pixels, labels = load_mnist(data_dir, "train")
    order = np.random.default_rng(seed).permutation(len(pixels))
    tr, va = order[:-VAL_SIZE][:limit], order[-VAL_SIZE:][:limit]
    test_pixels, test_labels = load_mnist(data_dir, "test")
    return as_xy(pixels[tr], labels[tr]), as_xy(pixels[va], labels[va]), as_xy(test_pixels, test_labels)


def as_xy(pixels: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels (N, 28, 28) and labels -> model inputs (N, 1, 28, 28) in [0, 1] and int64 labels."""
    return torch.from_numpy(pixels_to_input(pixels, MNIST_PREPROCESSING)), torch.from_numpy(labels.astype(np.int64))


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (B, 1, H, W) moved by its own random whole-pixel shift in [-SHIFT, SHIFT]^2."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (SHIFT,) * 4)
    dy, dx = (torch.randint(0, 2 * SHIFT + 1, (2, b), generator=gen))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


def train_epoch(model: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> float:
    """One pass over (x, y) in shuffled batches of shifted images; returns the mean training loss."""
    model.train()
    order, total = torch.randperm(len(x), generator=gen), 0.0
    for i in range(0, len(x), BATCH_SIZE):
        idx = order[i : i + BATCH_SIZE]
        loss = nn.functional.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
    return total / len(x)


def predict(model: nn.Module, images: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    """Labels (N,) int64 of ``images`` (N, 1, 28, 28) float32 pixels in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32))
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must be (N, 1, 28, 28), got {tuple(x.shape)}")
    model.eval()
    with torch.inference_mode():
        out = [model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of (x, y) that ``model`` labels correctly."""
    return float((predict(model, x.numpy()) == y.numpy()).mean())


def fit(x_tr, y_tr, x_val, y_val, epochs: int, seed: int) -> tuple[nn.Module, list[float], int]:
    """Train for ``epochs``; return the model at its best validation epoch, all val accuracies, that epoch."""
    torch.manual_seed(seed)
    gen, model = torch.Generator().manual_seed(seed), build_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-len(x_tr) // BATCH_SIZE))
    history, best = [], None
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, opt, sched, x_tr, y_tr, gen)
        history.append(accuracy(model, x_val, y_val))
        print(f"epoch {epoch}/{epochs}: train loss {loss:.4f}, val accuracy {100 * history[-1]:.2f} %", flush=True)
        if best is None or history[-1] > max(history[:-1]):
            best = (epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[1])
    return model, history, best[0]


def machine() -> str:
    """The processor, core count and torch version, for the results table."""
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} CPU cores (shared with other jobs), "
            f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")


def save_atomic(obj, out_path: Path) -> None:
    """torch.save to a temporary file next to ``out_path``, then rename it into place."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, out_path)


def train_classifier(data_dir, out_path, epochs: int = EPOCHS, seed: int = 0, threads: int = 1,
                     limit: int | None = None, command: str | None = None) -> dict:
    """Train the classifier, write weights + record to ``out_path`` atomically, and return the record."""
    torch.set_num_threads(threads)
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = split_data(ensure_mnist(data_dir), seed, limit)
    wall, cpu = time.perf_counter(), time.process_time()
    model, history, best_epoch = fit(x_tr, y_tr, x_val, y_val, epochs, seed)
    record = {"settings": settings(epochs, seed, limit), "train_images": len(x_tr), "val_images": len(x_val),
              "best_epoch": best_epoch, "val_history": history, "val_accuracy": max(history),
              "train_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
              "test_accuracy": accuracy(model, x_te, y_te), "test_images": len(x_te), "machine": machine(),
              "command": command}
    save_atomic({"state_dict": model.state_dict(), "record": record}, Path(out_path))
    return record


def load_checkpoint(path) -> dict:
    """The saved {"state_dict", "record"} of a trained classifier (tensors and plain values only)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def load_classifier(path) -> nn.Module:
    """The trained classifier saved at ``path``, in eval mode."""
    model = build_model()
    model.load_state_dict(load_checkpoint(path)["state_dict"])
    return model.eval()


def results_markdown(record: dict) -> str:
    """The results table of a finished run."""
    mins = f"{record['train_seconds'] / 60:.1f} min wall, {record['cpu_seconds'] / 60:.1f} min CPU"
    test = f"**{100 * record['test_accuracy']:.2f} %** ({record['test_images']:,} test images)"
    val = f"{100 * record['val_accuracy']:.2f} % ({record['val_images']:,} held-out training images)"
    epochs = f"{record['settings']['epochs']} (kept: epoch {record['best_epoch']}, best validation accuracy)"
    command = f"`{record.get('command') or 'train_classifier(...)'}`"
    rows = [("test accuracy", test), ("validation accuracy", val), ("epochs", epochs),
            ("training time", mins), ("machine", record["machine"]), ("command", command)]
    head = ["# Digit classifier (judge of generated digits)", "",
            "Small CNN trained on real MNIST by `benchmarks/digit_classifier.py`; the epoch is chosen on the "
            "validation split only, the test split is only reported.", "", "| | |", "|---|---|"]
    return "\n".join(head + [f"| {k} | {v} |" for k, v in rows]) + "\n"


def report(record: dict) -> None:
    """Print the accuracies and training time of a record."""
    print(f"test accuracy {100 * record['test_accuracy']:.2f} %, "
          f"validation accuracy {100 * record['val_accuracy']:.2f} % "
          f"(epoch {record['best_epoch']}/{record['settings']['epochs']}), "
          f"training {record['train_seconds']:.0f} s wall, {record['cpu_seconds']:.0f} s CPU")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: where the data and the weights are, the epochs, seed and threads."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST IDX files (default: $AAE_DATA_DIR, else the download cache)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "digit-classifier" / "cnn.pt",
                   help="the weights + record file")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the batches")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p.parse_args(argv)


def finished_record(out_path: Path, wanted: dict) -> dict | None:
    """The record at ``out_path`` if a run with the ``wanted`` settings finished there, else None."""
    if not out_path.exists():
        return None
    record = load_checkpoint(out_path)["record"]
    if record["settings"] != wanted:
        print(f"{out_path} was trained with other settings ({record['settings']}): training again")
        return None
    print(f"{out_path} is already trained with these settings: skipping the training")
    return record


def main(argv: list[str] | None = None) -> dict:
    """Train (unless this run already finished), print the accuracies and write the results table."""
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/digit_classifier.py", *(sys.argv[1:] if argv is None else argv)])
    record = finished_record(args.out, settings(args.epochs, args.seed, None))
    if record is None:
        record = train_classifier(args.data_dir, args.out, args.epochs, args.seed, args.threads, command=command)
    report(record)
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(results_markdown(record))
    return record


if __name__ == "__main__":
    main()
