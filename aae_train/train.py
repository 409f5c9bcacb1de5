"""The one training loop every model family runs (see `aae_train.families`).

The loop owns what is the same for all: the device, seeds and RNG streams, the learning-rate
schedule over the optimisers a family returns, weight averaging (--ema), the NaN/inf guard,
atomic checkpoints (``checkpoint.pt`` every epoch, ``best.pt`` at the best validation figure
the family names), metrics, plots and progress. The family owns the phases of a step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aae_runtime import __version__
from aae_runtime.contract.errors import AAEError, first_line
from aae_runtime.contract.fileio import atomic_write_text, remove_stale_temporaries
from aae_runtime.contract.modelfolder import LOCK, holds_model, writer_lock
from aae_runtime.images import save_grid
from aae_runtime.contract.priors import sample_prior
from aae_train import distributed
from aae_train.checkpoint import BEST_NAME, CHECKPOINT_NAME, REPLACED, config_of, load_checkpoint, save_checkpoint
from aae_train.config import CUDA_GRAPH, RunConfig
from aae_train.data import Dataset, class_labels, load_dataset
from aae_train.families import get_family
from aae_train.families.base import Batch, Streams
from aae_train.streaming import Stream, default_workers, eval_chunk
from aae_train.process import returning_large_buffers
from aae_train.cudagraph import GraphedStep
from aae_train.speed import compile_networks, step_context, to_device
from aae_train.threads import ThreadPolicy
from aae_train.plots import LATENT_NAME, LOSS_CURVES_NAME, RECONSTRUCTIONS_NAME, SAMPLES_NAME, plot_latent, plot_losses

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
RUN_FILES = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_NAME, BEST_NAME, LOSS_CURVES_NAME, LATENT_NAME, SAMPLES_NAME,
             RECONSTRUCTIONS_NAME)
LATENT_PLOT_POINTS = 2000  # held-out codes drawn in latent.png


def lr_factor(schedule: str, epoch: int, epochs: int, min_factor: float) -> float:
    """Learning-rate multiplier for 0-based ``epoch`` of ``epochs``."""
    if schedule == "cosine":
        progress = epoch / max(1, epochs - 1)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return min_factor ** sum(epoch >= m for m in (epochs // 2, (3 * epochs) // 4) if m > 0)
    return 1.0


class TrainingError(AAEError):
    """Training cannot go on (e.g. the loss diverged); nothing broken was saved."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Trainer:
    """Holds the family, its networks and optimisers, the data (on the training device) and the
    RNG streams of one run."""

    def __init__(self, cfg: RunConfig, data: Dataset, workers: int | None = None, compile_mode: str = "off"):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        t = cfg.train
        torch.manual_seed(t.seed)
        kind = get_family(cfg.family)
        self.nets = {name: net.to(self.device) for name, net in kind.networks(cfg).items()}
        self.family = kind(cfg, self.nets, self.device)
        self.optimizers = self.family.optimizers()  # name -> (optimiser, base learning rate)
        for opt, _ in self.optimizers.values():  # with several processes: gradients averaged before every step
            distributed.average_gradients_on_step(opt)
        self.family.opt = {name: opt for name, (opt, _) in self.optimizers.items()}
        # The whole data set lives on the training device (no loader can stall a GPU), unless it
        # is a folder streamed from disk: then worker processes decode each minibatch ahead.
        self.chunk = eval_chunk(cfg.model.image_shape)
        if data.streamed:
            workers = default_workers() if workers is None else workers
            # One pool of workers for both splits: the validation images follow the training ones.
            self.stream = Stream(data.train.join(data.val), workers, self.device)
            self.train_x = self.val_x = None
            self.streamed = f"streamed from disk by {workers} worker process{'es' * (workers != 1)}"
        else:
            self.stream = self.streamed = None
            self.train_x = torch.from_numpy(data.train).to(self.device)
            self.val_x = torch.from_numpy(data.val).to(self.device)
        self.n_train, self.n_val = len(data.train), len(data.val)
        self.val_labels = data.val_labels  # latent plot colours
        self.class_names = data.class_names
        self.notes = list(data.notes)  # one-line messages for the user (e.g. skipped files)
        # --crop: fresh crops every epoch, from a stream of the training seed (the hold-out depends on split_seed alone)
        self.crops = replace(data.crops, seed=t.seed) if data.crops is not None else None
        self.held_out = data.held_out
        self.shuffle = torch.Generator().manual_seed(t.seed + 1)
        self.streams = Streams(prior=np.random.default_rng(t.seed + 2),
                               extra={name: torch.Generator().manual_seed(t.seed + 3 + i) for i, name in enumerate(kind.extra_streams)})
        self.family.prepare(data, self.streams)
        _, train_y, val_y = class_labels(data) if kind.uses_labels else (None, None, None)
        train_y = self.family.training_labels(train_y)  # what the step may see: the semi family hides most labels
        self.train_y, self.val_y = (torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device) if y is not None else None
                                    for y in (train_y, val_y))
        self.created_folder: Path | None = None  # the outermost folder made for the run folder, which did not exist
        self.thread_policy = None  # a ThreadPolicy (aae_train.threads) when torch's thread count follows the idle cores
        self.epoch = 0  # epochs completed
        self.saved_epoch = 0  # the epoch the run folder's checkpoint.pt holds (behind ``epoch`` while it is written)
        self.history: list[dict] = []
        self.best: dict | None = None  # {"metric", "value", "epoch"} of best.pt
        # With --ema, averaged copies of the model networks are the model: evaluated, plotted,
        # checkpointed under their names and so exported; the trained weights ride along for resume.
        names = kind.model_networks
        self.ema = {name: _frozen_copy(self.nets[name]) for name in names} if t.ema > 0 else None
        self.ema_updates = 0
        if self.ema is not None:  # (averages, trained weights), in the same order; load_state_dict keeps the objects
            self._ema_params = ([p for name in names for p in self.ema[name].parameters()],
                                [p for name in names for p in self.nets[name].parameters()])
        # --compile cuda-graph: the whole step replayed as one CUDA graph (aae_train.cudagraph);
        # the other modes compile the networks' parts, after the averages' copies (they stay plain modules)
        self.graphed = None
        if compile_mode == CUDA_GRAPH:
            if self.device.type != "cuda" or distributed.world_size() > 1:
                raise TrainingError(f"--compile {CUDA_GRAPH} captures the step on one GPU: use it with --device cuda "
                                    "and one process, or choose another --compile mode")
            precision = t.precision
            self.graphed = GraphedStep(self.family, [opt for opt, _ in self.optimizers.values()],
                                       lambda: step_context(self.device, precision, cache=False))
        else:
            compile_networks(self.nets, compile_mode)

    @property
    def model(self) -> dict[str, torch.nn.Module]:
        """The networks as evaluated and saved: the moving averages with --ema, else the trained ones."""
        return {**self.nets, **(self.ema or {})}

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the averages towards the current weights; the decay ramps up over the first updates
        ((1 + n) / (10 + n)) so that the averages do not remember the random initialisation."""
        self.ema_updates += 1
        decay = min(self.cfg.train.ema, (1 + self.ema_updates) / (10 + self.ema_updates))
        torch._foreach_lerp_(*self._ema_params, 1.0 - decay)

    # -- one epoch ------------------------------------------------------------------------------
    def set_learning_rates(self) -> float:
        """Apply the schedule for the coming epoch (a function of the epoch alone, so resume agrees)."""
        t = self.cfg.train
        factor = lr_factor(t.lr_schedule, self.epoch, t.epochs, t.lr_min_factor)
        for opt, base in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = base * factor
        return factor

    def train_epoch(self, on_step: Callable[[int, int, dict], None] | None = None) -> dict:
        for m in self.nets.values():
            m.train()
        factor = self.set_learning_rates()
        if self.graphed is not None:  # the graph holds the learning rates as they were at its capture
            self.graphed.invalidate()
        if self.crops is not None:
            self.train_x = torch.from_numpy(self.crops.draw(self.epoch)).to(self.device)
            self.n_train = len(self.train_x)
        bs = self.cfg.train.batch_size  # the global minibatch: each of the processes takes its share
        order = torch.randperm(self.n_train, generator=self.shuffle)
        steps = max(1, self.n_train // bs)  # drop the last partial batch: D sees equal real and fake counts
        shards = [distributed.shard_minibatch(order[i * bs : (i + 1) * bs]) for i in range(steps)]
        if self.stream is not None:
            images = self.stream.batches(shards)
        else:
            shards = [idx.to(self.device) for idx in shards]
            images = (self.train_x[idx] for idx in shards)
        names = self.family.loss_names
        start = time.perf_counter()
        total = torch.zeros(len(names), device=self.device)
        for i, (idx, x) in enumerate(zip(shards, images)):
            batch = Batch(x, self.train_y[idx.to(self.device)] if self.train_y is not None else None)
            # drawn for the global minibatch, each rank taking its rows: the ranks' draws differ, and
            # a run on N processes draws what one process does
            draws = [to_device(np.ascontiguousarray(distributed.shard(d)), self.device)
                     for d in self.family.host_draws(min(bs, self.n_train))]  # fewer images than a minibatch: one step of them all
            try:
                if self.graphed is not None:
                    total += self.graphed(batch, draws)
                else:
                    with step_context(self.device, self.cfg.train.precision):
                        total += self.family.step(batch, draws)
            except RuntimeError:  # e.g. BCE refusing a NaN reconstruction once the weights diverged
                if self.weights_finite():
                    raise
                raise TrainingError(f"the weights became NaN or infinite in epoch {self.epoch + 1}, step {i + 1}/{steps}; "
                                    "nothing was saved for this epoch: lower the learning rates and --resume or retrain") from None
            if self.ema is not None:
                self.update_ema()
            if self.thread_policy is not None:
                self.thread_policy.tick()
            if on_step and (i % 10 == 9 or i == steps - 1):
                on_step(i + 1, steps, dict(zip(names, (total / (i + 1)).tolist())))
        means = dict(zip(names, (distributed.mean_over_ranks(total) / steps).tolist()))
        if not all(math.isfinite(v) for v in means.values()) or not self.weights_finite():
            shown = ", ".join(f"{k} {v:.3g}" for k, v in means.items() if not k.endswith("_acc"))
            raise TrainingError(f"loss became NaN or infinite in epoch {self.epoch + 1} ({shown}); nothing was saved "
                                "for this epoch: lower the learning rates and --resume or retrain")
        self.epoch += 1
        metrics = {"epoch": self.epoch, **means, "lr_factor": round(factor, 6), **self.evaluate(),
                   "seconds": round(time.perf_counter() - start, 3)}
        if self.thread_policy is not None:
            metrics["threads"] = self.thread_policy.threads  # at the epoch's end
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """No NaN or infinite parameter: checked before every checkpoint, so none holds a broken model."""
        return all(bool(torch.isfinite(p).all()) for m in self.nets.values() for p in m.parameters())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The family's validation figures of the model networks (eval mode)."""
        model = self.model
        for name in self.family.model_networks:
            model[name].eval()
        with returning_large_buffers():  # a pass leaves no heap behind (aae_train.process)
            return self.family.evaluate(model, self.validation(), self.epoch)

    def validation(self, limit: int | None = None):
        """The validation split (its first ``limit`` images) in chunks of `self.chunk`, in order, as Batches."""
        n = self.n_val if limit is None else min(limit, self.n_val)
        bounds = [(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]
        if self.stream is not None:
            images = self.stream.batches([range(self.n_train + a, self.n_train + b) for a, b in bounds])
        else:
            images = (self.val_x[a:b] for a, b in bounds)
        for (a, b), x in zip(bounds, images):
            yield Batch(x, self.val_y[a:b] if self.val_y is not None else None)

    def improved(self, metrics: dict) -> bool:
        """Whether this epoch is the best so far by the family's validation figure (ties: the later)."""
        key, mode = self.family.selection
        value = metrics[key]
        if not math.isfinite(value):
            return False
        better = self.best is None or (value <= self.best["value"] if mode == "min" else value >= self.best["value"])
        if better:
            self.best = {"metric": key, "value": value, "epoch": metrics["epoch"]}
        return better

    # -- outputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def write_plots(self, run_dir: Path, n: int = 64) -> None:
        """Loss curves, held-out codes coloured by label over prior samples, sample grid, reconstructions."""
        model = self.model
        for name in self.family.model_networks:
            model[name].eval()
        with returning_large_buffers():
            codes = torch.cat([model["encoder"](b.x) for b in self.validation(LATENT_PLOT_POINTS)]).cpu().numpy()
        samples = self.family.sample_images(model, n, codes)
        k = len(self.family.cfg.options.classes) if getattr(self.cfg.options, "classes", None) else None
        save_grid(samples.cpu().numpy(), run_dir / SAMPLES_NAME, ncols=k if k and k <= 16 else None)
        first = next(self.validation(n // 2))
        x, y = first.x, first.y
        pairs = torch.stack([x, self.family.reconstruct(model, x, y)[1]], dim=1).flatten(0, 1)  # original, reconstruction, ...
        save_grid(pairs.cpu().numpy(), run_dir / RECONSTRUCTIONS_NAME, ncols=16)
        if self.history:
            plot_losses(self.history, run_dir / LOSS_CURVES_NAME)
        prior = sample_prior(self.family.prior_spec(self.cfg, codes), LATENT_PLOT_POINTS, np.random.default_rng(1))
        labels = self.val_labels[: len(codes)] if self.val_labels is not None else None
        plot_latent(codes, labels, run_dir / LATENT_NAME, prior_samples=prior, class_names=self.class_names)

    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state(), "prior": self.streams.prior.bit_generator.state,
               **{name: g.get_state() for name, g in self.streams.extra.items()}}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "package_version": __version__,
            **{name: net.state_dict() for name, net in self.model.items()},
            "optimizers": {name: opt.state_dict() for name, (opt, _) in self.optimizers.items()},
            "rng": rng,
            "history": self.history,
            "best": self.best,
        }
        if self.ema is not None:
            state["trained"] = {**{name: self.nets[name].state_dict() for name in self.ema}, "ema_updates": self.ema_updates}
        return state

    def load_state(self, state: dict) -> None:
        trained = state.get("trained", state)
        for name, net in self.nets.items():
            net.load_state_dict(trained[name] if self.ema is not None and name in self.ema else state[name])
        if self.ema is not None:
            for name, net in self.ema.items():
                net.load_state_dict(state[name])
            self.ema_updates = int(state["trained"]["ema_updates"]) if "trained" in state else 0
        for name, (opt, _) in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            for group in opt.param_groups:  # a run saved under --compile cuda-graph: its own capture sets it again
                group["capturable"] = False
        torch.set_rng_state(state["rng"]["torch"])
        self.shuffle.set_state(state["rng"]["shuffle"])
        self.streams.prior.bit_generator.state = state["rng"]["prior"]
        for name, g in self.streams.extra.items():
            g.set_state(state["rng"][name])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = self.saved_epoch = int(state["epoch"])
        if self.epoch < 0 or len(state["history"]) != self.epoch:
            raise ValueError(f"epoch {self.epoch} with {len(state['history'])} epochs of metrics")
        self.history = list(state["history"])
        self.best = state.get("best")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: list[dict]
    device: str


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) stopped training; ``message`` says what was kept and how to go on."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def check_run_folder(run_dir: Path, resume: str | Path | None, overwrite: bool) -> list[str]:
    """The run files ``run_dir`` already holds, when training may go there; else TrainingError.

    A folder holding another run (a checkpoint) is refused unless ``overwrite``: resuming a run in
    its own folder is the only way to write into a run without it. A folder with a config but no
    checkpoint (a start killed before its first epoch ended) holds nothing to lose; the run an
    ``--overwrite`` set aside and has not yet replaced counts as held. A folder holding an exported
    model is refused even with ``overwrite``: a run would mix its files into the model's, and
    share its lock with calibrations."""
    if holds_model(run_dir):
        if resume is not None and (run_dir / CHECKPOINT_NAME).exists():  # a model exported into its run's folder
            raise TrainingError(f"{run_dir} holds an exported model beside the run: move its MODEL.json and versions/ "
                                f"into a folder of their own (for example {run_dir / 'model'}), then resume")
        if resume is not None and run_dir.resolve() in (Path(resume).resolve(), Path(resume).resolve().parent):
            raise TrainingError(f"--resume {resume}: that is an exported model, not a training run: give the "
                                "checkpoint.pt (or the run folder) it was exported from")
        raise TrainingError(f"{run_dir} holds an exported model, not a run: choose another --out (a run folder; "
                            "export writes the model into a folder of its own)")
    aside = run_dir / REPLACED
    if aside.is_dir() and not (run_dir / CHECKPOINT_NAME).exists():
        try:  # an --overwrite killed (SIGKILL) before its first checkpoint: its old run comes back, unless that start still runs
            with writer_lock(run_dir, 0):
                _restore_replaced(run_dir)
        except AAEError:
            pass
    if not any((folder / name).exists() for folder in (run_dir, aside) for name in (CHECKPOINT_NAME, BEST_NAME)):
        return []
    held = [name for name in RUN_FILES if (run_dir / name).exists() or (aside / name).exists()]
    if overwrite:
        return held
    if resume is not None:
        source = Path(resume)
        source_dir = source if source.is_dir() else source.parent
        if source_dir.resolve() == run_dir.resolve():
            return held
    raise TrainingError(f"run folder {run_dir} already holds a run ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                        "choose another --out, or give --overwrite to replace that run")


# What `--resume` may change: how long and where it runs, where the data and run folder are, how data is read.
RESUME_OPTIONS = frozenset({"epochs", "device", "threads", "out", "resume", "overwrite", "data_dir", "directory", "loader",
                            "workers", "compile_mode"})


# Options whose config field has another name (prior parameters: the prior's spec as a whole).
_OPTION_FIELDS = {"size": "image_size", "color": "color_mode",
                  **{p: "prior" for p in ("prior_std", "mog_components", "mog_radius", "mog_std", "uniform_low",
                                          "uniform_high", "swissroll_turns", "swissroll_radius", "swissroll_noise")}}


def resume_conflicts(saved: RunConfig, built: RunConfig, given: dict) -> list[str]:
    """The options given with ``--resume`` (name -> value as typed) whose effect on the config,
    as the command built it (``built``), differs from the checkpoint's (``saved``): each as
    "--name value (checkpoint: value)". Options the config does not hold are refused too."""
    conflicts = []
    for name, value in sorted(given.items()):
        if name in RESUME_OPTIONS:
            continue
        field = _OPTION_FIELDS.get(name, name)
        kept, wanted = _field(saved, field), _field(built, field)
        unordered = field in UNORDERED_FIELDS and kept is not _MISSING  # "rot90,flip" is "flip,rot90"
        if kept is not _MISSING and (set(kept) == set(wanted) if unordered else kept == wanted):
            continue
        shown = "" if kept is _MISSING else f" (checkpoint: {_shown(kept)})"
        conflicts.append(f"--{name.replace('_', '-')} {value}{shown}")
    return conflicts


_MISSING = object()
UNORDERED_FIELDS = frozenset({"augment"})  # config tuples whose order has no effect (aae_train.crops.augment)


def _field(cfg: RunConfig, name: str):
    for section in (cfg, cfg.model, cfg.train, cfg.data, cfg.options):
        if section is not None and hasattr(section, name):
            return getattr(section, name)
    return _MISSING


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if k != "dim")
    return str(value)


