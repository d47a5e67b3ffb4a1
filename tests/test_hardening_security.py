"""Security: nothing a file holds is ever run, and a local sweep's Ray processes listen on the loopback interface only.

Every crafted file carries a pickle payload that would create a marker file when unpickled by a plain
`pickle.load` / `torch.load(weights_only=False)`; each test asserts the load is refused and the marker absent.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_hardening_support import MARKER, crafted_checkpoint, crafted_pickle, fake_cifar10, run_main
from ltsearch.config import load_run_config, load_yaml_text
from ltsearch.checkpoints import load_checkpoint_file
from ltsearch.engine import Trainer, reference_config, reference_key
from ltsearch.errors import CheckpointError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ltsearch"
DIGITS = ["train.device=cpu", "model.width=8", "train.epochs=1", "data.max_train_per_class=20", "data.max_eval_per_class=5"]


def test_the_payload_really_runs_under_an_unrestricted_loader(tmp_path: Path) -> None:
    """The control: the crafted files used below do create the marker when loaded the unsafe way."""
    path = crafted_pickle(tmp_path / "x.pt", tmp_path / MARKER)
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle-2", "raw-pickle-4"])
def test_trainer_restore_refuses_a_crafted_checkpoint_without_running_it(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if kind == "torch-zip":
        crafted_checkpoint(run / "checkpoint.pt", tmp_path / MARKER)
    else:
        crafted_pickle(run / "checkpoint.pt", tmp_path / MARKER, protocol=int(kind[-1]))
    with pytest.raises(CheckpointError, match="refusing"):
        Trainer.restore(run)
    assert not (tmp_path / MARKER).exists()


def test_a_crafted_newest_checkpoint_is_never_skipped_for_the_previous_one(tmp_path: Path) -> None:
    """Fallback to checkpoint.prev.pt is for torn files; a file holding code stops the resume."""
    trainer = Trainer(load_run_config(None, DIGITS))
    trainer.save_checkpoint(tmp_path)
    trainer.save_checkpoint(tmp_path)
    crafted_checkpoint(tmp_path / "checkpoint.pt", tmp_path / MARKER)
    with pytest.raises(CheckpointError, match="refusing"):
        Trainer.restore(tmp_path)
    assert not (tmp_path / MARKER).exists()


def test_ltsearch_train_resume_refuses_a_crafted_checkpoint_in_a_real_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "ltsearch.cli", "train", "--set", *DIGITS, "tracking.enabled=false", "--quiet", "--out", str(run)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    crafted_checkpoint(run / "checkpoint.pt", tmp_path / MARKER)
    config_before = (run / "config.yaml").read_bytes()
    resumed = subprocess.run([sys.executable, "-m", "ltsearch.cli", "train", "--resume", str(run), "--set", "train.epochs=3"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 2
    assert len(resumed.stderr.strip().splitlines()) == 1 and "refusing" in resumed.stderr, resumed.stderr
    assert not (tmp_path / MARKER).exists()
    assert (run / "config.yaml").read_bytes() == config_before  # the --set was not written into the run


def test_checkpoints_hold_only_what_weights_only_loading_accepts(tmp_path: Path) -> None:
    trainer = Trainer(load_run_config(None, [*DIGITS, "augmenter.name=smart", "augmenter.start_epoch=0"]))
    for result in trainer.run():
        result.save_checkpoint(tmp_path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "checkpoint.pt") == []
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["format"] == 3 and isinstance(state["rng"]["numpy"]["key"], list)


def test_format_1_checkpoints_with_a_numpy_rng_key_still_resume(tmp_path: Path) -> None:
    """Checkpoints written before format 2 held numpy's RNG state as its legacy tuple (an ndarray inside)."""
    config = load_run_config(None, [*DIGITS, "train.epochs=2"])
    trainer = Trainer(config)
    next(trainer.run())
    state = trainer.state_dict()
    state["format"], state["rng"]["numpy"] = 1, np.random.get_state()
    state["rng"]["python"] = tuple(state["rng"]["python"])
    torch.save(state, tmp_path / "checkpoint.pt")
    restored = Trainer.restore(tmp_path, config=config)
    assert restored.epoch == 1 and [r.epoch for r in restored.run()] == [1]


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    calls = [(path, line) for path in PACKAGE.rglob("*.py") for line in path.read_text().splitlines() if "torch.load(" in line]
    assert calls, "no torch.load found: the scan is broken"
    assert all("weights_only=True" in line for _, line in calls), calls
    unsafe = [str(p) for p in PACKAGE.rglob("*.py") if re.search(r"pickle\.loads?\(|weights_only=False|yaml\.unsafe_load|yaml\.load\((?!text, Loader=_Loader)",
                                                                  p.read_text())]
    assert unsafe == [], unsafe


