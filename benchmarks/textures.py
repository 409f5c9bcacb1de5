"""Defect detection on real texture photographs, through the real pipeline (aae-train folder --crop,
aae-export, the runtime's tiled scoring).

Data (benchmarks/texture_defects.py): each of scikit-image's 512 x 512 photographs (grass,
gravel, brick) is cut into disjoint bands: the top 384 rows are the one training photo (the
trainer holds out its bottom 96 rows itself, for validation and the threshold), the bottom 128
rows give the test windows: ``--test-images`` windows of 72 x 72 at random places (they may
overlap each other, never the training or validation rows), half normal, half with one synthetic
defect each (scratch, hole, foreign material, blur, stain) and its ground-truth mask. Another
material: ``--textures`` also takes paths of one's own photographs (any format the runtime reads,
converted to grayscale, at least 288 rows and 72 columns), cut into the same bands by the same
fractions of their rows and named by their file's stem.

For each texture and recipe: train (``aae-train folder DIR --crop 64 ...``), export (the
threshold is the 99th percentile of held-out windows' scores), score every test window with
the runtime and report image AUROC, pixel AUROC (every pixel of every test window; normal
windows are all-normal pixels), detection per defect kind, and the false-alarm and detection
rates at the exported threshold, each with a bootstrap 95 % interval over test windows, and the
mean over textures. Nothing here reads a test label before the final figures; the recipes were
not tuned on the test windows.

Resumable: runs live in ``runs/textures/<texture>/<recipe>``; a finished run is not retrained.

    python benchmarks/textures.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
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

from aae_runtime.contract.modelfolder import holds_model  # noqa: E402
from benchmarks.texture_defects import KINDS, TEXTURES, load_texture, make_test_set, read_test_set, split_regions, \
    texture_name, write_test_set  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CROP = 64
TEST_SIZE = 72  # = the threshold windows of the held-out band (3/4 of its 96 rows): test and threshold windows alike
# name -> (aae-train options after `folder DIR --crop 64`, aae-export options)
DRAEM_TRAIN = ["--family", "draem", "--arch", "conv", "--latent-dim", "32", "--recon-loss", "mse", "--ema", "0.995"]
RECIPES = {
    "ae": (["--family", "ae"], []),  # the plain autoencoder: what the adversary buys
    "aae": ([], []),  # the product's defaults (bce loss, 16-d code), scored with the tiled default (mse)
    "aae-ssim-score": ([], ["--score", "ssim"]),  # the same checkpoint as "aae", scored by 1 - SSIM
    "aae-ssim-loss": (["--recon-loss", "ssim"], ["--score", "ssim"]),  # Bergmann et al.: SSIM loss and score
    "aae-crop32": (["--crop", "32", "--latent-dim", "32", "--recon-loss", "mse", "--prior-std", "1"], []),  # smaller tiles
    "ae-crop32": (["--family", "ae", "--crop", "32", "--latent-dim", "32", "--recon-loss", "mse"], []),  # ... without the adversary
    # reconstruction + a segmenter trained on synthetic defects (DRAEM-like); batches of 32 and weight
    # averaging: the same number of crops, three times the updates. Maps smoothed by 2 px, not 4: the
    # segmenter's maps are smooth already (chosen on the validation band: benchmarks/textures_sigma.py)
    "draem": (DRAEM_TRAIN + ["--batch-size", "32"], ["--map-sigma", "2"]),
    "draem-b16": (DRAEM_TRAIN + ["--batch-size", "16"], ["--map-sigma", "2"]),  # ... batches of 16 (screened, not kept)
    "draem-w32": (DRAEM_TRAIN + ["--batch-size", "32", "--segment-width", "32"], ["--map-sigma", "2"]),  # ... a twice wider segmenter (screened, not kept)
    # ... crops cut at 0.8 to 1.25 times their side and resized (--augment scale): a part nearer to or
    # farther from the camera, as brick's perspective photo is from its top rows to its bottom ones
    "draem-scale": (DRAEM_TRAIN + ["--batch-size", "32", "--augment", "scale"], ["--map-sigma", "2"]),
    "draem-image": (["--family", "draem", "--segment-input", "image", "--recon-loss", "mse", "--batch-size", "32",
                     "--ema", "0.995"], ["--map-sigma", "2"]),  # ... the segmenter sees the crop alone
}
SHARED_TRAIN = {"aae-ssim-score": "aae"}  # recipe -> recipe whose checkpoint it re-exports
# recipe -> (candidate recipes, validation figure): per texture, the candidate whose run reached the
# lowest figure on its held-out band (the one best.pt is chosen by) is scored, the way a user picks
# among trainings of their part without looking at defects they have not seen yet
CHOSEN = {"draem-chosen": (("draem", "draem-b16", "draem-scale"), "val_segment_loss"),
          "draem-chosen-zoom": (("draem", "draem-scale"), "val_segment_loss")}  # with or without zoomed crops
PUBLISHED = ["MVTec AD textures, mean pixel AUROC (another data set; context only): AE with SSIM loss about 0.78 "
             "(Bergmann et al. 2019), RIAD about 0.94, DRAEM about 0.97."]
TARGETS = {"image_auroc": 0.95, "pixel_auroc": 0.95, "false_alarm_rate": 0.02}


def shown(path: Path) -> str:
    """A path as the report's command gives it: from the repository root when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def build_data(texture: str, root: Path, n_test: int, seed: int) -> Path:
    """The training photo and test windows of ``texture`` (a name or a photo's path, see
    `load_texture`) under ``root`` (skipped when already there)."""
    if (root / "test" / "index.csv").exists():
        return root
    photo = load_texture(texture)
    bands = split_regions(photo)
    if min(bands["test"].shape) < TEST_SIZE:
        sys.exit(f"{texture}: a {photo.shape[0]} x {photo.shape[1]} photograph is too small: its bottom quarter must hold "
                 f"{TEST_SIZE} x {TEST_SIZE} test windows (at least {math.ceil(TEST_SIZE / 0.25)} rows and {TEST_SIZE} columns)")
    from PIL import Image

    (root / "train").mkdir(parents=True, exist_ok=True)
    Image.fromarray(bands["trainval"], mode="L").save(root / "train" / f"{texture_name(texture)}.png")
    write_test_set(make_test_set(bands["test"], n_test, TEST_SIZE, seed), root / "test")
    return root


