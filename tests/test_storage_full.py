"""A full disk, for real: a 300 KiB tmpfs (mounted here when the machine lets this user mount; skipped otherwise)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from ltsearch.cli import main


@pytest.fixture
def full_disk(tmp_path: Path):
    mount = Path("/tmp") / f"lts-full-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}); the full-disk case needs it")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)
    mount.rmdir()


def test_a_full_disk_is_one_clear_error_and_leaves_no_torn_file(full_disk: Path, capsys) -> None:
    out = full_disk / "run"
    assert main(["train", "--set", "train.epochs=3", "tracking.enabled=false", "--out", str(out), "--quiet"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write the checkpoint" in err[0] and "MiB free" in err[0], err
    assert not list(out.glob("*.tmp")), "a half-written temporary file was left behind"
    if (out / "checkpoint.pt").is_file():  # what was written before the disk filled up is whole and resumable
        from ltsearch.engine import Trainer

        assert Trainer.restore(out).epoch >= 1
