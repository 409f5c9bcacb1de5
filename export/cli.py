"""`aae-export`: checkpoint -> encoder.onnx + decoder.onnx. A thin layer over `export_checkpoint`."""

from __future__ import annotations

import warnings

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from aae_runtime.calibration import DEFAULT_PERCENTILE
from aae_runtime.clierrors import OneLineErrorsTyper, print_error
from aae_runtime.console import literal
from aae_runtime.contract.errors import AAEError
from aae_runtime.contract.scores import DEFAULT_SCORE, SCORES
from aae_runtime.contract.tiling import DEFAULT_SMOOTH_SIGMA, MAX_SIGMA

app = OneLineErrorsTyper(add_completion=False, no_args_is_help=True, help="Export a trained AAE to ONNX.")  # unexpected errors: one line, exit 2
err = Console(stderr=True, soft_wrap=True)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint.pt written by aae-train (or its run folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write (its parent must exist; refused if it holds a model, unless --overwrite).")] = Path("model"),
    data_dir: Annotated[Optional[Path], typer.Option(help="Where the training data is now, if it moved since training.")] = None,
    score: Annotated[Optional[str], typer.Option(help=f"Anomaly score: {', '.join(SCORES)} (see aae_runtime/contract/scores.py; "
                                             f"benchmarks/results/one_class.md compares them). Default {DEFAULT_SCORE}; a model "
                                             "trained with --crop: mse (its score is the maximum of its tiled map).")] = None,
    percentile: Annotated[float, typer.Option(min=0.001, max=100.0, help="Threshold = this percentile of held-out normal scores.")] = DEFAULT_PERCENTILE,
    anomalies: Annotated[Optional[list[Path]], typer.Option(
        help="Labelled anomalous images (file or folder; repeatable): the threshold becomes F1-optimal.")] = None,
    fused: Annotated[bool, typer.Option(help="Also write scorer.onnx: image -> score parts and error map in one call.")] = True,
    quantize: Annotated[Optional[str], typer.Option(help="int8: static QDQ quantisation calibrated on held-out normal images (CPU speed).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 (float16 weights and ops for GPUs; inputs and outputs stay float32).")] = "fp32",
    map_sigma: Annotated[float, typer.Option(min=0.0, max=MAX_SIGMA, help="Models trained with --crop: smoothing of the defect map, in pixels.")] = DEFAULT_SMOOTH_SIGMA,
    tile_stride: Annotated[Optional[int], typer.Option(min=1, max=4096, help="Models trained with --crop: pixels between tiles (default: half a tile).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the model that --out already holds (else refused).")] = False,
) -> None:
    """Export, verify (ONNX checker, parity with PyTorch) and calibrate the anomaly threshold."""
    if score is not None and score not in SCORES:
        raise typer.BadParameter(f"{score!r} is not one of {', '.join(SCORES)}", param_hint="--score")
    if quantize not in (None, "int8"):
        raise typer.BadParameter(f"{quantize!r}: the only quantisation is int8", param_hint="--quantize")
    if precision not in ("fp32", "fp16"):
        raise typer.BadParameter(f"{precision!r} is not one of fp32, fp16", param_hint="--precision")
    if quantize and precision != "fp32":
        raise typer.BadParameter("use either --quantize int8 or --precision fp16, not both", param_hint="--quantize")
    from aae_runtime.install import check_training

    try:
        check_training("aae-export", export=True)
        from aae_train.data import DataWarning
        from export.onnx_export import export_checkpoint  # torch loads only once arguments are valid

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)  # e.g. unreadable files skipped: one line each, not Python's form
            result = export_checkpoint(checkpoint, out, data_dir=str(data_dir) if data_dir else None, score=score,
                                       percentile=percentile, log=lambda s: err.print(literal(s), highlight=False),
                                       variant=quantize or precision, fused=fused, anomalies=anomalies,
                                       map_sigma=map_sigma, tile_stride=tile_stride, overwrite=overwrite)
        for w in caught:
            if issubclass(w.category, DataWarning):
                err.print(f"[yellow]warning:[/yellow] {literal(str(w.message))}", highlight=False)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except AAEError as exc:
        print_error(str(exc), err)  # literal text: paths may hold "[/]"
        raise typer.Exit(2)
    written = [result.encoder, result.decoder] + ([result.scorer] if result.scorer else [])
    err.print(f"wrote {literal(result.out_dir)}: {', '.join(p.name for p in written)} (version {written[0].parent.name})",
              highlight=False)