def train(cfg: RunConfig, run_dir: str | Path, data_dir: str | None = None, resume: str | Path | None = None,
          on_epoch: Callable[[dict], None] | None = None, on_step=None, on_start=None, download_progress=None,
          overwrite: bool = False, given: dict | None = None, loader: str = "auto", workers: int | None = None,
          adapt_threads: bool = False, compile_mode: str = "off") -> TrainResult:
    """Train (or resume) a model of ``cfg.family``, writing checkpoints, metrics and grids into ``run_dir``.

    With ``resume``, the checkpoint's config is used, except that ``cfg.train.epochs`` may
    extend the run; training goes on from the last completed epoch with its RNG states.
    A ``run_dir`` holding another run is refused unless ``overwrite`` (see `check_run_folder`).
    ``given`` (the options set on the command line) are checked against a resumed checkpoint's
    config: any that differ are refused, each named (`resume_conflicts`).
    Ctrl-C raises TrainingInterrupted; a run folder this call created and that has no checkpoint
    yet is removed, so an interrupted start leaves nothing half-made.
    ``loader`` and ``workers``: whether a folder is held in memory or streamed from disk, and by
    how many decoding processes (`aae_train.streaming`); they do not change the model.
    ``adapt_threads``: torch's thread count follows the cores other processes leave idle
    (`aae_train.threads`; one process only).
    ``compile_mode``: torch.compile the networks (`aae_train.speed`; not part of the config).
    """
    run_dir = Path(run_dir)
    replaced = check_run_folder(run_dir, resume, overwrite)  # on every rank: they agree on a shared folder
    distributed.init(resolve_device(cfg.train.device))
    main = distributed.is_main()
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        saved = config_of(state, resume)
        if saved.data.source != cfg.data.source:
            raise TrainingError(f"--resume {resume} is a run of aae-train {saved.data.source}, not {cfg.data.source}: "
                                f"resume it with aae-train {saved.data.source}")
        conflicts = resume_conflicts(saved, cfg, given or {})
        if conflicts:
            raise TrainingError(f"--resume {resume} keeps the checkpoint's config, and these options differ from it: "
                                f"{', '.join(conflicts)}; leave them out, or train a new run")
        cfg = saved.replace(train=replace(saved.train, epochs=cfg.train.epochs, device=cfg.train.device))
    if cfg.train.batch_size % distributed.world_size():  # (a resumed run's: its checkpoint's)
        raise TrainingError(f"--batch-size {cfg.train.batch_size} does not split evenly over {distributed.world_size()} "
                            "processes: choose a multiple of the process count" + (
                                "; a resumed run keeps its batch size, so resume it on a process count that divides it"
                                if resume is not None else ""))
    data = load_dataset(cfg.data, data_dir, progress=download_progress, loader=loader, workers=workers)
    if tuple(data.preprocessing.shape) != tuple(cfg.model.image_shape):
        raise TrainingError(f"the model expects images of shape {tuple(cfg.model.image_shape)} but the data are "
                            f"{data.preprocessing.shape}: set image_shape to the data's (C, H, W)")
    cfg = cfg.replace(data=replace(cfg.data, path=data.path, preprocessing=data.preprocessing.to_dict(),
                                   listing=data.listing))
    configured = get_family(cfg.family).configure(cfg, data)
    if state is not None and configured.options != cfg.options:  # e.g. a folder's class sub-folders changed
        raise TrainingError(f"--resume {resume}: the data no longer matches the checkpoint (its classes were "
                            f"{getattr(cfg.options, 'classes', None)}, the data now gives {getattr(configured.options, 'classes', None)}); "
                            "restore the data as it was, or train a new run")
    cfg = configured
    try:
        trainer = Trainer(cfg, data, workers, compile_mode)
    except (RuntimeError, MemoryError) as exc:  # the networks' weights cannot be allocated
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
            raise
        raise TrainingError(f"the model does not fit in this machine's memory ({first_line(exc, 120)}): lower --hidden, "
                            "the image size or --latent-dim") from None
    images = len(trainer.crops) if trainer.crops is not None else trainer.n_train
    if distributed.world_size() > 1 and min(cfg.train.batch_size, images) < distributed.world_size():
        raise TrainingError(f"a minibatch of {images} training image{'s' * (images != 1)} cannot be shared by "
                            f"{distributed.world_size()} processes (each needs at least one): use fewer processes, or more images")
    if adapt_threads and distributed.world_size() == 1:
        policy = ThreadPolicy(torch.set_num_threads, most=torch.get_num_threads())
        trainer.thread_policy = policy if policy.works else None
    if state is not None:
        try:
            trainer.load_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise TrainingError(f"--resume {resume}: its weights or optimiser states do not fit its config "
                                f"({first_line(exc, 160)}): "
                                "the checkpoint is damaged; use another one or train again") from None
        if trainer.epoch >= cfg.train.epochs:
            trainer.notes.append(f"--resume {resume} holds {trainer.epoch} epochs already, and --epochs is "
                                 f"{cfg.train.epochs}: nothing to train (give --epochs above {trainer.epoch} to go on)")
    created = not run_dir.exists()
    checkpoint = run_dir / CHECKPOINT_NAME
    locked = False  # only the process holding the folder's lock may tidy it up after a failure
    with contextlib.ExitStack() as held:
        try:
            if main:
                trainer.created_folder = _create_run_folder(run_dir)
                held.enter_context(writer_lock(run_dir, 0, busy=f"run folder {run_dir} is in use by another training: "
                                                               "wait for it to end, or choose another --out"))
                locked = True
                if resume is None and not overwrite and any((run_dir / n).exists() for n in (CHECKPOINT_NAME, BEST_NAME)):
                    raise TrainingError(f"run folder {run_dir} now holds a run that another training wrote while this "
                                        "one loaded its data: choose another --out, or give --overwrite")
                _prepare_run_folder(run_dir, cfg, trainer, replaced if overwrite else [])
            if on_start and main:
                on_start(trainer, len(trainer.crops) if trainer.crops is not None else len(data.train), len(data.val))
            _train_epochs(trainer, cfg, run_dir, on_step if main else None, on_epoch if main else None, write=main)
        except KeyboardInterrupt:
            raise _interrupted(run_dir, checkpoint, trainer, created and main, locked) from None
        except BaseException:
            if locked and not checkpoint.exists():  # failed before its first checkpoint: the replaced run comes back
                _restore_replaced(run_dir)
                if created:
                    _remove_run_folder(run_dir, trainer.created_folder)
            raise
        if main:
            try:
                if not checkpoint.exists():  # resumed at or past the requested epochs: still leave a checkpoint
                    save_checkpoint(trainer.state(), checkpoint)
                shutil.rmtree(run_dir / REPLACED, ignore_errors=True)  # --overwrite: the run it replaced is gone for good
                trainer.write_plots(run_dir)
            except KeyboardInterrupt:  # the training itself is complete
                held = f"{checkpoint} holds all {trainer.epoch} epochs" if checkpoint.exists() else "no checkpoint saved"
                raise TrainingInterrupted(f"interrupted at the end of the run: {held}") from None
    distributed.finish()
    return TrainResult(run_dir, checkpoint, trainer.history, str(trainer.device))


