"""How a training step runs on its device: bfloat16 autocast (``--precision bf16``), torch.compile
(``--compile MODE``) and host-to-GPU copies that do not stall the GPU.

None of these changes the model a family defines. ``--precision bf16`` changes the arithmetic of
the step's network passes (matrix multiplications and convolutions in bfloat16; weights,
optimiser states and losses stay float32), so it is part of the run's config; ``--compile``
only changes how the same computation is dispatched, so it is not. On this project's CPUs
(no bfloat16 units) neither helps; both are for GPUs (README, "Training at scale").
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from aae_train.config import COMPILE_MODES, CUDA_GRAPH


def step_context(device: torch.device, precision: str, cache: bool = True):
    """The context a training step runs in: bfloat16 autocast for ``bf16``, else nothing. The
    families compute their losses in float32 inside it (`float32_loss`). ``cache``: autocast's
    cache of weight casts, which must be off in a step captured as a CUDA graph."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def float32_loss(device: torch.device):
    """Autocast off, for a loss computed from network outputs (binary cross-entropy is unsafe to
    autocast on CUDA, and SSIM's statistics need float32); outside autocast it changes nothing."""
    return torch.autocast(device.type, enabled=False)


def compile_networks(nets: dict[str, torch.nn.Module], mode: str) -> None:
    """torch.compile the parts of each network in place (its direct children: the step calls a
    network's forward and its other methods, such as the encoder's ``codes``, through them).
    State dicts, checkpoints and exported graphs are unchanged."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode in ("off", CUDA_GRAPH):  # CUDA_GRAPH: the loop captures the whole step (aae_train.cudagraph)
        return
    # Every compiled part shares one code object (torch.compile's wrapper), so its variants (each
    # network's shapes, training and evaluation, frozen or trainable weights) share one cache,
    # whose default of 8 entries would send the rest back to eager mode.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for net in nets.values():
        for part in net.children():
            if any(True for _ in part.parameters()):
                # The bound forward, not Module.compile: torch 2.13 leaves a module compiled that way running eagerly.
                part.forward = torch.compile(part.forward, mode=mode)


def to_device(values: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host values on the training device. To a GPU the copy is made from pinned memory without
    waiting (a plain copy from pageable memory would make the host wait for all queued GPU work
    every step); the pinned buffer is kept until the copy is done by PyTorch's host allocator."""
    tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
