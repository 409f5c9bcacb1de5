"""Data-parallel training on PyTorch's own engine (torch.distributed), started by `torchrun`.

`torchrun --nproc-per-node N -m aae_train mnist ...` (or `aae-train mnist --nproc N`) starts N
processes; each joins the process group from torchrun's environment (gloo on the CPU, NCCL on
GPUs). Every rank holds the same networks and walks the same global permutation of the training
set; step by step it takes its share of the global minibatch (``--batch-size`` is the global
size, split evenly), and before every optimiser step, of every phase, the gradients are averaged
over the ranks, so the weights stay identical everywhere and the update is the one the whole
minibatch gives. Rank 0 alone writes checkpoints, metrics and plots; a checkpoint is the same
whatever the number of processes, so a run of N resumes on M.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from aae_train.process import stop_with_parent


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(device: torch.device) -> None:
    """Join the process group torchrun set up (no-op for a single process). A rank stops (SIGTERM,
    as from torchrun) when its launcher dies, even by SIGKILL: left alone it would train on,
    holding the run folder."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    stop_with_parent()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


_weight: float | None = None  # this rank's rows over an equal share's, while the shares differ (`shard_minibatch`)


def shard(rows):
    """This rank's share of rows drawn for a global minibatch (a tensor or an array, split along
    the first axis): the host draws of its step."""
    n = world_size()
    return rows if n == 1 else rows[rank()::n]


def shard_minibatch(rows):
    """This rank's share of a global minibatch's rows (its indices). Shares are equal when the
    rows split evenly; when they cannot (a training set smaller than the minibatch, of a count the
    processes do not divide) they differ by one row, and the gradients and the epoch's figures
    are averaged weighted by them (`average_gradients_on_step`, `mean_over_ranks`), so the update
    is still the one of all the rows together. Only the minibatch sets the weight: draws of
    another size (a family's labelled subset) do not."""
    global _weight
    mine = shard(rows)
    n = world_size()
    _weight = len(mine) * n / len(rows) if n > 1 and len(rows) % n else None
    return mine


def average_gradients_on_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first average its parameters' gradients over the ranks (one
    all-reduce of them all, flattened); a parameter without a gradient counts as zero, so every
    rank reduces the same tensors in the same order."""
    if world_size() == 1:
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = optimizer.step

    def averaged_step(*args, **kwargs):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if _weight is not None:  # unequal shares: each rank's mean weighted by its rows
            flat *= _weight
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        return step(*args, **kwargs)

    optimizer.step = averaged_step
    return optimizer


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks (the epoch's loss figures)."""
    if world_size() == 1:
        return values
    values = values.clone() if _weight is None else values * _weight  # unequal shares: weighted by their rows
    dist.all_reduce(values)
    return values / world_size()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
