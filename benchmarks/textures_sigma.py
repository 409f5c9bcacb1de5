"""How much to smooth a tiled model's map, chosen on the validation band, never on test windows.

A tiled model's map is its stitched per-pixel errors smoothed by a Gaussian of ``--map-sigma``
pixels (aae_runtime.contract.tiling), and the image score is the map's maximum. This script
takes the models `benchmarks/textures.py` trained (``--recipes``), cuts windows with synthetic
defects from each photograph's *validation* band (rows the weights were not fitted to and the
test never uses; another seed than the test windows), stitches each window's map once and
reports image and pixel AUROC for every sigma. The texture benchmark's recipes take the sigma
chosen here. ``--flips`` also compares test-time flips: the map averaged over the window's
mirror images (left-right; and up-down; and the quarter turns), each map turned back.

    python benchmarks/textures_sigma.py --recipes draem,draem-image

Writes benchmarks/results/NAME.{json,md} (``--name``, textures_sigma by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.texture_defects import TEXTURES, load_texture, make_test_set, split_regions, texture_name  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
VALIDATION_SEED = 123  # the test windows use another (textures.py --seed, 0)
WINDOW = 72  # as the test windows


# Test-time flips: the window's map averaged over mirror images of the window, each map turned
# back. Each entry: (turn, its inverse) pairs of (H, W) arrays; "none" is the runtime's map.
_TURNS = [(lambda a: a, lambda a: a), (np.fliplr, np.fliplr), (np.flipud, np.flipud),
          (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 2)), (np.transpose, np.transpose),
          (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)), (lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 1)),
          (lambda a: np.rot90(a, 2).T, lambda a: np.rot90(a.T, -2))]
FLIPS = {"none": 1, "mirror": 2, "mirrors": 4, "dihedral": 8}  # how many of _TURNS: left-right; and up-down; and the turns


def sweep(model_dir: Path, texture: str, n: int, sigmas: list[float], flips: list[str] = ("none",)) -> dict[str, dict[str, float]]:
    """sigma (or "FLIPS/sigma" for flips other than none) -> {"image_auroc", "pixel_auroc"} on
    ``n`` validation windows of ``texture``."""
    from aae_runtime import AAEModel
    from aae_runtime.contract.tiling import gaussian_smooth
    from aae_runtime.regions import auroc

    model = AAEModel.load(model_dir, device="cpu")
    windows = make_test_set(split_regions(load_texture(texture))["val"], n, WINDOW, VALIDATION_SEED)
    turns = _TURNS[: max(FLIPS[f] for f in flips)]

    def raw(image: np.ndarray) -> np.ndarray:
        return model.tiling.stitch(np.ascontiguousarray(image)[None], lambda t: model.score_parts(t).pixel_error, 64)

    raws = [[np.ascontiguousarray(back(raw(turn(w.image.astype(np.float32) / 255)))) for turn, back in turns] for w in windows]
    bad = np.array([w.kind is not None for w in windows])
    masks = np.concatenate([w.mask.ravel() for w in windows])
    out = {}
    for f in flips:
        for s in sigmas:
            averaged = [np.mean(r[: FLIPS[f]], axis=0) for r in raws]
            maps = [gaussian_smooth(r, s) if s > 0 else r for r in averaged]
            out[f"{s:g}" if f == "none" else f"{f}/{s:g}"] = {
                "image_auroc": auroc(np.array([m.max() for m in maps]), bad),
                "pixel_auroc": auroc(np.concatenate([m.ravel() for m in maps]), masks)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="draem,draem-image")
    p.add_argument("--textures", default=",".join(TEXTURES), help="as benchmarks/textures.py's")
    p.add_argument("--sigmas", default="0,1,2,4,8")
    p.add_argument("--flips", default="none", help=f"test-time flips to compare, of {', '.join(FLIPS)}")
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "textures")
    p.add_argument("--name", default="textures_sigma", help="results file name (benchmarks/results/NAME.{json,md})")
    args = p.parse_args(argv)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    flips = args.flips.split(",")
    if not set(flips) <= set(FLIPS):
        p.error(f"--flips {args.flips}: choose of {', '.join(FLIPS)}")
    columns = [f"sigma {s:g}" if f == "none" else f"{f}, sigma {s:g}" for f in flips for s in sigmas]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "windows": args.windows, "seed": VALIDATION_SEED,
              "results": {}}
    lines = ["# Map smoothing chosen on the validation band", "",
             f"{args.windows} windows of {WINDOW} x {WINDOW} per texture from the validation band (half with one synthetic "
             f"defect, seed {VALIDATION_SEED}; the test windows come from another band and seed). Image / pixel AUROC by "
             "`--map-sigma` (and, with `--flips`, with the map averaged over the window's mirror images).", "",
             "| recipe | texture | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for recipe in args.recipes.split(","):
        for spec in args.textures.split(","):
            texture = texture_name(spec)
            res = sweep(args.work_dir / texture / recipe / "model", spec, args.windows, sigmas, flips)
            report["results"][f"{recipe}/{texture}"] = res
            lines.append(f"| {recipe} | {texture} | " + " | ".join(f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f}"
                                                                 for r in res.values()) + " |")
            print(lines[-1], flush=True)
    command = ["python", "benchmarks/textures_sigma.py", "--recipes", args.recipes]
    if argv is None:
        command = ["python", "benchmarks/textures_sigma.py", *sys.argv[1:]]
    lines += ["", f"Produced by `{' '.join(command)}`.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
