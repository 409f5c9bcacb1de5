"""`aae-train`: train an AAE on MNIST or on a folder of images. A thin layer over `aae_train.train.train`."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
import warnings
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from aae_runtime.clierrors import OneLineErrorsTyper, print_error
from aae_runtime.console import counted, literal
from aae_runtime.contract.errors import AAEError, first_line
from aae_runtime.contract.fileio import DISK_ERRORS
from aae_runtime.contract.preprocessing import ORIENTATIONS
from aae_runtime.images import RESAMPLE
from aae_runtime.contract.priors import PRIOR_NAMES, make_prior_spec
from aae_train.config import (
    ARCHS, COMPILE_MODES, CUDA_GRAPH, DEVICES, LOADERS, LR_SCHEDULES, POSTERIORS, PRECISIONS, RECON_LOSSES, DataConfig, ModelConfig,
    RunConfig, TrainConfig,
)
from aae_train.crops import SCALE_RANGE, parse_augment
from aae_train.process import set_openmp_waiting
from aae_train.families import DEFAULT_FAMILY, FAMILY_MODULES, FAMILY_NAMES, get_family

app = OneLineErrorsTyper(add_completion=False, no_args_is_help=True, help="Train Adversarial Autoencoders.")  # unexpected errors: one line, exit 2
err = Console(stderr=True, soft_wrap=True)

# Options shared by `mnist` and `folder` (one definition each; defaults differ per command where noted).
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default runs/SOURCE-DATE-TIME).")]
Epochs = Annotated[int, typer.Option(min=1, help="Epochs to train (with --resume: the total).")]
BatchSize = Annotated[int, typer.Option(min=2, max=65536, help="Images per minibatch (each phase of a step sees one minibatch).")]
MNIST_LATENT, FOLDER_LATENT = ModelConfig.latent_dim, 16  # folder images (parts) carry more than a digit


def latent_dim_option(default: int):
    return Annotated[Optional[int], typer.Option(min=1, max=1024, help=f"Latent size (default: {default}; 2 for --prior swissroll).")]

Hidden = Annotated[int, typer.Option(min=1, help="Units per hidden fully connected layer (discriminator included).")]
Arch = Annotated[str, typer.Option(help=f"Encoder/decoder: {'|'.join(ARCHS)} (the discriminator is always an MLP).")]
Dropout = Annotated[float, typer.Option(min=0.0, max=0.95, help="Dropout in encoder and decoder hidden layers (training only).")]
Prior = Annotated[str, typer.Option(help=f"Latent prior: {'|'.join(PRIOR_NAMES)}.")]
PriorStd = Annotated[Optional[float], typer.Option(min=1e-6, help="gaussian: std of N(0, std^2 I) (the paper: 5).")]
MogComponents = Annotated[Optional[int], typer.Option(min=1, max=1000, help="mog: number of Gaussians on a circle.")]
MogRadius = Annotated[Optional[float], typer.Option(min=0.0, help="mog: radius of the circle.")]
MogStd = Annotated[Optional[float], typer.Option(min=1e-6, help="mog: std of each component.")]
UniformLow = Annotated[Optional[float], typer.Option(help="uniform: lower edge of the box.")]
UniformHigh = Annotated[Optional[float], typer.Option(help="uniform: upper edge of the box.")]
SwissTurns = Annotated[Optional[float], typer.Option(min=0.1, help="swissroll: turns of the spiral.")]
SwissRadius = Annotated[Optional[float], typer.Option(min=1e-6, help="swissroll: outer radius.")]
SwissNoise = Annotated[Optional[float], typer.Option(min=0.0, help="swissroll: std of the jitter around the curve.")]
Posterior = Annotated[str, typer.Option(help=f"q(z|x): {'|'.join(POSTERIORS)}.")]
NoiseDim = Annotated[int, typer.Option(min=1, max=1024, help="universal posterior: size of the noise fed to the encoder.")]
# max: far above any useful Adam rate (~1e-3) yet below where torch's Adam overflows (~1e37) and
# crashes; absurd rates are allowed so that a diverging run can be shown to stop cleanly.
LrRecon = Annotated[float, typer.Option(min=0, max=1e6, help="Adam learning rate, reconstruction phase.")]
LrDisc = Annotated[float, typer.Option(min=0, max=1e6, help="Adam learning rate, discriminator.")]
LrGen = Annotated[float, typer.Option(min=0, max=1e6, help="Adam learning rate, encoder as generator.")]
LrSchedule = Annotated[str, typer.Option(help=f"Learning-rate schedule over the epochs: {'|'.join(LR_SCHEDULES)}.")]
LrMinFactor = Annotated[float, typer.Option(min=1e-6, max=1.0, help="cosine: final lr = this x lr; step: x this at 1/2 and 3/4 of the epochs.")]
LabelSmoothing = Annotated[float, typer.Option(min=0.0, max=0.49, help="D stabiliser: target for prior samples is 1 - this.")]
DiscNoise = Annotated[float, typer.Option(min=0.0, help="D stabiliser: std of Gaussian noise added to D's inputs.")]
GradientPenalty = Annotated[float, typer.Option(
    min=0.0, help="D stabiliser: R1 gradient penalty gamma (gamma/2 * |grad D|^2 at prior samples); 0 = off.")]
DiscSteps = Annotated[int, typer.Option(min=1, max=100, help="Discriminator updates per minibatch (fresh prior samples each).")]
CodeNoise = Annotated[float, typer.Option(min=0.0, help="Std of Gaussian noise added to the codes the decoder reconstructs from (training only).")]
Ema = Annotated[float, typer.Option(min=0.0, max=0.99999, help="Keep a moving average of encoder + decoder weights with this decay (e.g. 0.999) and save it as the model; 0: off.")]
DiscDropout = Annotated[float, typer.Option(min=0.0, max=0.95, help="D stabiliser: dropout in D's hidden layers.")]
ReconLoss = Annotated[str, typer.Option(help=f"Reconstruction loss: {'|'.join(RECON_LOSSES)}.")]
Limit = Annotated[Optional[int], typer.Option(min=2, help="Use at most N training images.")]
ValFraction = Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of the images held out for validation and the threshold "
                                            "(never none: at least one image, or a single photo's band, even at 0).")]
Seed = Annotated[int, typer.Option(min=0, help="Seeds weights, shuffling, prior and noise draws (identical results on the CPU).")]
Device = Annotated[Literal[DEVICES], typer.Option(help="Training device; auto: CUDA when PyTorch sees a GPU.")]
Precision = Annotated[str, typer.Option(help=f"Arithmetic of the step's network passes: {'|'.join(PRECISIONS)} (bf16: "
                                         "bfloat16 autocast, for GPUs with bfloat16 units; weights and losses stay fp32).")]
CompileMode = Annotated[str, typer.Option("--compile", help=f"How the step runs: {'|'.join(COMPILE_MODES)} (torch.compile "
                                          "of the networks, or cuda-graph: the whole step as one CUDA graph; for GPUs, "
                                          "on the CPU compiling measured slower; does not change the model or its config).")]
Loader = Annotated[str, typer.Option(
    help="How the images are read: memory (decoded once, held in memory), stream (decoded from disk every epoch by "
         "--workers processes; for folders larger than memory) or auto (stream when the decoded images would take more "
         "than a quarter of the memory this process may use).")]
Workers = Annotated[Optional[int], typer.Option(min=0, max=64, help="Processes decoding a streamed folder (default: half the cores, 1 to 4; 0: none, in the training process).")]
Threads = Annotated[Optional[int], typer.Option(min=1, max=256, help="CPU threads for torch (default: as many as the cores other processes leave idle, measured every second).")]
FamilyOpt = Annotated[str, typer.Option("--family", help="Model family: " + "; ".join(
    f"{name}: {text}" for name, (_, text) in FAMILY_MODULES.items()) + ".")]
Labels = Annotated[Optional[str], typer.Option(help="semi: labelled training images, class-balanced (default 100), or all.")]
LabelSeed = Annotated[Optional[int], typer.Option(min=0, help="semi: seed of the labelled subset's draw (default 0).")]
ClassNoise = Annotated[Optional[float], typer.Option(min=0, max=10, help="semi: std of Gaussian noise on the labelled images of the classification step (default 0).")]
LrClass = Annotated[Optional[float], typer.Option(min=0, max=1e6, help="semi: Adam learning rate, supervised classification step (default 1e-3).")]
DefectShare = Annotated[Optional[float], typer.Option(min=0.01, max=0.99, help="draem: share of training crops given a synthetic defect (default 0.5).")]
SegmentWidth = Annotated[Optional[int], typer.Option(min=4, max=256, help="draem: the segmenter's channels at full resolution (default 16).")]
SegmentInput = Annotated[Optional[str], typer.Option(help="draem: what the segmenter sees: image+reconstruction (the default: the crop beside the autoencoder's reconstruction, DRAEM's design) or image.")]
LrSegment = Annotated[Optional[float], typer.Option(min=0, max=1e6, help="draem: Adam learning rate, segmenter (default 1e-3).")]
Resume = Annotated[Optional[Path], typer.Option(exists=True, help="Continue from this checkpoint (its config is kept; --epochs sets the total).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the run that --out already holds (else refused).")]
Nproc = Annotated[int, typer.Option(min=1, max=1024, help="Train with this many processes on this machine (torchrun, "
                                    "data parallel; --batch-size is the global minibatch). Several machines: torchrun -m aae_train.")]

# Options that only mean something for some families, by parameter name: given on the command
# line with another family they are an error, not silently ignored.
ADVERSARIAL_OPTIONS = ("prior", "prior_std", "mog_components", "mog_radius", "mog_std", "uniform_low", "uniform_high",
                       "swissroll_turns", "swissroll_radius", "swissroll_noise", "posterior", "noise_dim", "lr_disc",
                       "lr_gen", "label_smoothing", "disc_noise", "gradient_penalty", "disc_steps", "disc_dropout")
# Family options of the command line -> the family they belong to (its options dataclass has the field;
# --unlabelled-dir belongs to every family that trains on labelled and unlabelled images).
FAMILY_OPTIONS = {"labels": "semi", "label_seed": "semi", "lr_class": "semi", "class_noise": "semi", "unlabelled_dir": "semi",
                  "defect_share": "draem", "segment_width": "draem", "segment_input": "draem", "lr_segment": "draem"}

PRIOR_OPTIONS = {  # CLI option -> (prior it belongs to, parameter in the prior spec)
    "--prior-std": ("gaussian", "std"), "--mog-components": ("mog", "components"), "--mog-radius": ("mog", "radius"),
    "--mog-std": ("mog", "std"), "--uniform-low": ("uniform", "low"), "--uniform-high": ("uniform", "high"),
    "--swissroll-turns": ("swissroll", "turns"), "--swissroll-radius": ("swissroll", "radius"),
    "--swissroll-noise": ("swissroll", "noise"),
}


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


def parse_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); 'WIDTHxHEIGHT' (as image sizes are written, e.g. 96x64) -> (height, width)."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1 or max(values) > 4096:
        raise typer.BadParameter(f"{text!r}: give one side (64) or WIDTHxHEIGHT (96x64), 1 to 4096 pixels", param_hint="--size")
    width, height = (values[0], values[0]) if len(values) == 1 else values
    return height, width


def prior_spec(name: str, latent_dim: int, given: dict[str, float | None]) -> dict:
    """The prior spec of the CLI options; an option that belongs to another prior is an error, not ignored."""
    _choice(name, PRIOR_NAMES, "--prior")
    params = {}
    for option, value in given.items():
        if value is None:
            continue
        owner, key = PRIOR_OPTIONS[option]
        if owner != name:
            raise typer.BadParameter(f"applies to --prior {owner}, not {name}", param_hint=option)
        params[key] = value
    try:
        return make_prior_spec(name, latent_dim, **params)
    except (AAEError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--prior") from None


def build_config(*, data: DataConfig, image_shape: tuple[int, int, int], latent_dim: int | None, default_latent: int,
                 prior: str, prior_params: dict, arch: str, hidden: int, dropout: float, disc_dropout: float,
                 posterior: str, noise_dim: int, train: dict, family: str = DEFAULT_FAMILY, options=None) -> RunConfig:
    """Validate the options shared by all commands and assemble the run config (BadParameter on error)."""
    _choice(arch, ARCHS, "--arch")
    _choice(posterior, POSTERIORS, "--posterior")
    _choice(train["device"], DEVICES, "--device")
    _choice(train["recon_loss"], RECON_LOSSES, "--recon-loss")
    _choice(train["lr_schedule"], LR_SCHEDULES, "--lr-schedule")
    _choice(train["precision"], PRECISIONS, "--precision")
    if latent_dim is None:
        latent_dim = 2 if prior == "swissroll" else default_latent
    spec = prior_spec(prior, latent_dim, prior_params)
    try:
        return RunConfig(
            model=ModelConfig(image_shape=image_shape, latent_dim=latent_dim, arch=arch, hidden=hidden, dropout=dropout,
                              disc_dropout=disc_dropout, posterior=posterior, noise_dim=noise_dim, prior=spec),
            data=data,
            train=TrainConfig(**train),
            family=family,
            options=options,
        )
    except (AAEError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None


def _option_name(param: str) -> str:
    return "--" + param.replace("_", "-")


def check_given_values(ctx: typer.Context) -> None:
    """An --out that is the current folder (nan, inf and empty paths are refused for every
    command: aae_runtime.clierrors)."""
    if ctx.params.get("out") is not None and str(ctx.params["out"]) in ("", "."):
        raise typer.BadParameter("give the run folder's name (e.g. runs/first), not the current folder", param_hint="--out")


def family_options(ctx: typer.Context, family: str, values: dict):
    """The family's options dataclass from the CLI (``values``: its fields as given, None where not);
    an option given for another family is an error."""
    check_given_values(ctx)
    _choice(family, FAMILY_NAMES, "--family")
    given = [p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", "") in ("COMMANDLINE", "ENVIRONMENT")]
    kind = get_family(family)
    adversarial = [n for n in FAMILY_NAMES if get_family(n).adversarial]
    fields = {f.name for f in dataclass_fields(kind.options_class)}
    for param in given:
        if param in ADVERSARIAL_OPTIONS and not kind.adversarial:
            raise typer.BadParameter(f"applies to the families with a discriminator ({', '.join(adversarial)}), "
                                     f"not --family {family}", param_hint=_option_name(param))
        owner = FAMILY_OPTIONS.get(param)
        if owner is not None and param not in fields and not (param == "unlabelled_dir" and kind.allows_unlabelled and kind.uses_labels):
            raise typer.BadParameter(f"applies to --family {owner}, not {family}", param_hint=_option_name(param))
    chosen = {k: v for k, v in values.items() if v is not None and k in fields}
    if "labels" in chosen:
        chosen["labels"] = parse_labels(chosen["labels"])
    try:
        return kind.options_class(**chosen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_labels(text: str) -> int | None:
    """'100' -> 100; 'all' -> None (every label)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise typer.BadParameter(f"{text!r}: give a number of labelled images (e.g. 100) or all", param_hint="--labels")
    return value


