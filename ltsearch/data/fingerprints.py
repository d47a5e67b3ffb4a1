"""A trial trains on the images its run recorded: split fingerprints, checked inside every Ray trial.

`dataset.assemble` records a fingerprint of each split's image ids in `LongTailData.construction`, and
the driver tags its runs with them (`tracking.record.data_tags`). The driver builds each dataset once and
puts it in Ray's object store, but a trial can also hold data built elsewhere: a sweep whose space changes
data.* builds it per trial, and a resumed trial continues a checkpoint that was trained on data built
before, on another node or by another version. So each trial hashes the ids of the splits it holds and
compares them with

- the fingerprints recorded when its data was built (for shared data: the driver's, its tags), and
- `data_fingerprints.json` beside its checkpoint, written with each sweep checkpoint and when an
  ablation run first starts, if that record was made for the same data config (a PBT exploit across
  perturbed data.* keys changes the data on purpose),

and stops with DataMismatch naming both values on any difference. Hashing is SHA-1 over 8 bytes per image
(about a millisecond per 100k images), cheap enough for every trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ltsearch.config import to_dict
from ltsearch.data.dataset import LongTailData
from ltsearch.errors import DataError, DataMismatch
from ltsearch.results import write_json

SPLITS = ("train", "val", "test")
RECORD_FILE = "data_fingerprints.json"


def fingerprints(data: LongTailData) -> dict[str, str]:
    """{split: fingerprint}, hashed now from the image ids the splits hold."""
    return {name: data.split(name).fingerprint() for name in SPLITS}


def built_fingerprints(data: LongTailData) -> dict[str, str]:
    """{split: fingerprint} recorded when the data was built (what the driver tags); empty for hand-made data."""
    return {name: data.construction[f"{name}_fingerprint"] for name in SPLITS if f"{name}_fingerprint" in data.construction}


def check_trial_data(data: LongTailData, record_dir: str | Path | None = None) -> dict[str, str]:
    """Raise DataMismatch unless `data` has its built fingerprints and those of `record_dir`'s record; return them."""
    actual = fingerprints(data)
    _compare(actual, built_fingerprints(data), "were recorded when this data was built (the driver's data tags)")
    path = Path(record_dir) / RECORD_FILE if record_dir is not None else None
    if path is not None and path.is_file():
        record = _read(path)
        if record["data"] == _data_config(data):
            _compare(actual, record["fingerprints"], f"were recorded for this run's data config in {path}")
    return actual


def record_fingerprints(data: LongTailData, directory: str | Path, actual: Mapping[str, str] | None = None) -> None:
    """Write `directory/data_fingerprints.json`: the data config and the fingerprints a checkpoint was trained on."""
    record = {"data": _data_config(data), "fingerprints": dict(actual or fingerprints(data))}
    write_json(record, Path(directory) / RECORD_FILE)


def pin_run_data(data: LongTailData | None, run_dir: str | Path) -> None:
    """An ablation run: check its data against the driver's and its directory's record; record it on first start."""
    if data is None:
        return
    actual = check_trial_data(data, run_dir)
    if not (Path(run_dir) / RECORD_FILE).is_file():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        record_fingerprints(data, run_dir, actual)


def _compare(actual: Mapping[str, str], expected: Mapping[str, str], recorded: str) -> None:
    wrong = [name for name in SPLITS if name in expected and expected[name] != actual[name]]
    if wrong:
        differ = "; ".join(f"{name}: this trial holds {actual[name]}, expected {expected[name]}" for name in wrong)
        raise DataMismatch(f"the {', '.join(wrong)} split(s) of this trial are not the images that {recorded}: {differ}. "
                           "The data files or the long-tail construction differ between where the data was recorded and "
                           "this trial (another node, version or data.root); give every node the same files and ltsearch "
                           "version, or start a new run instead of resuming.")


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and isinstance(record.get("fingerprints"), dict) and "data" in record:
            return record
    except (OSError, ValueError):
        pass
    raise DataError(f"'{path}' is not a data fingerprint record written by ltsearch; remove it to accept this trial's data")


def _data_config(data: LongTailData) -> Any:
    """The data config as JSON reads it back, so a record compares equal to the config that wrote it."""
    return json.loads(json.dumps(to_dict(data.config), default=str))
