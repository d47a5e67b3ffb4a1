"""Training checkpoints on disk: their file names and format, and loading them without running anything.

The engine writes them (`Trainer.save_checkpoint`); everything that reads one (a resume, a warm start,
a shared prefix, M2m's cached g) goes through `load_checkpoint_file`, i.e. `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ltsearch.errors import CheckpointError, UnsafeFileError

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the checkpoint before the newest, kept for a torn or corrupt newest one
CHECKPOINT_FORMAT = 3  # 3: + the augmenter's own random stream; 2: numpy's RNG key as a list (weights_only=True); 1: as an ndarray
STATE_KEYS = ("config", "epoch", "step", "model", "augmenter", "optimizer", "loader", "rng", "best", "history")


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A model state dict (bare or under 'model') from a checkpoint file, loaded safely."""
    blob = load_checkpoint_file(path)
    state = blob.get("model", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' holds no model state dict (a mapping of parameter names to tensors, bare or under 'model')")
    return state


def _first_sentence(error: BaseException) -> str:
    return _first_line(error).split(". ")[0][:200]


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


#: numpy's RNG key was an ndarray in format-1 checkpoints; these rebuild exactly that (a uint32 array) and nothing else
_LEGACY_NUMPY_GLOBALS: list[Any] = []
try:
    import numpy as _np

    _LEGACY_NUMPY_GLOBALS = [_np._core.multiarray._reconstruct, _np.ndarray, _np.dtype, _np.dtypes.UInt32DType]
except AttributeError:  # pragma: no cover - an older numpy layout: format-1 checkpoints are then refused
    pass


def load_checkpoint_file(path: str | Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, so nothing in the file is ever run.

    A file holding any other object (a pickle with `__reduce__`, a custom class) is refused before it
    is built; a truncated or corrupt file is reported as such. Both raise CheckpointError (one line).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on a foreign pickle protocol: the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        detail = f"it names {named.group(1)}" if named else next((line.strip()[:120] for line in str(error).splitlines()
                                                                   if "Unsupported" in line), _first_sentence(error))
        raise UnsafeFileError(f"refusing '{path}': it holds objects other than tensors and plain data ({detail}), so it was not "
                              "written by ltsearch or was altered; nothing in it was loaded or run") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read checkpoint '{path}': it is truncated or corrupt ({type(error).__name__}: {_first_sentence(error)})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's state (see `Trainer.state_dict`), loaded safely and checked for every part."""
    state = load_checkpoint_file(path)
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
        raise CheckpointError(f"'{path}' is not an ltsearch training checkpoint (it lacks {', '.join(missing)})")
    if not isinstance(state["config"], dict) or not isinstance(state["epoch"], int) or isinstance(state["epoch"], bool):
        raise CheckpointError(f"'{path}' is not an ltsearch training checkpoint (its config or epoch is malformed)")
    return state


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """The files a resume may read, newest first: `checkpoint.pt`, then the one kept before it."""
    path = Path(path)
    if path.is_dir():
        return [p for p in (path / CHECKPOINT_FILE, path / PREVIOUS_CHECKPOINT_FILE) if p.is_file()]
    return [path] if path.is_file() else []


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> Python numbers and lists, so history and best load with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if isinstance(value, list) else tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy":
        return value.tolist() if hasattr(value, "tolist") else value.item()
    return value