def _default_out(prefix: str, resume: Path | None) -> Path:
    if resume is not None:
        return resume.parent if resume.is_file() else resume
    return Path("runs") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")


@app.command(short_help="Train on MNIST digits (the paper's setting).")
def mnist(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder with the four MNIST IDX files (else $AAE_DATA_DIR, else ../shared/data/mnist, else the user cache, downloading).")] = None,
    out: Out = None,
    epochs: Epochs = TrainConfig.epochs,
    batch_size: BatchSize = TrainConfig.batch_size,
    latent_dim: latent_dim_option(MNIST_LATENT) = None,
    arch: Arch = "mlp",
    hidden: Hidden = ModelConfig.hidden,
    dropout: Dropout = 0.0,
    prior: Prior = "gaussian",
    prior_std: PriorStd = None,
    mog_components: MogComponents = None,
    mog_radius: MogRadius = None,
    mog_std: MogStd = None,
    uniform_low: UniformLow = None,
    uniform_high: UniformHigh = None,
    swissroll_turns: SwissTurns = None,
    swissroll_radius: SwissRadius = None,
    swissroll_noise: SwissNoise = None,
    posterior: Posterior = ModelConfig.posterior,
    noise_dim: NoiseDim = ModelConfig.noise_dim,
    lr_recon: LrRecon = TrainConfig.lr_recon,
    lr_disc: LrDisc = TrainConfig.lr_disc,
    lr_gen: LrGen = TrainConfig.lr_gen,
    lr_schedule: LrSchedule = TrainConfig.lr_schedule,
    lr_min_factor: LrMinFactor = TrainConfig.lr_min_factor,
    label_smoothing: LabelSmoothing = 0.0,
    disc_noise: DiscNoise = 0.0,
    gradient_penalty: GradientPenalty = TrainConfig.gradient_penalty,
    disc_steps: DiscSteps = TrainConfig.disc_steps,
    code_noise: CodeNoise = TrainConfig.code_noise,
    ema: Ema = TrainConfig.ema,
    disc_dropout: DiscDropout = 0.0,
    recon_loss: ReconLoss = TrainConfig.recon_loss,
    classes: Annotated[Optional[str], typer.Option(help="Train on these digits only, e.g. 0,3.")] = None,
    limit: Limit = None,
    val_fraction: ValFraction = DataConfig.val_fraction,
    seed: Seed = TrainConfig.seed,
    device: Device = TrainConfig.device,
    precision: Precision = TrainConfig.precision,
    resume: Resume = None,
    overwrite: Overwrite = False,
    nproc: Nproc = 1,
    threads: Threads = None,
    compile_mode: CompileMode = "off",
    family: FamilyOpt = DEFAULT_FAMILY,
    labels: Labels = None,
    label_seed: LabelSeed = None,
    lr_class: LrClass = None,
    class_noise: ClassNoise = None,
) -> None:
    """Train on MNIST (28x28 grayscale digits; the paper's setting: 8-D Gaussian prior, std 5)."""
    options = family_options(ctx, family, dict(labels=labels, label_seed=label_seed, lr_class=lr_class, class_noise=class_noise))
    if prior == "gaussian" and prior_std is None:
        prior_std = 5.0  # the paper's MNIST likelihood model
    cfg = build_config(family=family, options=options,
        data=DataConfig(source="mnist", classes=_parse_classes(classes), limit=limit, val_fraction=val_fraction),
        image_shape=(1, 28, 28), latent_dim=latent_dim, default_latent=MNIST_LATENT,
        prior=prior, prior_params=_prior_params(locals()), arch=arch, hidden=hidden, dropout=dropout,
        disc_dropout=disc_dropout, posterior=posterior, noise_dim=noise_dim,
        train=dict(epochs=epochs, batch_size=batch_size, lr_recon=lr_recon, lr_disc=lr_disc, lr_gen=lr_gen,
                   lr_schedule=lr_schedule, lr_min_factor=lr_min_factor, label_smoothing=label_smoothing,
                   disc_noise=disc_noise, gradient_penalty=gradient_penalty, disc_steps=disc_steps,
                   code_noise=code_noise, ema=ema, recon_loss=recon_loss, seed=seed, device=device,
                   precision=precision),
    )
    _check_compile(compile_mode, nproc, device)
    out = out or _default_out("mnist", resume)
    if nproc > 1:
        _torchrun(nproc, _launch_batch(cfg, resume, ctx), device, out)
    run(cfg, out, data_dir, resume, threads, overwrite, given_options(ctx),
        compile_mode=compile_mode)