def train_and_export(args, texture: str, recipe: str, data: Path) -> tuple[Path, float]:
    """The model folder of ``recipe`` on ``texture`` and its training time (s), trained if not yet."""
    run = args.work_dir / texture / SHARED_TRAIN.get(recipe, recipe)
    model = args.work_dir / texture / recipe / "model"
    train_opts, export_opts = RECIPES[SHARED_TRAIN.get(recipe, recipe)][0], RECIPES[recipe][1]
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    timing = run / "train_seconds.txt"
    if not timing.exists():
        crop = [] if "--crop" in train_opts else ["--crop", str(CROP)]
        cmd = ["aae-train", "folder", str(data / "train"), *crop, "--val-fraction", "0.25",
               "--crops-per-image", str(args.crops), "--epochs", str(args.epochs), "--threads", str(args.threads),
               "--seed", str(args.seed), *train_opts, "--out", str(run)]
        before = 0.0  # seconds of the epochs an earlier, interrupted or shorter, invocation trained
        if (run / "checkpoint.pt").exists():
            cmd = ["aae-train", "folder", str(data / "train"), "--resume", str(run / "checkpoint.pt"), "--out", str(run),
                   "--epochs", str(args.epochs), "--threads", str(args.threads)]  # goes on to --epochs (a longer run too)
            before = epoch_seconds(run / "metrics.jsonl")
        print("$", shlex.join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
        timing.write_text(f"{before + time.perf_counter() - start:.1f}\n")
    if not holds_model(model):
        cmd = ["aae-export", "--checkpoint", str(run / "best.pt"), "--out", str(model), *export_opts]
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    return model, float(timing.read_text())


def choose(args, texture: str, recipe: str, data: Path) -> tuple[str, dict[str, float], Path, float]:
    """(the candidate of a CHOSEN recipe with the lowest validation figure, every candidate's
    figure, the chosen one's model folder, the training seconds of all candidates): every
    candidate is trained, then one is kept."""
    candidates, figure = CHOSEN[recipe]
    trained = {c: train_and_export(args, texture, c, data) for c in candidates}
    best = {c: best_figure(args.work_dir / texture / SHARED_TRAIN.get(c, c) / "metrics.jsonl", figure) for c in candidates}
    pick = min(candidates, key=best.__getitem__)
    print(f"{recipe} {texture}: " + ", ".join(f"{c} {figure} {best[c]:.4f}" for c in candidates) + f": {pick}", flush=True)
    return pick, best, trained[pick][0], sum(secs for _, secs in trained.values())


def best_figure(metrics: Path, figure: str) -> float:
    """The lowest ``figure`` a run's metrics.jsonl records."""
    return min(json.loads(line)[figure] for line in metrics.read_text().splitlines() if line.strip())


def epoch_seconds(metrics: Path) -> float:
    """The training seconds of the epochs a run's metrics.jsonl records (0 if none)."""
    if not metrics.exists():
        return 0.0
    return sum(json.loads(line).get("seconds", 0.0) for line in metrics.read_text().splitlines() if line.strip())


def score_test_set(model_dir: Path, test: Path) -> dict:
    """Per test window: score, flag, map; with the ground truth, in index order."""
    from aae_runtime import AAEModel

    model = AAEModel.load(model_dir, device="cpu")
    images = read_test_set(test)
    paths = [test / ("normal" if im.kind is None else "anomalous") / f"{im.name}.png" for im in images]
    rows = {Path(r.path).name: r for r in model.iter_score_paths(paths, maps=True)}
    out = {"score": [], "flag": [], "kind": [], "maps": [], "masks": []}
    for im in images:
        r = rows[f"{im.name}.png"]
        out["score"].append(r.score)
        out["flag"].append(r.anomaly)
        out["kind"].append(im.kind)
        out["maps"].append(r.pixel_error.astype(np.float32))
        out["masks"].append(im.mask)
    out["threshold"] = model.threshold
    return out


def figures(s: dict, idx: np.ndarray) -> dict:
    """The reported figures of the test windows ``idx`` (a bootstrap resample, or all)."""
    from aae_runtime.regions import auroc

    score, flag = np.asarray(s["score"])[idx], np.asarray(s["flag"])[idx]
    kind = [s["kind"][i] for i in idx]
    bad = np.array([k is not None for k in kind])
    f = {"image_auroc": auroc(score, bad),
         "pixel_auroc": auroc(np.concatenate([s["maps"][i].ravel() for i in idx]),
                              np.concatenate([s["masks"][i].ravel() for i in idx])),
         "false_alarm_rate": float(flag[~bad].mean()), "detection_rate": float(flag[bad].mean())}
    for k in KINDS:
        sel = np.array([x == k for x in kind])
        f[f"detected_{k}"] = float(flag[sel].mean()) if sel.any() else float("nan")
        f[f"auroc_{k}"] = auroc(np.concatenate([score[~bad], score[sel]]),
                                np.concatenate([np.zeros((~bad).sum(), bool), np.ones(sel.sum(), bool)])) if sel.any() else float("nan")
    return f


def bootstrap(per_texture: list[dict], reps: int, seed: int) -> dict:
    """Point figures and 95 % intervals per texture and for the mean over textures (windows resampled within each texture)."""
    rng = np.random.default_rng(seed)
    points = [figures(s, np.arange(len(s["score"]))) for s in per_texture]
    draws = []
    for _ in range(reps):
        draws.append([figures(s, _resample(s, rng)) for s in per_texture])
    keys = points[0].keys()
    result = {"per_texture": [], "mean": {}}
    for t, p in enumerate(points):
        result["per_texture"].append({k: _interval(p[k], [d[t][k] for d in draws]) for k in keys})
    for k in keys:
        result["mean"][k] = _interval(float(np.mean([p[k] for p in points])), [float(np.mean([d[t][k] for t in range(len(points))])) for d in draws])
    return result


def _resample(s: dict, rng: np.random.Generator) -> np.ndarray:
    """A bootstrap resample of one texture's windows (indices) holding normal and defective ones
    alike, which AUROC needs: a resample of a few windows may miss one (of 240, never)."""
    bad = np.array([k is not None for k in s["kind"]])
    while True:
        idx = rng.integers(0, len(bad), len(bad))
        if bad[idx].any() and not bad[idx].all():
            return idx


def _interval(point: float, samples: list[float]) -> dict:
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return {"value": float(point), "ci95": [float(lo), float(hi)]}


def markdown(report: dict) -> str:
    lines = [f"# Defect detection on real texture photographs ({', '.join(report['textures'])})", "",
             f"Machine: {report['machine']}. {report['test_images']} test windows of {TEST_SIZE} x {TEST_SIZE} per texture "
             f"(half with one defect); crops {CROP} x {CROP} (32 x 32 for the *-crop32 recipes), {report['epochs']} epochs of {report['crops']} crops, one thread. "
             "Figures: value [bootstrap 95 % interval over test windows]. Threshold: the exported one (99th percentile "
             "of held-out windows).", "",
             "| recipe | texture | image AUROC | pixel AUROC | false alarms | detections | " + " | ".join(KINDS) + " | train s |",
             "|---|---|---|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for name, r in report["recipes"].items():
        rows = list(zip(report["textures"], r["per_texture"])) + [("**mean**", r["mean"])]
        for tex, f in rows:
            cells = [_cell(f["image_auroc"]), _cell(f["pixel_auroc"]), _cell(f["false_alarm_rate"], pct=True),
                     _cell(f["detection_rate"], pct=True)] + [f"{f[f'detected_{k}']['value']:.0%}" for k in KINDS]
            secs = r["train_seconds"].get(tex, "")
            label = f"{name}: {r['chosen'][tex]}" if tex in r.get("chosen", {}) else name
            lines.append(f"| {label} | {tex} | " + " | ".join(cells) + f" | {secs} |")
    for name, r in report["recipes"].items():
        if "chosen" in r:
            lines += ["", f"{name}: per texture, the one of {', '.join(r['candidates'])} whose run reached the lowest "
                      f"{r['chosen_by']} (synthetic defects on the held-out band; no test window seen); its train s: all candidates'. "
                      "Their figures: " + "; ".join(f"{tex} " + ", ".join(f"{c} {v:.4f}" for c, v in r["validation"][tex].items())
                                                    for tex in r["chosen"]) + "."]
    lines += ["", f"Targets: image AUROC >= {TARGETS['image_auroc']}, pixel AUROC >= {TARGETS['pixel_auroc']}, "
              f"false alarms <= {TARGETS['false_alarm_rate']:.0%}.", ""] + [f"- {p}" for p in PUBLISHED]
    lines += ["", "Commands:", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def _cell(f: dict, pct: bool = False) -> str:
    fmt = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
    return f"{fmt(f['value'])} [{fmt(f['ci95'][0])}, {fmt(f['ci95'][1])}]"


def write_example(texture: str, out: Path, seed: int = 1) -> Path:
    """A 512 x 128 test photo for the README: the texture's whole test band with three defects
    (a hole, a scratch, a stain) in three places, and its mask (``masks/NAME`` beside it)."""
    from PIL import Image

    from benchmarks.texture_defects import DEFECTS

    band = split_regions(load_texture(texture))["test"].astype(np.float32) / 255  # rows never trained on
    mask = np.zeros(band.shape, bool)
    rng = np.random.default_rng(seed)
    for kind, left in (("hole", 40), ("scratch", 210), ("stain", 380)):
        window = band[16:112, left : left + 96]
        band[16:112, left : left + 96], m = DEFECTS[kind](window.copy(), rng)
        mask[16:112, left : left + 96] |= m
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(band * 255).astype(np.uint8), mode="L").save(out)
    (out.parent / "masks").mkdir(exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(out.parent / "masks" / out.name)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--textures", default=",".join(TEXTURES),
                   help="scikit-image's photographs (grass, gravel, brick), or paths of one's own, comma-separated")
    p.add_argument("--recipes", default=",".join([*RECIPES, *CHOSEN]))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--crops", type=int, default=2048, help="crops per epoch (the one training photo)")
    p.add_argument("--test-images", type=int, default=240)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "textures")
    p.add_argument("--name", default="textures", help="results file stem")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where NAME.json and NAME.md go")
    p.add_argument("--example", metavar="PNG", type=Path, help="only write the README's example photo (the first texture's) and stop")
    args = p.parse_args(argv)
    if args.test_images < 2 * len(KINDS):
        p.error(f"--test-images {args.test_images}: give at least {2 * len(KINDS)} (half normal, and every defect kind)")
    if args.example:
        print(write_example(args.textures.split(",")[0], args.example))
        return
    textures, recipes = args.textures.split(","), args.recipes.split(",")
    names = [texture_name(t) for t in textures]
    if len(set(names)) < len(names):
        p.error(f"--textures {args.textures}: two photographs of one name; their runs would share a folder")
    report = {"textures": names, "epochs": args.epochs, "crops": args.crops, "test_images": args.test_images,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, load {os.getloadavg()[0]:.1f}",
              "recipes": {}, "commands": [f"python benchmarks/textures.py --epochs {args.epochs} --crops {args.crops} "
                                          f"--recipes {args.recipes} --textures {args.textures}"
                                          + (f" --work-dir {shown(args.work_dir)}" if args.work_dir != REPO / "runs" / "textures" else "")
                                          + (f" --name {args.name}" if args.name != "textures" else "")]}
    for recipe in recipes:
        per_texture, seconds, chosen, validation = [], {}, {}, {}
        for spec, texture in zip(textures, names):
            data = build_data(spec, args.work_dir / texture / "data", args.test_images, args.seed)
            if recipe in CHOSEN:
                chosen[texture], validation[texture], model, secs = choose(args, texture, recipe, data)
            else:
                model, secs = train_and_export(args, texture, recipe, data)
            seconds[texture] = f"{secs:.0f}"
            per_texture.append(score_test_set(model, data / "test"))
            print(f"{recipe} {texture}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures(per_texture[-1], np.arange(args.test_images)).items()
                                                    if k in TARGETS or k == "detection_rate"), flush=True)
        if recipe in CHOSEN:
            options = {"chosen": chosen, "candidates": list(CHOSEN[recipe][0]), "chosen_by": CHOSEN[recipe][1],
                       "validation": validation}
        else:
            options = {"train_options": RECIPES[SHARED_TRAIN.get(recipe, recipe)][0], "export_options": RECIPES[recipe][1]}
        report["recipes"][recipe] = {**bootstrap(per_texture, args.bootstrap, args.seed), "train_seconds": seconds, **options}
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2))
        (args.results_dir / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
