"""Checkpoints: weights, optimiser and RNG states and the full run config, in one file.

Written to a temporary file beside the target and renamed over it, so a killed process leaves
the previous checkpoint intact. Read with ``torch.load(weights_only=True)``: only tensors and
plain containers are accepted, never arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from aae_runtime.errors import AAEError
from aae_runtime.fileio import atomic_write

FORMAT = "aae-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(AAEError):
    """A checkpoint is missing, unreadable, unsafe or of another format."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Atomically write ``state`` (plain containers of tensors and numbers) to ``path``."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    return atomic_write(path, lambda f: torch.save(payload, f), fsync=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely. Raises CheckpointError with a one-line reason."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass the checkpoint.pt (or run folder) aae-train wrote")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "unsafe content"
        raise CheckpointError(f"{path} holds objects a safe load refuses ({reason}); only load checkpoints written by aae-train") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}): it is truncated or not a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an aae-train checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is of checkpoint format {state['format_version']}, newer than this aae's {FORMAT_VERSION}: upgrade aae")
    return state


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