@app.command(short_help="Train on your own normal images or photos.")
def folder(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Folder of normal images (searched recursively; png, jpg, bmp, tif, webp, ...).")],
    size: Annotated[Optional[str], typer.Option(help="Resize every image to this: one side (64) or WIDTHxHEIGHT (96x64); default 64.")] = None,
    crop: Annotated[Optional[int], typer.Option(min=8, max=1024, help=(
        "Train on random CROP x CROP crops of whole photos at their own resolution (no resizing); aae-run then tiles "
        "whole photos into a full-resolution defect map. Excludes --size."))] = None,
    crops_per_image: Annotated[Optional[int], typer.Option(min=1, max=1_000_000, help=(
        "With --crop: crops drawn from each training photo per epoch (default: about 8192 an epoch in all)."))] = None,
    augment: Annotated[Optional[str], typer.Option(help=(
        "With --crop: random transforms the part allows, comma-separated: flip (mirror left-right and up-down), "
        f"rot90 (quarter turns), scale (each crop cut from a square {1 / SCALE_RANGE:g} to {SCALE_RANGE:g} times its side and resized: parts nearer "
        "to or farther from the camera). Default: none."))] = None,
    color: Annotated[str, typer.Option(help="L (grayscale) or RGB (either case).")] = "L",
    resample: Annotated[str, typer.Option(help=f"Resize filter: {'|'.join(RESAMPLE)}.")] = DataConfig.resample,
    orientation: Annotated[str, typer.Option(help=(
        "exif: turn each photo upright as its EXIF orientation tag says, as viewers show it (a phone's portrait photo "
        "is stored sideways); stored: take the pixels as stored (a camera that writes wrong tags). Scoring does the same."))] = DataConfig.orientation,
    out: Out = None,
    epochs: Epochs = 50,
    batch_size: BatchSize = 64,
    latent_dim: latent_dim_option(FOLDER_LATENT) = None,
    arch: Arch = "conv",
    hidden: Hidden = 512,
    dropout: Dropout = 0.0,
    prior: Prior = "gaussian",
    prior_std: PriorStd = None,
    mog_components: MogComponents = None,
    mog_radius: MogRadius = None,
    mog_std: MogStd = None,
    uniform_low: UniformLow = None,
    uniform_high: UniformHigh = None,
    swissroll_turns: SwissTurns = None,
    swissroll_radius: SwissRadius = None,
    swissroll_noise: SwissNoise = None,
    posterior: Posterior = ModelConfig.posterior,
    noise_dim: NoiseDim = ModelConfig.noise_dim,
    lr_recon: LrRecon = TrainConfig.lr_recon,
    lr_disc: LrDisc = TrainConfig.lr_disc,
    lr_gen: LrGen = TrainConfig.lr_gen,
    lr_schedule: LrSchedule = TrainConfig.lr_schedule,
    lr_min_factor: LrMinFactor = TrainConfig.lr_min_factor,
    label_smoothing: LabelSmoothing = 0.0,
    disc_noise: DiscNoise = 0.0,
    gradient_penalty: GradientPenalty = TrainConfig.gradient_penalty,
    disc_steps: DiscSteps = TrainConfig.disc_steps,
    code_noise: CodeNoise = TrainConfig.code_noise,
    ema: Ema = TrainConfig.ema,
    disc_dropout: DiscDropout = 0.0,
    recon_loss: ReconLoss = TrainConfig.recon_loss,
    limit: Limit = None,
    val_fraction: ValFraction = 0.2,
    seed: Seed = TrainConfig.seed,
    device: Device = TrainConfig.device,
    precision: Precision = TrainConfig.precision,
    resume: Resume = None,
    overwrite: Overwrite = False,
    nproc: Nproc = 1,
    threads: Threads = None,
    compile_mode: CompileMode = "off",
    loader: Loader = "auto",
    workers: Workers = None,
    family: FamilyOpt = DEFAULT_FAMILY,
    labels: Labels = None,
    label_seed: LabelSeed = None,
    lr_class: LrClass = None,
    class_noise: ClassNoise = None,
    unlabelled_dir: Annotated[Optional[str], typer.Option(
        help="semi: the sub-folder of DIRECTORY holding unlabelled images (the other sub-folders are the classes).")] = None,
    defect_share: DefectShare = None,
    segment_width: SegmentWidth = None,
    segment_input: SegmentInput = None,
    lr_segment: LrSegment = None,
) -> None:
    """Train on your own normal images: every image under DIRECTORY, resized as `aae-run` will resize it."""
    if resume is None and not directory.is_dir():
        raise typer.BadParameter(f"{directory} is not a folder: pass the folder of normal images", param_hint="DIRECTORY")
    color = {"l": "L", "rgb": "RGB"}.get(color.lower(), color)  # either case: the metadata's spelling
    _choice(color, ("L", "RGB"), "--color")
    _choice(loader, LOADERS, "--loader")
    _choice(resample, tuple(RESAMPLE), "--resample")
    _choice(orientation, ORIENTATIONS, "--orientation")
    if crop is not None and size is not None:
        raise typer.BadParameter("--crop and --size exclude each other: crops keep the photo's resolution, --size resizes",
                                 param_hint="--crop")
    if crop is None and resume is None and (crops_per_image is not None or augment is not None):  # resumed: the checkpoint's crop
        raise typer.BadParameter("needs --crop (crops of whole photos)", param_hint="--crops-per-image" if crops_per_image else "--augment")
    if crop is not None and family in ("supervised", "semi"):
        raise typer.BadParameter(f"--crop trains on unlabelled crops; --family {family} needs whole labelled images (use --size)",
                                 param_hint="--crop")
    try:
        augment_kinds = parse_augment(augment)
    except AAEError as exc:
        raise typer.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--augment") from None
    height, width = (crop, crop) if crop is not None else parse_size(size or "64")
    options = family_options(ctx, family, dict(labels=labels, label_seed=label_seed, lr_class=lr_class, class_noise=class_noise,
                                               defect_share=defect_share, segment_width=segment_width,
                                               segment_input=segment_input, lr_segment=lr_segment))
    if unlabelled_dir is not None:  # a direct sub-folder, by its name: "unsorted", "unsorted/" and "./unsorted" alike
        parts = [part for part in Path(unlabelled_dir).parts if part != "."]
        if len(parts) != 1 or parts[0] in ("..", "/") or parts[0].startswith(".") or Path(unlabelled_dir).is_absolute():
            raise typer.BadParameter(f"{unlabelled_dir!r}: name a sub-folder of DIRECTORY (e.g. unsorted), not a path",
                                     param_hint="--unlabelled-dir")
        unlabelled_dir = parts[0]
    if unlabelled_dir is not None and not (directory / unlabelled_dir).is_dir():
        raise typer.BadParameter(f"{directory / unlabelled_dir} is not a folder: name a sub-folder of DIRECTORY",
                                 param_hint="--unlabelled-dir")
    data = DataConfig(source="folder", path=str(directory), image_size=None if crop else (height, width), color_mode=color,
                      resample=resample, orientation=orientation, limit=limit, val_fraction=val_fraction,
                      unlabelled_dir=unlabelled_dir,
                      crop=crop, crops_per_image=crops_per_image, augment=augment_kinds)
    cfg = build_config(family=family, options=options,
        data=data, image_shape=(3 if color == "RGB" else 1, height, width), latent_dim=latent_dim, default_latent=FOLDER_LATENT,
        prior=prior, prior_params=_prior_params(locals()), arch=arch, hidden=hidden, dropout=dropout,
        disc_dropout=disc_dropout, posterior=posterior, noise_dim=noise_dim,
        train=dict(epochs=epochs, batch_size=batch_size, lr_recon=lr_recon, lr_disc=lr_disc, lr_gen=lr_gen,
                   lr_schedule=lr_schedule, lr_min_factor=lr_min_factor, label_smoothing=label_smoothing,
                   disc_noise=disc_noise, gradient_penalty=gradient_penalty, disc_steps=disc_steps,
                   code_noise=code_noise, ema=ema, recon_loss=recon_loss, seed=seed, device=device,
                   precision=precision),
    )
    _check_compile(compile_mode, nproc, device)
    out = out or _default_out("folder", resume)
    if directory.is_dir() and directory.resolve() in (out.resolve(), *out.resolve().parents):
        raise typer.BadParameter(f"the run folder {out} is inside {directory}: its checkpoints and plots would be read as "
                                 "training images (and a class) by the next run; choose an --out outside it",
                                 param_hint="--out")
    if nproc > 1:
        _torchrun(nproc, _launch_batch(cfg, resume, ctx), device, out)
    run(cfg, out, directory if directory.is_dir() else None, resume, threads, overwrite,
        given_options(ctx), loader, workers, compile_mode)


