"""Checkpoints: weights, optimiser and RNG states and the full run config, in one file.

Written to a temporary file beside the target and renamed over it, so a killed process leaves
the previous checkpoint intact. Read with ``torch.load(weights_only=True)``: only tensors and
plain containers are accepted, never arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from aae_runtime.contract.errors import AAEError
from aae_runtime.contract.fileio import atomic_write
from aae_runtime.contract.modelfolder import holds_model

FORMAT = "aae-checkpoint"
FORMAT_VERSION = 2  # 2: model families (config 'family' and 'options', networks by name, best.pt); 1 still loads
CHECKPOINT_NAME = "checkpoint.pt"
REPLACED = ".replaced"  # --overwrite: the old run's files wait here until the new run's first checkpoint
BEST_NAME = "best.pt"  # the epoch with the best validation figure the family names (same format)
# What export and resume read, and its type: checked on load, so a damaged file fails in one line.
REQUIRED = {"config": dict, "epoch": int, "encoder": dict, "decoder": dict}


class CheckpointError(AAEError):
    """A checkpoint is missing, unreadable, unsafe or of another format."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Atomically write ``state`` (plain containers of tensors and numbers) to ``path``."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    try:
        return atomic_write(path, lambda f: torch.save(payload, f), fsync=True)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as a RuntimeError
        if isinstance(exc, RuntimeError) and "inline_container" not in str(exc) and "write" not in str(exc).lower():
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        try:
            if shutil.disk_usage(Path(path).parent).free < 64 * 2**20:
                reason = "no space left on the disk"
        except OSError:
            pass
        raise CheckpointError(f"cannot write {path} ({reason}); the file it would replace is kept whole: free space "
                              "(or choose another --out), then --resume") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely. Raises CheckpointError with a one-line reason."""
    path = Path(path)
    if path.is_dir():
        if holds_model(path) and not (path / CHECKPOINT_NAME).exists():
            raise CheckpointError(f"{path} is an exported model, not a training run: pass the checkpoint.pt (or the "
                                  "run folder) it was exported from")
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        if (path.parent / REPLACED / path.name).is_file():
            raise CheckpointError(f"checkpoint {path} not found: a training started there with --overwrite stopped before "
                                  f"its first checkpoint, and the run it replaced waits in {path.parent / REPLACED} (the "
                                  f"next aae-train into {path.parent} puts it back; or move its files back yourself)")
        raise CheckpointError(f"checkpoint {path} not found: pass the checkpoint.pt (or run folder) aae-train wrote")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; random bytes are not one
        raise CheckpointError(f"{path} was refused: it is not a PyTorch zip archive, the only format aae-train writes "
                              "(another kind of file, or damaged); pass the checkpoint.pt (or best.pt) aae-train wrote")
    _check_expansion(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on a pickle protocol: the error below says it all
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_object(exc)
        if refused is None:  # not a refused object: the pickle inside is damaged
            raise CheckpointError(f"cannot read checkpoint {path} ({_first_line(exc)}): it is damaged or not a checkpoint") from None
        raise CheckpointError(
            f"{path} was refused: it holds {refused}, which no aae-train checkpoint contains "
            "(a pickle like this can run code when loaded unsafely); only use checkpoints written by aae-train"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile/pickle errors, ... on damaged files
        raise CheckpointError(f"cannot read checkpoint {path} ({_first_line(exc)}): it is truncated or not a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an aae-train checkpoint")
    version = state.get("format_version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path} has no valid format_version: it is damaged or not written by aae-train")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} is of checkpoint format {version}, newer than this aae's {FORMAT_VERSION}: upgrade aae")
    wrong = [key for key, kind in REQUIRED.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise CheckpointError(f"{path} lacks or has damaged {', '.join(wrong)}: it is damaged or not written by aae-train")
    return state


@dataclass
class Trained:
    """A checkpoint's networks rebuilt from its config alone, weights loaded, in eval mode."""

    state: dict
    cfg: "RunConfig"
    family: type  # the aae_train.families Family class
    nets: dict[str, torch.nn.Module]  # the model networks (the moving averages with --ema)


def load_trained(path: str | Path, map_location: str | torch.device = "cpu") -> Trained:
    """The one place that turns a checkpoint into networks: export, benchmarks and tools use it
    (resume rebuilds the whole trainer through the same family constructors)."""
    from aae_train.families import get_family

    state = load_checkpoint(path, map_location)
    cfg = config_of(state, path)
    try:
        family = get_family(cfg.family)
        nets = {name: net for name, net in family.networks(cfg).items() if name in family.model_networks}
        for name, net in nets.items():
            net.load_state_dict(state[name])
            net.eval()
    except AAEError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"{path}: its config or weights do not fit together ({_first_line(exc)}): "
                              "it is damaged or not written by aae-train") from None
    return Trained(state, cfg, family, nets)


def config_of(state: dict, path: str | Path):
    """The RunConfig a checkpoint carries; a damaged one is a one-line CheckpointError."""
    from aae_train.config import RunConfig

    try:
        return RunConfig.from_dict(state["config"])
    except AAEError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        raise CheckpointError(f"{path}: its config is damaged ({_first_line(exc)}): it is not a checkpoint aae-train "
                              "wrote; train again or use another checkpoint") from None


# torch.save stores a checkpoint's entries uncompressed, so what a checkpoint holds is about its
# own size; a small file that inflates to much more is a decompression bomb.
MAX_EXPANSION, EXPANSION_SLACK_BYTES = 2, 64 << 20


def _check_expansion(path: Path) -> None:
    """Refuse an archive whose entries would inflate beyond MAX_EXPANSION x its size (+ slack),
    from the zip directory alone, before anything is decompressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({_first_line(exc)}): it is truncated or not a checkpoint") from None
    limit = MAX_EXPANSION * path.stat().st_size + EXPANSION_SLACK_BYTES
    if inflated > limit:
        raise CheckpointError(f"{path} was refused: its {path.stat().st_size / 2**20:.1f} MB inflate to "
                              f"{inflated / 2**30:.1f} GB (aae-train writes uncompressed checkpoints): it is not one of "
                              "its checkpoints; pass the checkpoint.pt aae-train wrote")


def _refused_object(exc: BaseException) -> str | None:
    """The object the weights-only unpickler refused, from torch's (long, multi-line) message;
    None when it refused no object (a damaged pickle)."""
    found = re.search(r"GLOBAL ([\w.]+)|[Uu]nsupported (?:global|operand)[^\n]*?([\w.]+) was not", str(exc))
    if found:
        return f"a reference to {found.group(1) or found.group(2)}"
    return None


def _first_line(exc: BaseException) -> str:
    """Type and first sentence of ``exc``: torch's messages run to paragraphs."""
    lines = str(exc).strip().splitlines()
    text = lines[0].split(". ")[0][:160] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