def test_no_shell_strings_are_built_anywhere_in_the_package() -> None:
    sources = {path.relative_to(PACKAGE).as_posix(): path.read_text() for path in PACKAGE.rglob("*.py")}
    assert {"engine.py", "tracking/record.py", "tracking/server.py"} <= sources.keys(), "the scan found no package files"
    launches = [name for name, text in sources.items() if re.search(r"subprocess\.(run|Popen)\(", text)]
    assert launches, "no process launch found: the scan is broken"  # the package does start processes (git, MLflow's server)
    shell = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput")
    assert all(shell.search(line) for line in ("subprocess.run(command, shell=True)", "os.system(line)", "os.popen(line)"))
    assert [name for name, text in sources.items() if shell.search(text)] == []


# --------------------------------------------------------------------------------- M2m's cached g
def m2m_config(*extra: str):
    return load_run_config(None, [*DIGITS, "augmenter.name=m2m", "augmenter.start_epoch=0", "augmenter.m2m.reference_epochs=1", *extra])


def test_a_crafted_cached_reference_model_is_refused_without_running_it(tmp_path: Path) -> None:
    config = m2m_config()
    ref = reference_config(config, 1)
    cache = tmp_path / "cache"
    cache.mkdir()
    crafted_checkpoint(cache / f"reference-{config.model.name}-{reference_key(ref)}.pt", tmp_path / MARKER)
    trainer = Trainer(config, cache_dir=cache)
    with pytest.raises(CheckpointError, match="refusing"):
        next(trainer.run())
    assert not (tmp_path / MARKER).exists()


def test_a_crafted_reference_path_is_refused_without_running_it(tmp_path: Path) -> None:
    crafted_pickle(tmp_path / "g.pt", tmp_path / MARKER)
    trainer = Trainer(m2m_config(f"augmenter.m2m.reference_path={tmp_path / 'g.pt'}"), cache_dir=tmp_path / "cache")
    with pytest.raises(CheckpointError, match="refusing"):
        next(trainer.run())
    assert not (tmp_path / MARKER).exists()