# metrics key -> (short name, format) for the progress bar and the per-epoch lines
SHOWN_LOSSES = {"recon_loss": ("recon", ".4f"), "disc_loss": ("D", ".3f"), "disc_acc": ("acc", ".2f"),
                "cat_disc_loss": ("Dy", ".3f"), "cat_disc_acc": ("acc", ".2f"), "gen_loss": ("G", ".3f"),
                "class_loss": ("CE", ".3f"), "segment_loss": ("seg", ".3f")}


def format_losses(losses: dict) -> str:
    return "  ".join(f"{SHOWN_LOSSES[k][0]} {v:{SHOWN_LOSSES[k][1]}}" for k, v in losses.items() if k in SHOWN_LOSSES)


def format_epoch(m: dict) -> str:
    """One epoch's line: the training losses, the validation loss and error where the family has them."""
    text = format_losses({k: m[k] for k in SHOWN_LOSSES if k in m})
    recon, rest = text.split("  ", 1) if "  " in text else (text, "")
    val = f"  val {m['val_recon_loss']:.4f}" + (f"  val error {m['val_error']:.2%}" if "val_error" in m else "")
    val_segment = f"  val seg {m['val_segment_loss']:.3f}" if "val_segment_loss" in m else ""
    return recon + val + ("  " + rest if rest else "") + val_segment


