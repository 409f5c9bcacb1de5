"""`aae-train`: train an AAE. A thin layer over `aae_train.train.train`."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aae_runtime.clierrors import OneLineErrorsTyper, print_error
from aae_runtime.errors import AAEError
from aae_runtime.priors import PRIOR_NAMES, make_prior_spec
from aae_train.config import DEVICES, POSTERIORS, RECON_LOSSES, DataConfig, ModelConfig, RunConfig, TrainConfig

app = OneLineErrorsTyper(add_completion=False, no_args_is_help=True, help="Train Adversarial Autoencoders.")  # unexpected errors: one line, exit 2
err = Console(stderr=True, soft_wrap=True)


def _choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=name)
    return value


def _parse_classes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        digits = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give digits separated by commas, e.g. 0,3", param_hint="--classes") from None
    if not digits or any(d < 0 or d > 9 for d in digits):
        raise typer.BadParameter(f"{text!r}: digits must be 0-9, e.g. 0,3", param_hint="--classes")
    return digits


@app.command()
def mnist(
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder with the four MNIST IDX files (else $AAE_DATA_DIR, else the user cache, downloading).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default runs/mnist-DATE-TIME).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs to train (with --resume: the total).")] = TrainConfig.epochs,
    batch_size: Annotated[int, typer.Option(min=2, max=65536)] = TrainConfig.batch_size,
    latent_dim: Annotated[int, typer.Option(min=1, max=1024)] = ModelConfig.latent_dim,
    hidden: Annotated[int, typer.Option(min=1, help="Units per hidden layer.")] = ModelConfig.hidden,
    prior: Annotated[str, typer.Option(help=f"Latent prior: {'|'.join(PRIOR_NAMES)}.")] = "gaussian",
    prior_std: Annotated[float, typer.Option(min=1e-6, help="Std of the Gaussian prior (the paper: 5).")] = 5.0,
    posterior: Annotated[str, typer.Option(help=f"q(z|x): {'|'.join(POSTERIORS)}.")] = ModelConfig.posterior,
    lr_recon: Annotated[float, typer.Option(min=0, help="Adam learning rate, reconstruction phase.")] = TrainConfig.lr_recon,
    lr_disc: Annotated[float, typer.Option(min=0, help="Adam learning rate, discriminator.")] = TrainConfig.lr_disc,
    lr_gen: Annotated[float, typer.Option(min=0, help="Adam learning rate, encoder as generator.")] = TrainConfig.lr_gen,
    recon_loss: Annotated[str, typer.Option(help=f"Reconstruction loss: {'|'.join(RECON_LOSSES)}.")] = TrainConfig.recon_loss,
    classes: Annotated[Optional[str], typer.Option(help="Train on these digits only, e.g. 0,3.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=2, help="Use at most N training images.")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of the training images held out for validation and the threshold.")] = DataConfig.val_fraction,
    seed: Annotated[int, typer.Option(min=0)] = TrainConfig.seed,
    device: Annotated[str, typer.Option(help=f"{'|'.join(DEVICES)}")] = TrainConfig.device,
    resume: Annotated[Optional[Path], typer.Option(help="Continue from this checkpoint (its config is kept; --epochs sets the total).")] = None,
) -> None:
    """Train on MNIST (the default job)."""
    _choice(device, DEVICES, "--device")
    _choice(posterior, POSTERIORS, "--posterior")
    _choice(recon_loss, RECON_LOSSES, "--recon-loss")
    _choice(prior, PRIOR_NAMES, "--prior")
    try:
        spec = make_prior_spec(prior, latent_dim, std=prior_std)
        cfg = RunConfig(
            model=ModelConfig(image_shape=(1, 28, 28), latent_dim=latent_dim, hidden=hidden, posterior=posterior, prior=spec),
            data=DataConfig(source="mnist", classes=_parse_classes(classes), limit=limit, val_fraction=val_fraction),
            train=TrainConfig(epochs=epochs, batch_size=batch_size, lr_recon=lr_recon, lr_disc=lr_disc, lr_gen=lr_gen,
                              recon_loss=recon_loss, seed=seed, device=device),
        )
    except AAEError as exc:
        raise typer.BadParameter(str(exc)) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if out is None:
        out = resume.parent if resume is not None and resume.is_file() else (resume or Path("runs") / time.strftime("mnist-%Y%m%d-%H%M%S"))
    run(cfg, out, data_dir, resume)


def run(cfg: RunConfig, out: Path, data_dir: Path | None, resume: Path | None) -> None:
    """Train with a live progress bar; one-line errors, never a traceback."""
    from aae_train.train import train  # torch is imported only once arguments are valid

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(), console=err, transient=False,
    ) as progress:
        task = progress.add_task("starting", total=None, losses="")
        download = {}

        def on_download(name: str, done: int, total: int) -> None:
            if name not in download:
                download[name] = progress.add_task(f"download {name}", total=total or None, losses="")
            progress.update(download[name], completed=done)

        def on_start(trainer, n_train: int, n_val: int) -> None:
            err.print(f"training on {trainer.device}: {n_train} images, {n_val} held out; run folder {out}", highlight=False)

        def on_step(step: int, steps: int, losses) -> None:
            progress.update(task, completed=step, total=steps, losses=(
                f"recon {losses.recon:.4f}  D {losses.disc:.3f} (acc {losses.disc_acc:.2f})  G {losses.gen:.3f}"))

        def on_epoch(m: dict) -> None:
            if m["epoch"] < cfg.train.epochs:
                progress.update(task, description=f"epoch {m['epoch'] + 1}/{cfg.train.epochs}")
            progress.console.print(
                f"epoch {m['epoch']:>3}: recon {m['recon_loss']:.4f}  val {m['val_recon_loss']:.4f}  "
                f"D {m['disc_loss']:.3f} acc {m['disc_acc']:.2f}  G {m['gen_loss']:.3f}  {m['seconds']:.1f}s", highlight=False)

        progress.update(task, description=f"epoch 1/{cfg.train.epochs}")
        try:
            result = train(cfg, out, data_dir=str(data_dir) if data_dir else None, resume=resume,
                           on_epoch=on_epoch, on_step=on_step, on_start=on_start, download_progress=on_download)
        except AAEError as exc:
            progress.stop()
            print_error(str(exc), err)  # literal text: paths may hold "[/]"
            raise typer.Exit(2)
    err.print(f"checkpoint: {result.checkpoint}\nsamples: {out / 'samples.png'}  reconstructions: {out / 'reconstructions.png'}", highlight=False)


@app.command("demo-images")
def demo_images(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write digits/ and noise/ PNGs into.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder with the MNIST IDX files (as for `mnist`).")] = None,
    digits: Annotated[int, typer.Option(min=0, max=10000, help="MNIST test digits to write.")] = 8,
    noise: Annotated[int, typer.Option(min=0, max=10000, help="Uniform-noise images to write.")] = 4,
) -> None:
    """Write MNIST test digits and noise images as PNGs, to try `aae-run score` on."""
    from aae_train.demo import write_demo_images

    try:
        paths = write_demo_images(out, str(data_dir) if data_dir else None, digits, noise)
    except AAEError as exc:
        print_error(str(exc), err)  # literal text: paths may hold "[/]"
        raise typer.Exit(2)
    err.print(f"wrote {len(paths)} images under {out}", highlight=False)


@app.callback()
def _main() -> None:
    """Train Adversarial Autoencoders (Makhzani et al. 2015)."""