def test_the_cached_reference_model_round_trips_with_weights_only(tmp_path: Path) -> None:
    trainer = Trainer(m2m_config(), cache_dir=tmp_path)
    next(trainer.run())
    (cached,) = tmp_path.glob("reference-*.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(cached) == []
    assert "model" in load_checkpoint_file(cached)


# -------------------------------------------------------------------------------------------- CIFAR
def cifar_with(root: Path, source: Path, replaced: str, marker: Path) -> Path:
    """A copy of a CIFAR-10 folder (links to the real files) with one file replaced by a crafted pickle."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (folder / path.name).symlink_to(path.resolve())
    (folder / replaced).unlink()
    crafted_pickle(folder / replaced, marker)
    return root


@pytest.mark.parametrize("replaced", ["batches.meta", "data_batch_1", "test_batch"])
def test_crafted_cifar_files_are_refused_without_running_them(tmp_path: Path, replaced: str) -> None:
    from ltsearch.data import build_dataset

    source = fake_cifar10(tmp_path / "fake") / ""
    root = cifar_with(tmp_path / "copy", source, replaced, tmp_path / MARKER)
    config = load_run_config(None, ["data.name=cifar10", f"data.root={root}", "data.imbalance=1"])
    with pytest.raises(DataError, match=f"refusing CIFAR file .*{replaced}"):
        build_dataset(config.data)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.cifar
def test_the_real_cifar10_files_load_through_the_restricted_unpickler(cifar_root: Path) -> None:
    from ltsearch.data.sources.cifar import CIFAR10_LAYOUT, _read_batches, _read_pickle

    folder = cifar_root / "cifar-10-batches-py"
    assert _read_pickle(folder / "batches.meta")["label_names"][0] == "airplane"
    images, labels = _read_batches(folder, ("data_batch_1",), CIFAR10_LAYOUT.label_key)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (10000,)


@pytest.mark.cifar
@pytest.mark.parametrize("replaced", ["batches.meta", "data_batch_1"])
def test_a_crafted_file_among_the_real_cifar10_files_is_refused(cifar_root: Path, tmp_path: Path, replaced: str) -> None:
    root = cifar_with(tmp_path / "copy", cifar_root / "cifar-10-batches-py", replaced, tmp_path / MARKER)
    code, _, err = run_main(["data", "--set", "data.name=cifar10", f"data.root={root}"])
    assert code == 2 and "refusing CIFAR file" in err and replaced in err, err
    assert not (tmp_path / MARKER).exists()


# -------------------------------------------------------------------------------------------- YAML
def test_yaml_is_read_with_the_safe_loader_only(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_yaml_text(f"x: !!python/object/apply:builtins.open ['{tmp_path / MARKER}', 'w']\n")
    assert not (tmp_path / MARKER).exists()


# --------------------------------------------------------------------------------- sweep locations
def test_a_sweep_directory_always_lands_directly_inside_its_storage_root(tmp_path: Path) -> None:
    from ltsearch.tune import load_sweep

    sweep = load_sweep(REPO / "search_spaces" / "quickstart.yaml", [f"storage={tmp_path}", "name=my-sweep"])
    directory = Path(sweep.default_dir())
    assert directory.parent == tmp_path.resolve() and directory.name.startswith("my-sweep-")
    for bad in ("../up", "a/b", "..", ".", ".hidden", "x" * 300, "tab\there"):
        with pytest.raises(ConfigError, match="config key 'name'"):
            load_sweep(REPO / "search_spaces" / "quickstart.yaml", [f"storage={tmp_path}", f"name={bad}"])


# ---------------------------------------------------------------------------------- network exposure
def _listening_sockets() -> dict[str, tuple[str, int]]:
    """inode -> (hex local address, port) of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                address, port = fields[1].split(":")
                sockets[fields[9]] = (address, int(port, 16))
    return sockets


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _listeners_of(pids: list[int]) -> set[tuple[int, str, int]]:
    sockets = _listening_sockets()
    found = set()
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in descriptors:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in sockets:
                found.add((pid, *sockets[target[8:-1]]))
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::ffff:127.0.0.1, ::1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc (Linux)")
def test_a_local_sweep_listens_on_loopback_only(tmp_path: Path) -> None:
    """`ltsearch tune` (local Ray) as a real process tree: every TCP listener of it and its Ray processes is on 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LTSEARCH_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "ltsearch.cli", "tune", str(REPO / "search_spaces" / "quickstart.yaml"), "--set", "train.epochs=2",
               "search.num_samples=1", "scheduler={name: fifo}", "tracking.enabled=false", "--out", str(tmp_path / "sweep")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    seen: set[tuple[int, str, int]] = set()
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            seen |= _listeners_of(_descendants(process.pid))
            time.sleep(0.3)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output
    assert len({port for _, _, port in seen}) >= 3, f"too few listeners seen to judge ({seen}); the scan missed the Ray processes"
    exposed = sorted((pid, address, port) for pid, address, port in seen if address not in LOOPBACK)
    assert exposed == [], f"listening beyond loopback: {exposed}"