def _prior_params(options: dict) -> dict[str, float | None]:
    """The prior options of a command's locals(), keyed by their CLI names."""
    return {opt: options[opt[2:].replace("-", "_")] for opt in PRIOR_OPTIONS}


class RunElapsedColumn(ProgressColumn):
    """Time since the run started. Rich's TimeElapsedColumn stops a task's clock the first time it
    completes (the end of epoch 1), and the bar's one task is reused for every epoch."""

    def __init__(self, clock=time.monotonic):
        super().__init__()
        self.clock, self.start = clock, clock()

    def render(self, task) -> Text:
        seconds = int(self.clock() - self.start)
        return Text(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.elapsed")


def _check_compile(mode: str, nproc: int, device: str) -> None:
    _choice(mode, COMPILE_MODES, "--compile")
    if mode == CUDA_GRAPH and (nproc > 1 or device == "cpu"):
        raise typer.BadParameter(f"{CUDA_GRAPH} captures the step on one GPU: use it with --device cuda (or auto on a GPU) "
                                 "and one process, or choose another mode", param_hint="--compile")


def _launch_batch(cfg: RunConfig, resume: Path | None, ctx: typer.Context) -> int | None:
    """The global minibatch the ranks will train with, as far as the launcher knows it: a resumed
    run keeps its checkpoint's (None: the ranks check it, once they have read the checkpoint)."""
    return cfg.train.batch_size if resume is None or "batch_size" in given_options(ctx) else None


def _torchrun(nproc: int, batch_size: int | None, device: str, run_dir: Path | None = None) -> None:
    """This command again, as ``nproc`` processes under torchrun (PyTorch's launcher); exits with its
    code. ``run_dir``: the run folder, for the checkpoint a stopped run can go on from."""
    import sys

    from aae_train.distributed import launched_by_torchrun

    if launched_by_torchrun():
        return
    _check_process_count(nproc, device)
    if batch_size is not None and batch_size % nproc:
        raise typer.BadParameter(f"{batch_size} does not split evenly over {nproc} processes: choose a multiple of {nproc}",
                                 param_hint="--batch-size")
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    if run_dir is not None and not any(a in ("--out", "-o") or a.startswith("--out=") for a in args):
        args += ["--out", str(run_dir)]  # the launcher's default (a time stamp), not one of each rank's
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    # Rank 0 says what went wrong in one line; the other ranks, which mostly fail the same way
    # (the same data, the same checkpoint), leave their lines in RANK_ERRORS, and those that
    # differ from rank 0's are printed here. torchrun's own report of a failed rank (its log
    # lines, a traceback of the launcher, a summary table) would only bury them: it is silenced
    # and caught. OMP_NUM_THREADS=1 is what torchrun sets for several processes anyway (each
    # rank then takes --threads), set here so that it does not warn about it. torchrun's own log
    # folder (empty unless it redirects output) goes inside the same temporary folder: by default
    # it makes one in the system's temporary folder on every run and never removes it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in [*logging.Logger.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith(("torch.distributed.run", "torch.distributed.elastic")):  # each module's own logger has
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its own level ("Received 2 death signal" leaked)
    _remove_orphaned_rank_folders(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{RANKS_PREFIX}{os.getpid()}-") as errors:
        os.environ[RANK_ERRORS] = errors
        try:
            torchrun(parse_args(["--standalone", f"--nproc-per-node={nproc}", f"--log-dir={Path(errors, 'torchrun')}",
                                 "-m", "aae_train", *args]))
        except ChildFailedError as exc:  # one line saying why, and the exit code that goes with it
            codes = {rank: f.exitcode for rank, f in exc.failures.items()}
            raise typer.Exit(_report_failed_ranks(codes, Path(errors), run_dir)) from None
        except SignalException as exc:  # Ctrl-C or SIGTERM to this launcher: the ranks were stopped with it
            raise typer.Exit(128 + int(exc.sigval)) from None
        finally:
            os.environ.pop(RANK_ERRORS, None)
    raise typer.Exit(0)


RANK_ERRORS = "AAE_RANK_ERRORS"  # set by --nproc: the folder where each rank leaves its error line (rank<N>.txt)
RANKS_PREFIX = "aae-ranks-"  # that folder's name in the temporary folder: the prefix, the launcher's pid, a random part
PRINTED = "!"  # after a rank's exit code in its file: it printed the line itself
SIGNAL_EXITS = (129, 130, 143)  # SIGHUP, Ctrl-C, SIGTERM: a rank stopped by one, which said so itself


def _remove_orphaned_rank_folders(tmp: Path) -> None:
    """The rank folders of launchers that died without removing theirs (SIGKILL): their pid is gone."""
    import shutil

    for folder in tmp.glob(RANKS_PREFIX + "*-*"):
        pid = folder.name[len(RANKS_PREFIX):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _report_failed_ranks(codes: dict[int, int], folder: Path, run_dir: Path | None) -> int:
    """Say why a run of several processes failed, once, and return its exit code. ``codes``: rank
    -> exit code (negative: killed by that signal), also of the ranks torchrun stopped (SIGTERM)
    once the first had failed; ``folder``: the lines (and codes) the ranks left themselves
    (`_leave_rank_error`: rank 0 printed its own). In turn: a rank's own error (bad input, a
    file gone) is the cause; else a rank killed from outside (SIGKILL, the OOM killer), named
    with its signal and the checkpoint to go on from; else a stop by a signal (Ctrl-C, SIGTERM,
    SIGHUP): rank 0 said which epoch its checkpoint holds, or the rank stopped is named."""
    left = _rank_lines(folder)
    lost = {rank for rank, (_, line, _) in left.items() if line.startswith(PEER_LOST)}
    own = {rank: code for rank, (code, line, _) in left.items() if rank not in lost and code not in SIGNAL_EXITS}
    own |= {rank: code for rank, code in codes.items()  # failed on its own without a line (its output says why)
            if rank not in left and code > 0 and code not in SIGNAL_EXITS}
    if own:
        _print_other_ranks_errors(left)
        return own[min(own)]
    asked = {-signal.SIGTERM, -signal.SIGINT, -getattr(signal, "SIGHUP", signal.SIGTERM)}  # what torchrun and users send
    killed = [(rank, code) for rank, code in sorted(codes.items()) if code < 0 and code not in asked]
    interrupted = [(rank, code) for rank, code in sorted(codes.items())
                   if rank not in lost and (rank, code) not in killed and (code in asked or code in SIGNAL_EXITS)]
    said = 0 in left and 0 not in lost  # rank 0 stopped by a signal said so, with its checkpoint
    named = killed or ([] if said else [(r, c) for r, c in interrupted if r not in left])
    hint = _resume_hint(run_dir)
    for rank, code in named:
        number = -code if code < 0 else code - 128
        how = f"killed ({_signal_name(number)})" if (rank, code) in killed else f"stopped by {_signal_name(number)}"
        print_error(f"rank {rank} was {how}: the run stopped" + (f"; {hint}" if hint else ""), err)
        hint = ""
    if named or interrupted:
        code = (named or interrupted)[0][1]
        return 128 - code if code < 0 else code
    _print_other_ranks_errors(left)
    failed = [code for _, code in sorted(codes.items()) if code != 0]
    return next((c for c in failed if c > 0), 128 - failed[0] if failed else 1)


def _rank_lines(folder: Path) -> dict[int, tuple[int, str, bool]]:
    """rank -> (exit code, error line, whether the rank printed it itself) that the ranks left in
    ``folder`` (`_leave_rank_error`)."""
    lines = {}
    for p in folder.glob("rank*.txt"):
        if p.stem[4:].isdigit():
            head, _, rest = p.read_text().partition("\n")
            code = head.removesuffix(PRINTED)
            lines[int(p.stem[4:])] = (int(code), rest, code != head) if code.isdigit() and rest else (2, p.read_text(), False)
    return lines


def _resume_hint(run_dir: Path | None) -> str:
    if run_dir is None:
        return ""
    from aae_train.checkpoint import CHECKPOINT_NAME  # (torch: the launcher has it loaded by now)

    checkpoint = run_dir / CHECKPOINT_NAME
    return (f"{checkpoint} holds the last epoch saved: go on with --resume {checkpoint}" if checkpoint.is_file()
            else "nothing saved")


def _check_process_count(nproc: int, device: str) -> None:
    """Refuse, before any process starts, more processes than the machine has cores (CPU) or GPUs."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    have, what = (torch.cuda.device_count(), "GPUs") if cuda else (os.cpu_count() or 1, "CPU cores")
    if cuda and not have:  # as a single process says it
        raise typer.BadParameter("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu or auto", param_hint="--device")
    if nproc > have:
        raise typer.BadParameter(f"{nproc} processes on a machine with {have} {what}: each process "
                                 f"trains on one of its own; give --nproc {have} or fewer", param_hint="--nproc")


def _leave_rank_error(message: str, code: int = 2, printed: bool = False) -> bool:
    """Under --nproc, this rank's error line and exit code into RANK_ERRORS for the launcher
    (``printed``: the rank printed it itself); whether it went there."""
    folder = os.environ.get(RANK_ERRORS)
    if not folder:
        return False
    try:
        Path(folder, f"rank{os.environ.get('RANK', '0')}.txt").write_text(f"{code}{PRINTED * printed}\n{message}")
    except OSError:
        return False
    return True


def _print_other_ranks_errors(left: dict[int, tuple[int, str, bool]]) -> None:
    """The error lines the ranks left (`_rank_lines`) that were not printed yet (each once): a
    rank's own error that rank 0's does not already say; and, only when no rank said why, one
    line saying a process was lost (rank 0's, which names the checkpoint to go on from)."""
    lines = {rank: line for rank, (_, line, _) in left.items()}
    lost = {rank: line for rank, line in lines.items() if line.startswith(PEER_LOST)}
    seen = {lines[0]} if 0 in lines and 0 not in lost else set()  # rank 0 printed its own error itself
    seen |= {line for _, line, printed in left.values() if printed}  # and so did a rank its internal error
    for rank in sorted(r for r in lines if r != 0 and r not in lost):
        if lines[rank] not in seen:
            print_error(f"rank {rank}: {lines[rank]}", err)
            seen.add(lines[rank])
    if lost and not seen:
        rank = min(lost)
        print_error(lost[rank] if rank == 0 else f"rank {rank}: {lost[rank]}", err)


PEER_LOST = "stopped: another process of this run stopped or cannot be reached"


def _report_lost_peer(here: bool, run_dir: Path | None = None) -> None:
    """PEER_LOST (rank 0: with the checkpoint to go on from), left for the launcher, which prints
    it only when no rank said why (`_print_other_ranks_errors`); printed by this rank when there is
    no launcher to leave it to (a torchrun started by hand). (With AAE_DEBUG=1 a lost peer is
    not taken for one: `_lost_peer`, and the transport's own error shows with its traceback.)"""
    message = PEER_LOST
    if run_dir is not None:
        message += f"; {_resume_hint(run_dir)}"
    if not _leave_rank_error(message):
        print_error(message if here else f"rank {os.environ['RANK']}: {message}", err)


def _leave_now(code: int) -> None:
    """Exit at once, the output flushed: after a peer was lost the process group is broken, and
    tearing it down at the interpreter's exit can abort the process ('terminate called without an
    active exception', exit 134) before it reports its code. What this process had to write is
    written: the training loop's own clean-up has run, and checkpoints are rank 0's, atomic."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective operation failing because another process is gone (gloo's
    "Connection closed by peer", a reset or broken connection, NCCL's abort of a communicator a
    peer left), and not a failure of this process's own (a rendezvous that cannot start, ranks
    disagreeing, which AAE_DEBUG=1 shows with its traceback as any bug)."""
    if os.environ.get("AAE_DEBUG") or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(phrase in text for phrase in ("closed by peer", "reset by peer", "broken pipe", "connection reset",
                                             "remote process exited", "communicator was aborted"))


def given_options(ctx: typer.Context) -> dict:
    """The options set on the command line (name -> value), not left at their defaults."""
    return {name: value for name, value in ctx.params.items()
            if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}


def run(cfg: RunConfig, out: Path, data_dir: Path | None, resume: Path | None, threads: int | None = None,
        overwrite: bool = False, given: dict | None = None, loader: str = "auto", workers: int | None = None,
        compile_mode: str = "off") -> None:
    """Train with a live progress bar; one-line errors, never a traceback."""
    _require_training()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    terminated = []  # SIGTERM (a service manager, torchrun) and SIGHUP (the terminal closed) stop training as Ctrl-C does

    def on_signal(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    stops = [sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
             if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN]  # nohup's ignored SIGHUP stays ignored
    try:
        previous = {sig: signal.signal(sig, on_signal) for sig in stops}
    except ValueError:  # not the main thread (an embedding application): its handlers stay
        previous = {}
    stopped = lambda: 128 + terminated[0] if terminated else 130  # noqa: E731
    try:
        _run(cfg, out, data_dir, resume, threads, overwrite, given, loader, workers, compile_mode, stopped)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(cfg: RunConfig, out: Path, data_dir: Path | None, resume: Path | None, threads: int | None, overwrite: bool,
         given: dict | None, loader: str, workers: int | None, compile_mode: str, stopped) -> None:
    """`run` within its signal handler."""
    from aae_train.data import DataWarning
    from aae_train.plots import PLOT_NAMES
    from aae_train.train import TrainingInterrupted, train  # the training loop, once arguments are valid

    if os.environ.get("RANK", "0") != "0":  # another rank of a torchrun run: rank 0 reports, it fails in one line
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)  # rank 0 says it
                train(cfg, out, data_dir=str(data_dir) if data_dir else None, resume=resume, overwrite=overwrite,
                      given=given, loader=loader, workers=workers, adapt_threads=threads is None, compile_mode=compile_mode)
        except AAEError as exc:
            if not _leave_rank_error(str(exc)):  # under --nproc the launcher prints it, unless rank 0 said the same
                print_error(f"rank {os.environ['RANK']}: {exc}", err)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            raise typer.Exit(stopped())
        except Exception as exc:  # another process stopped (its own error, a signal): not a bug of this one
            if not _lost_peer(exc):
                _leave_rank_error(f"internal error ({type(exc).__name__})", 2, printed=True)  # printed as it ends
                raise
            _report_lost_peer(here=False)
            _leave_now(2)
        return

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
        RunElapsedColumn(), console=err, transient=True,  # the bar goes at the end; the epoch lines stay
        disable=not err.is_terminal,  # in a log file a bar is noise (and its end left an empty line)
    ) as progress:
        task = progress.add_task("starting", total=None, losses="")
        download = {}

        def on_download(name: str, done: int, total: int) -> None:
            if name not in download:
                download[name] = progress.add_task(f"download {name}", total=total or None, losses="")
            progress.update(download[name], completed=done)

        def on_start(trainer, n_train: int, n_val: int) -> None:
            if trainer.created_folder is not None:  # said, as --output's and --maps' are: a mistyped --out shows
                err.print(f"created folder {literal(str(trainer.created_folder))} for --out", highlight=False)
            for note in trainer.notes:
                err.print(f"[yellow]warning:[/yellow] {literal(note)}", highlight=False)
            if trainer.epoch >= cfg.train.epochs:  # a resumed run that has every epoch already: no training to announce
                return
            if trainer.crops is not None:
                err.print(f"training on {trainer.device}: {n_train} random {trainer.crops.crop} x {trainer.crops.crop} crops an "
                          f"epoch from {counted(len(trainer.crops.photos), 'photo')}; {literal(trainer.held_out)}; "
                          f"run folder {literal(out)}", highlight=False)
            else:
                streamed = f" ({trainer.streamed})" if trainer.streamed else ""
                err.print(f"training on {trainer.device}: {n_train} images, {n_val} held out{streamed}; run folder {literal(out)}",
                          highlight=False)

        def on_step(step: int, steps: int, losses: dict) -> None:
            progress.update(task, completed=step, total=steps, losses=format_losses(losses))

        def on_epoch(m: dict) -> None:
            if m["epoch"] < cfg.train.epochs:
                progress.update(task, description=f"epoch {m['epoch'] + 1}/{cfg.train.epochs}")
            threads = f" ({m['threads']} thread{'s' * (m['threads'] != 1)})" if "threads" in m else ""
            progress.console.print(f"epoch {m['epoch']:>3}: {format_epoch(m)}  {m['seconds']:.1f}s{threads}", highlight=False)

        progress.update(task, description=f"epoch 1/{cfg.train.epochs}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)  # printed once by on_start, not as a Python warning
                result = train(cfg, out, data_dir=str(data_dir) if data_dir else None, resume=resume,
                               on_epoch=on_epoch, on_step=on_step, on_start=on_start, download_progress=on_download,
                               overwrite=overwrite, given=given, loader=loader, workers=workers,
                               adapt_threads=threads is None, compile_mode=compile_mode)
        except AAEError as exc:
            progress.stop()
            print_error(str(exc), err)  # literal text: paths may hold "[/]"
            _leave_rank_error(str(exc))  # under --nproc: the other ranks' lines are compared with it
            raise typer.Exit(2)
        except TrainingInterrupted as exc:
            progress.stop()
            print_error(exc.message, err)
            _leave_rank_error(exc.message, stopped())  # under --nproc: the ranks that only lost this one stay quiet
            raise typer.Exit(stopped())
        except KeyboardInterrupt:  # while the data loads: nothing is written before it has
            progress.stop()
            print_error("interrupted while loading the data: nothing written", err)
            _leave_rank_error("interrupted while loading the data: nothing written", stopped())
            raise typer.Exit(stopped())
        except OSError as exc:  # the run folder's disk is full, read-only or gone: not a bug
            if exc.errno not in DISK_ERRORS:
                raise
            progress.stop()
            message = (f"cannot write to the run folder {out} ({exc.strerror}: {exc.filename}); its checkpoint.pt, if "
                       "any, is whole: free space (or choose another --out), then --resume")
            print_error(message, err)
            _leave_rank_error(message)
            raise typer.Exit(2)
        except Exception as exc:  # with several processes: another one stopped (its error is its own line)
            if os.environ.get("WORLD_SIZE", "1") == "1" or not _lost_peer(exc):
                _leave_rank_error(f"internal error ({type(exc).__name__})", 2, printed=True)  # printed as it ends
                raise
            progress.stop()
            _report_lost_peer(here=True, run_dir=out)
            _leave_now(2)
    err.print(f"checkpoint: {literal(result.checkpoint)}\nplots: {', '.join(literal(out / name) for name in PLOT_NAMES)}",
              highlight=False)


@app.command("demo-images", short_help="Write MNIST test digits and noise images as PNGs.")
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
    err.print(f"wrote {len(paths)} images under {literal(out)}", highlight=False)


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Train Adversarial Autoencoders (Makhzani et al. 2015)."""
    set_openmp_waiting()  # before torch loads
    if ctx.invoked_subcommand in ("mnist", "folder"):  # demo-images needs no torch
        _require_training()


def _require_training() -> None:
    """One line naming the extra to install, in a runtime-only install (before anything imports torch)."""
    from aae_runtime.install import check_training

    try:
        check_training("aae-train")
    except AAEError as exc:
        print_error(str(exc), err)
        raise typer.Exit(2)
