"""Training checkpoints on disk: their file names and format, writing them durably, and loading them without running anything.

Everything that writes one (`Trainer.save_checkpoint`, a published prefix, M2m's cached g) goes through
`save_state`, so each survives a crash the same way; everything that reads one (a resume, a warm start,
a shared prefix, M2m's cached g) goes through `load_checkpoint_file`, i.e. `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ltsearch.errors import CheckpointError, ConfigError, UnsafeFileError
from ltsearch.results import atomic_target

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


def load_weights(model: torch.nn.Module, path: str | Path, what: str, hint: str | None = None) -> None:
    """Load a state dict (bare or under 'model') into `model`; a mismatch is one line naming `what` and the file."""
    state = load_model_state(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise CheckpointError(f"{what} '{path}' does not fit this backbone: {' '.join(lines[:2])[:300]}" + (f"; {hint}" if hint else "")) from None


def warm_start(model: torch.nn.Module, source: str) -> None:
    """`train.init_from`: the backbone's weights (only) from a run directory or checkpoint file.

    Optimiser, epoch, RNG and augmenter state start fresh: this is how a method is switched on over a
    trained network (the "activated after the lr decay" regime of RSG, SAFA and M2m) without retraining it.
    """
    path = Path(source)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    try:
        model.load_state_dict(load_model_state(path))
    except (FileNotFoundError, RuntimeError, KeyError) as error:
        raise ConfigError("train.init_from", source, f"a run directory or checkpoint whose model matches this config's backbone and classes ({error})".split("\n")[0],
                          hint="Point it at a finished `ltsearch train` run of the same data and model.") from error


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


def read_latest_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path, str | None]:
    """(state, the file it came from, a warning or None) of the newest readable checkpoint at `path`.

    In a run directory a truncated or corrupt `checkpoint.pt` falls back to `checkpoint.prev.pt` (one
    epoch earlier), and the warning says so; a file holding code is never skipped over silently.
    """
    candidates = checkpoint_candidates(path)
    if not candidates:
        raise ConfigError("resume", str(path), f"a checkpoint file or a directory holding {CHECKPOINT_FILE}")
    first_error = None
    for candidate in candidates:
        try:
            state = read_checkpoint(candidate)
        except UnsafeFileError:
            raise
        except CheckpointError as error:
            first_error = first_error or error
            continue
        if candidate.name == PREVIOUS_CHECKPOINT_FILE:
            return state, candidate, f"warning: {first_error}; resuming from the previous checkpoint {candidate} (after epoch {state['epoch']})"
        return state, candidate, None
    raise first_error


# ------------------------------------------------------------------------------------ writing
def save_state(state: dict[str, Any], path: Path, what: str, *, keep_previous: Path | None = None) -> Path:
    """Write `state` (tensors and plain data) to `path` so that a crash at any moment leaves the old file or the new one, whole.

    The file is written beside `path`, flushed to disk, renamed over it, and the directory flushed so the
    rename itself is on disk. With `keep_previous` the file it replaces is first linked there (never a
    moment without a complete `path`). A full disk is one StorageError naming `what`; nothing torn is left.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path, what) as tmp:
        torch.save(state, tmp)
        _fsync(tmp)
        if keep_previous is not None and path.is_file():
            link_or_copy(path, keep_previous)
    _fsync_directory(path.parent)
    return path


def link_or_copy(source: Path, target: Path) -> None:
    """Put `source`'s content at `target`: a hard link (same filesystem), else a copy flushed to disk, made
    beside the target and renamed over it, so a reader, or a crash, never finds half a file there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # per process: several may link the same file at once
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another filesystem, or one without hard links
        try:
            shutil.copyfile(source, tmp)
            _fsync(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, target)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # a filesystem that cannot sync a directory still has the file itself on disk
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> Python numbers and lists, so history and best load with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if isinstance(value, list) else tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy":
        return value.tolist() if hasattr(value, "tolist") else value.item()
    return value
