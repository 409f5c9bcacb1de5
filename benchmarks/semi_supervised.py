"""Semi-supervised MNIST classification with the semi-supervised AAE (paper section 5, Table 2).

For each labelled-set size (100, 1,000, all) and each label draw (``--label-seed``; for "all"
the training seed varies instead), train ``aae-train mnist --family semi`` and report the MNIST
test error of the checkpoint the run kept (``best.pt``: the epoch with the lowest error on a
class-balanced labelled validation subset no larger than the labelled training set). Nothing
here reads a test label before the final error; no recipe, epoch or checkpoint is chosen on it.

Resumable: each run lives in ``runs/semi/<recipe>-<labels>-<draw>``; a finished run is skipped,
an interrupted one resumes from its last checkpoint. Results go to
benchmarks/results/semi_supervised.{json,md}; a size none of whose runs are in the work folder
keeps its rows from the file as it was (so sizes can be trained on different machines).

    python benchmarks/semi_supervised.py --data-dir ../shared/data/mnist --labels 100 --draws 3 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
# The documented recipe (aae-train options besides --labels, --label-seed, --seed, --epochs).
RECIPE = ["--latent-dim", "10", "--prior-std", "1", "--hidden", "1000"]
PAPER = {"100": "1.90 ± 0.10", "1000": "1.60 ± 0.08", "all": "0.85 ± 0.02"}  # % test error, paper Table 2
REIMPLEMENTATIONS = {"100": "about 5 (musyoku, hjweide, Naresh1318; thousands of epochs)"}


def run_dir(args, labels: str, draw: int) -> Path:
    return args.work_dir / f"{args.name}-{labels}-{draw}"


def command(args, labels: str, draw: int) -> list[str]:
    """The aae-train command of one run (a resumed run adds --resume; the config is kept)."""
    seed_opts = ["--label-seed", "0", "--seed", str(draw)] if labels == "all" else ["--label-seed", str(draw), "--seed", "0"]
    return ["aae-train", "mnist", "--data-dir", _shown(args.data_dir), "--family", "semi", "--labels", labels, *seed_opts,
            *args.recipe, "--epochs", str(args.epochs), "--threads", str(args.threads), "--device", "cpu",
            "--out", _shown(run_dir(args, labels, draw))]


def _shown(path: Path) -> str:
    """A path as the commands show it: relative to the repository root, where they are run."""
    return os.path.relpath(Path(path).resolve(), REPO)


def finished(path: Path, epochs: int | None = None) -> bool:
    """The run trained ``epochs`` (None: the epochs its own config asked for) and kept a best.pt."""
    metrics, config = path / "metrics.jsonl", path / "config.json"
    if not (metrics.exists() and config.exists() and (path / "best.pt").exists()):
        return False
    wanted = epochs if epochs is not None else json.loads(config.read_text())["train"]["epochs"]
    return len(metrics.read_text().splitlines()) >= wanted


def train_run(args, labels: str, draw: int) -> None:
    path = run_dir(args, labels, draw)
    if finished(path, args.epochs):
        return
    cmd = command(args, labels, draw)
    if (path / "checkpoint.pt").exists():
        cmd = ["aae-train", "mnist", "--resume", str(path.resolve() / "checkpoint.pt"), "--epochs", str(args.epochs),
               "--threads", str(args.threads), "--data-dir", str(args.data_dir.resolve()), "--out", str(path.resolve())]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PATH": _scripts_path()}, cwd=REPO)


def _scripts_path() -> str:
    return str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def test_error(path: Path, data_dir: Path) -> dict:
    """Test error (%) of the run's best.pt, and which epoch that is (chosen on validation alone)."""
    import torch

    from aae_runtime.contract.preprocessing import pixels_to_input
    from aae_train.checkpoint import BEST_NAME, load_trained
    from aae_train.data import MNIST_PREPROCESSING
    from aae_train.mnist import load_mnist

    trained = load_trained(path / BEST_NAME)
    images, labels = load_mnist(data_dir, "test")
    x = torch.from_numpy(pixels_to_input(images, MNIST_PREPROCESSING))
    with torch.no_grad():
        logits = torch.cat([trained.nets["encoder"].codes(b)[1] for b in x.split(1000)])
    classes = np.array([int(c) for c in trained.cfg.options.classes])
    predicted = classes[logits.argmax(1).numpy()]
    history = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    best = trained.state["best"]
    return {"test_error": float(100 * np.mean(predicted != labels)), "best_epoch": int(trained.state["epoch"]),
            "val_error": 100 * float(best["value"]), "val_labelled": history[-1]["val_labelled"],
            "epochs": len(history), "train_minutes": round(sum(m["seconds"] for m in history) / 60, 1)}


