"""Builders the hardening tests share (no tests here): crafted pickles, small fake data sets of every source kind,
and the CLI harness that runs `ltsearch.cli.main` in-process and reports (exit code, stderr, what changed on disk)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch

MARKER = "PWNED"  # what a crafted file's payload would create if anything in it ran


class Payload:
    """Unpickling this calls `open(marker, "w")`: the file appears if, and only if, the loader ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(path: Path, marker: Path, *, around: object = None, protocol: int = 2) -> Path:
    """A raw pickle whose loading would create `marker` (the payload sits inside `around`, a dict by default)."""
    payload = Payload(marker)
    value = {"model": payload, "data": payload, "label_names": payload} if around is None else around
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    return path


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A torch.save zip archive (the format ltsearch writes) with a payload in its pickle."""
    torch.save({"format": 2, "config": Payload(marker), "model": {"w": torch.zeros(1)}}, path)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


# ------------------------------------------------------------------------------------- data sources
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def fake_cifar10(root: Path, per_class: int = 2) -> Path:
    """`root/cifar-10-batches-py` in the python-pickle layout (protocol 2, as the originals), tiny and valid."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for name in CIFAR10_FILES:
        labels = [c for c in range(10) for _ in range(per_class)]
        batch = {"batch_label": name, "labels": labels, "data": rng.randint(0, 256, (len(labels), 3072)).astype(np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": 10 * per_class, "label_names": [f"class{c}" for c in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_npz(path: Path, **replace) -> Path:
    rng = np.random.RandomState(0)
    arrays = {"x_train": rng.randint(0, 256, (30, 8, 8, 3)).astype(np.uint8), "y_train": np.repeat(np.arange(3), 10),
              "x_test": rng.randint(0, 256, (9, 8, 8, 3)).astype(np.uint8), "y_test": np.repeat(np.arange(3), 3)}
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def png_bytes(side: int = 4) -> bytes:
    from torchvision.io import encode_png

    return bytes(encode_png(torch.full((3, side, side), 128, dtype=torch.uint8)).numpy().tobytes())


def image_root(root: Path, classes: int = 3, per_class: int = 2) -> Path:
    """`root` with train/test PNGs and train.txt / test.txt lists naming them."""
    image = png_bytes()
    for split in ("train", "test"):
        lines = []
        for c in range(classes):
            for i in range(per_class):
                relative = f"{split}/c{c}/img{i}.png"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                (root / relative).write_bytes(image)
                lines.append(f"{relative} {c}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------------------------------ harness
def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its content: what a refused command must leave unchanged."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha1(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[str(path.relative_to(root)) + "/"] = "dir"
    return out


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`ltsearch.cli.main(argv)` in-process: (exit code, stdout, stderr); argparse's SystemExit is an exit code too."""
    from ltsearch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def zip_without_central_directory(path: Path) -> None:
    """Cut a zip (npz, torch checkpoint) before its central directory: the classic torn write."""
    truncate(path, 0.6)
    assert not zipfile.is_zipfile(path)


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