def _create_run_folder(run_dir: Path) -> Path | None:
    """Create the run folder and whatever folders above it are missing; the outermost of those, if any."""
    missing = next((p for p in reversed(run_dir.parents) if not p.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return missing
    except (FileExistsError, NotADirectoryError):
        raise TrainingError(f"--out {run_dir}: a file is in the way of this run folder; choose another --out") from None
    except OSError as exc:
        raise TrainingError(f"--out {run_dir}: cannot create the run folder ({exc.strerror or exc}); choose another --out") from None


def _prepare_run_folder(run_dir: Path, cfg: RunConfig, trainer: "Trainer", replaced: list[str]) -> None:
    """Set the ``replaced`` files of the run ``run_dir`` held (``--overwrite``) aside until this
    run's first checkpoint (`_train_epochs` then deletes them; a failure before it puts them
    back) and write the config and the metrics so far."""
    if not (run_dir / CHECKPOINT_NAME).exists():
        _restore_replaced(run_dir)  # an --overwrite killed before its first checkpoint: its old run is the run held
    if replaced:
        aside = run_dir / REPLACED
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in replaced:
            if (run_dir / name).exists():
                os.replace(run_dir / name, aside / name)
    remove_stale_temporaries([run_dir / name for name in RUN_FILES])  # left by a run killed mid-write
    atomic_write_text(run_dir / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=1) + "\n")
    _rewrite_metrics(run_dir / METRICS_NAME, trainer.history)  # a resumed run drops epochs after its checkpoint


def _interrupted(run_dir: Path, checkpoint: Path, trainer: "Trainer", created: bool, locked: bool) -> TrainingInterrupted:
    if not locked:  # stopped before it held the folder: another run may be writing there
        return TrainingInterrupted(f"interrupted before training began: nothing written to {run_dir}")
    if checkpoint.exists():
        return TrainingInterrupted(f"interrupted in epoch {trainer.saved_epoch + 1}: {checkpoint} holds epoch {trainer.saved_epoch}; "
                                   f"go on with --resume {checkpoint}")
    if _restore_replaced(run_dir):
        return TrainingInterrupted(f"interrupted before the first epoch ended: {run_dir} holds the run it held before")
    if created:  # nothing worth keeping: no half-made run folder, nor the folders made for it
        removed = _remove_run_folder(run_dir, trainer.created_folder)
        return TrainingInterrupted(f"interrupted before the first epoch ended: nothing saved ({removed} removed)")
    return TrainingInterrupted(f"interrupted before the first epoch ended: no checkpoint saved in {run_dir}")


def _restore_replaced(run_dir: Path) -> bool:
    """Put back the run an ``--overwrite`` set aside (no checkpoint of the new run exists); whether there was one."""
    aside = run_dir / REPLACED
    if not aside.is_dir():
        return False
    for path in aside.iterdir():  # callers hold the folder's lock
        os.replace(path, run_dir / path.name)
    aside.rmdir()
    return True


def _remove_run_folder(run_dir: Path, created: Path | None = None) -> Path:
    """Remove a run folder this run created, that holds no checkpoint (files of others stay),
    and the empty folders above it up to ``created`` (the outermost one it made for ``--out``);
    the outermost folder removed."""
    if not run_dir.is_dir():  # never made (a file in the way)
        return run_dir
    for name in (*RUN_FILES, LOCK):
        (run_dir / name).unlink(missing_ok=True)
    above = [p for p in run_dir.parents if created is not None and (p == created or created in p.parents)]
    removed = run_dir
    for folder in (run_dir, *above):  # innermost first
        try:
            folder.rmdir()
        except OSError:  # not empty: files of someone else's
            break
        removed = folder
    return removed


def _train_epochs(trainer: "Trainer", cfg: RunConfig, run_dir: Path, on_step, on_epoch, write: bool = True) -> None:
    """Epochs up to cfg.train.epochs; with ``write`` (rank 0) each one's metrics, checkpoints and plots."""
    metrics_path, checkpoint = run_dir / METRICS_NAME, run_dir / CHECKPOINT_NAME
    while trainer.epoch < cfg.train.epochs:
        metrics = trainer.train_epoch(on_step)
        if not write:
            trainer.improved(metrics)  # the same bookkeeping as rank 0's
            continue
        # Metrics first: every checkpointed epoch then has its line on disk, even when the process
        # dies between the two writes (a line ahead of the checkpoint is dropped on resume).
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        state = trainer.state() if trainer.improved(metrics) else None
        if state is not None:
            save_checkpoint(state, run_dir / BEST_NAME)
        save_checkpoint(state or trainer.state(), checkpoint)
        trainer.saved_epoch = trainer.epoch
        shutil.rmtree(run_dir / REPLACED, ignore_errors=True)  # --overwrite: the new run has a checkpoint now
        trainer.write_plots(run_dir)  # refreshed every epoch, so a run can be watched
        if on_epoch:
            on_epoch(metrics)


def _frozen_copy(net: torch.nn.Module) -> torch.nn.Module:
    averaged = copy.deepcopy(net)
    averaged.requires_grad_(False)
    return averaged


def _rewrite_metrics(path: Path, history: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in history))
