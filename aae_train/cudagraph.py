"""A family's whole training step replayed as one CUDA graph (``--compile cuda-graph``).

On a GPU, a step of the paper's MLP is a few hundred small kernels (three phases, each with its
forward, backward and optimiser update), and launching them from Python takes longer than running
them. A CUDA graph records the launches once and replays them in one call. The step is a fixed
function of device tensors (the family's host draws reach it on the device: `Family.host_draws`),
so it is captured with fixed input buffers; before each replay the minibatch and the draws are
copied into them. What the step computes, and the random streams it reads, are those of the eager
step (dropout and noise come from the GPU's generator, which graphs advance as eager calls do);
only the optimisers switch to their capturable form, which keeps their step counts on the GPU.

A graph holds each optimiser's learning rate as it was at capture, so the loop captures again
whenever the schedule changes it (`GraphedStep.invalidate`, at every epoch). The first few steps
of a run warm up eagerly on the capture stream (the GPU's libraries allocate their workspaces
then, outside the graph), and every step runs exactly once, captured or not.
"""

from __future__ import annotations

import torch

from aae_runtime.contract.errors import AAEError
from aae_train.families.base import Batch

WARMUP_STEPS = 3  # eager steps on the capture stream before the first capture (PyTorch's advice: a few)


class CaptureError(AAEError):
    """The step holds an operation a CUDA graph cannot record."""


class GraphedStep:
    """Calls ``family.step(batch, draws)`` through a CUDA graph of it."""

    def __init__(self, family, optimizers: list[torch.optim.Optimizer], step_context):
        self.family, self.optimizers, self.step_context = family, optimizers, step_context
        self.stream = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []  # x, y (if any), the draws: fixed buffers the graph reads
        self.key = None  # their shapes and dtypes: another minibatch shape needs its own capture
        self.output: torch.Tensor | None = None
        self.warmed = 0
        self.captures = 0

    def invalidate(self) -> None:
        """The next step captures anew (the learning rates, or the networks' modes, changed)."""
        self.graph = None

    def __call__(self, batch: Batch, draws: list[torch.Tensor]) -> torch.Tensor:
        given = [batch.x, *([batch.y] if batch.y is not None else []), *draws]
        key = tuple((tuple(t.shape), t.dtype) for t in given)
        if self.warmed < WARMUP_STEPS:
            self.warmed += 1
            return self._on_stream(lambda: self._step(given, batch.y is not None))
        if self.graph is None or key != self.key:
            self._capture(given, batch.y is not None, key)
        with torch.no_grad():
            for buffer, value in zip(self.inputs, given):
                buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output

    def _step(self, tensors: list[torch.Tensor], labelled: bool) -> torch.Tensor:
        x, rest = tensors[0], tensors[1:]
        y, draws = (rest[0], rest[1:]) if labelled else (None, rest)
        with self.step_context():
            return self.family.step(Batch(x, y), list(draws))

    def _on_stream(self, run):
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = run()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _capture(self, given: list[torch.Tensor], labelled: bool, key) -> None:
        """Record one step (it runs at the replay that follows) on buffers shaped like ``given``."""
        self.graph = self.output = None  # the last graph's memory goes back once nothing holds it
        for opt in self.optimizers:  # capture checks this flag (set now: eager steps would warn of it); fused
            for group in opt.param_groups:  # Adam keeps its step counts on the GPU already
                group["capturable"] = True
        self.inputs = [t.detach().clone() for t in given]
        self.key = key
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            # thread_local: a loader's pinning thread (a streamed folder) may allocate meanwhile
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.output = self._step(self.inputs, labelled)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # an operation that cannot be captured (one that waits for the GPU, say)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"--compile cuda-graph: capturing the training step as a CUDA graph failed ({first}); "
                               "train with --compile off or reduce-overhead") from None
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graph = graph
        self.captures += 1