def summarise(args, label_sets: list[str]) -> dict:
    results = {}
    for labels in label_sets:
        runs = {}
        for draw in range(args.draws):
            path = run_dir(args, labels, draw)
            if finished(path):
                record = test_error(path, args.data_dir)
                record["command"] = shlex.join(command(args, labels, draw)).replace(f"--epochs {args.epochs}",
                                                                                  f"--epochs {record['epochs']}")
                runs[draw] = record
        errors = [r["test_error"] for r in runs.values()]
        results[labels] = {"runs": runs, "mean": float(np.mean(errors)) if errors else None,
                           "std": float(np.std(errors, ddof=1)) if len(errors) > 1 else None}
    return results


def previous_results(folder: Path) -> dict:
    """The results file's rows by labelled-set size, kept for the sizes whose runs are not in this
    work folder (trained on another machine or in a cleaned checkout); {} without a file."""
    path = folder / "semi_supervised.json"
    return json.loads(path.read_text())["results"] if path.exists() else {}


def write(results: dict, args) -> None:
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": args.recipe, "epochs": args.epochs, "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    (out / "semi_supervised.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = ["# Semi-supervised MNIST (semi-supervised AAE, paper section 5)", "",
             f"Recipe: `aae-train mnist --family semi {' '.join(args.recipe)}`, epochs per run in the table; "
             f"kept checkpoint: `best.pt` (lowest error on a labelled validation subset no larger than the labelled "
             f"training set). Machine: {meta['machine']} (CPU, `--threads {args.threads}`, runs side by side). "
             "Test labels are read only by the final error.", "",
             "| labels | ours: test error % (mean ± std) | runs | epochs kept (of trained) | training time per run | paper | re-implementations |",
             "|---|---|---|---|---|---|---|"]
    for labels, r in results.items():
        runs = r["runs"].values()
        mean = "—" if r["mean"] is None else f"{r['mean']:.2f}" + ("" if r["std"] is None else f" ± {r['std']:.2f}")
        kept = ", ".join(f"{x['best_epoch']} ({x['epochs']})" for x in runs)
        minutes = ", ".join(f"{x['train_minutes']:.0f} min" for x in runs)
        lines.append(f"| {labels} | {mean} | {len(r['runs'])} | {kept} | {minutes} | {PAPER.get(labels, '')} | "
                     f"{REIMPLEMENTATIONS.get(labels, '')} |")
    lines += ["", "Per run (test error %, validation error % on the labelled validation subset, command):", ""]
    for labels, r in results.items():
        for draw, x in r["runs"].items():
            lines.append(f"- {labels} labels, draw {draw}: test {x['test_error']:.2f}, validation {x['val_error']:.1f} "
                         f"({x['val_labelled']} labelled) at epoch {x['best_epoch']}: `{x['command']}`")
    (out / "semi_supervised.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--labels", default="100,1000,all", help="comma-separated labelled-set sizes (or all)")
    p.add_argument("--draws", type=int, default=3, help="label draws per size (seeds for all)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="recipe", help="name of the recipe's run folders")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "semi")
    p.add_argument("--recipe", default=shlex.join(RECIPE), help="aae-train options of the recipe")
    p.add_argument("--train-only", action="store_true", help="train the runs and stop (no test error)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for semi_supervised.{json,md}")
    p.add_argument("--only-draw", type=int, default=None, help="train only this draw (to run draws side by side)")
    args = p.parse_args(argv)
    args.recipe = shlex.split(args.recipe)
    args.data_dir = args.data_dir.resolve()  # the runs start in the repository root
    label_sets = [t.strip() for t in args.labels.split(",") if t.strip()]
    for labels in label_sets:
        for draw in range(args.draws):
            if args.only_draw is None or draw == args.only_draw:
                train_run(args, labels, draw)
    if not args.train_only:
        kept = previous_results(args.results)
        results = summarise(args, list(dict.fromkeys([*PAPER, *kept, *label_sets])))  # every size with finished runs
        results = {k: v if v["runs"] else kept[k] for k, v in results.items() if v["runs"] or k in kept}
        write(results, args)
        print(json.dumps({k: (v["mean"], v["std"]) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
