"""The bad-input corpus: every malformed input is refused before anything starts.

Each row is (id, command line, a text the error must contain, the files the case needs). Every case runs
`ltsearch.cli.main` in-process and must give: exit code 2, exactly one line on stderr that names the key
or file, no traceback, nothing written or changed under the case's directory (no run or sweep directory,
no MLflow store: conftest points MLFLOW_TRACKING_URI at a file that must stay absent, and no thread opening
one), no file a crafted input would create, and Ray not started, as a user would see it (`Refusal`): nothing
under the case's own RAY_TMPDIR (a local Ray writes its session directory there first), no process started
below this one, no Ray log line on the terminal. `ray.is_initialized()` cannot tell: `ray_session` shuts
down in `finally` what a refused command started.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from test_hardening_support import (MARKER, closed_port, crafted_checkpoint, crafted_pickle, fake_cifar10, image_root, run_main, snapshot,
                        truncate, write_npz, zip_without_central_directory)

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "search_spaces" / "quickstart.yaml")
DIGITS = str(REPO / "configs" / "digits.yaml")
FAST = ["--set", "train.epochs=1", "train.device=cpu"]  # a train case that is wrongly accepted finishes in seconds
#: one CPU more than this machine has (Ray's count is cgroup-aware, so never above os.cpu_count())
TOO_MANY_CPUS = str((os.cpu_count() or 1) + 1)
#: a small ablation (2 rows x 2 columns x 2 seed pairs on digits) that each ablate case breaks in one place
TINY_ABLATION = yaml.safe_dump({
    "name": "tiny", "base": DIGITS, "train": {"epochs": 2, "device": "cpu"}, "model": {"width": 16},
    "rows": {"CE": {"loss.name": "ce"}, "LDAM": {"loss.name": "ldam", "loss.ldam.max_m": 0.5}},
    "columns": {"data.imbalance": [10, 20]}, "seeds": {"train": [0, 1], "data": [0]}, "baseline": "CE",
    "reference": {"source": "a made-up table", "LDAM": {10: 95.0}}}, sort_keys=False)


# --------------------------------------------------------------------------------------- setups
def files(**contents: str | bytes) -> Callable[[Path], None]:
    """Write the named files (`__` in a name is a '/') under the case directory."""

    def setup(root: Path) -> None:
        for name, content in contents.items():
            path = root / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def cifar(change: Callable[[Path, Path], None] | None = None) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        folder = fake_cifar10(root / "cifar")
        if change is not None:
            change(folder, root)
    return setup


def npz(**replace) -> Callable[[Path], None]:
    return lambda root: write_npz(root / "d.npz", **replace)


def npz_then(change: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        write_npz(root / "d.npz")
        change(root / "d.npz")
    return setup


def images(change: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        image_root(root / "img")
        if change is not None:
            change(root / "img")
    return setup


def finished_run(change: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        shutil.copytree(RUN_TEMPLATE, root / "run")
        if change is not None:
            change(root / "run")
    return setup


def sweep_dir(root: Path) -> None:
    (root / "sweep").mkdir()
    (root / "sweep" / "notes.txt").write_text("not a sweep\n")


def corrupt_sweep_dir(root: Path) -> None:
    (root / "sweep").mkdir()
    (root / "sweep" / "sweep.yaml").write_text("space: {optim.lr: [\n")


def base_cycle(root: Path) -> None:
    (root / "a.yaml").write_text("base: b.yaml\ntrain: {epochs: 1}\n")
    (root / "b.yaml").write_text("base: a.yaml\n")


def nothing(root: Path) -> None:
    pass


def tiny(root: Path) -> None:
    (root / "tiny.yaml").write_text(TINY_ABLATION)


def saved_sweep(root: Path) -> None:
    """A sweep directory as `ltsearch tune` leaves it when stopped before its first trial: sweep.yaml alone."""
    from ltsearch.tune import load_sweep

    (root / "sweep").mkdir()
    (root / "sweep" / "sweep.yaml").write_text(yaml.safe_dump(load_sweep(QUICK, []).raw, sort_keys=False))


def saved_ablation(content: str | None = None) -> Callable[[Path], None]:
    """An ablation directory holding ablation.yaml: the tiny ablation as `ltsearch ablate` saves it, or `content`."""
    def setup(root: Path) -> None:
        from ltsearch.ablate.settings import load_ablation

        tiny(root)
        (root / "abl").mkdir()
        saved = yaml.safe_dump(load_ablation(root / "tiny.yaml").raw, sort_keys=False) if content is None else content
        (root / "abl" / "ablation.yaml").write_text(saved)
    return setup


def evil_meta(folder: Path, root: Path) -> None:
    crafted_pickle(folder / "batches.meta", root / MARKER)


def evil_batch(folder: Path, root: Path) -> None:
    crafted_pickle(folder / "data_batch_1", root / MARKER)


def evil_test_batch_protocol4(folder: Path, root: Path) -> None:
    crafted_pickle(folder / "test_batch", root / MARKER, protocol=4)


def object_array_batch(folder: Path, root: Path) -> None:
    import pickle

    data = np.empty((20, 3072), dtype=object)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": data, "labels": list(range(20))}, protocol=2))


def wrong_shape_batch(folder: Path, root: Path) -> None:
    import pickle

    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((20, 100), np.uint8), "labels": [0] * 20}, protocol=2))


def meta_without_names(folder: Path, root: Path) -> None:
    import pickle

    (folder / "batches.meta").write_bytes(pickle.dumps({"num_vis": 3072}, protocol=2))


def label_out_of_range(folder: Path, root: Path) -> None:
    import pickle

    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}, protocol=2))


def evil_checkpoint_in_run(run: Path) -> None:
    crafted_checkpoint(run / "checkpoint.pt", run.parent / MARKER)
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)


def raw_evil_checkpoint_in_run(run: Path) -> None:
    crafted_pickle(run / "checkpoint.pt", run.parent / MARKER)
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)


def truncated_checkpoint_alone(run: Path) -> None:
    truncate(run / "checkpoint.pt")
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)


def not_a_checkpoint(run: Path) -> None:
    import torch

    torch.save({"weights": torch.zeros(2)}, run / "checkpoint.pt")
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)


def evil_init_from(root: Path) -> None:
    crafted_checkpoint(root / "init.pt", root / MARKER)


LONG = "n" * 300
LONG_NAME = "t" * 120  # a RAY_TMPDIR below the case's own whose socket paths would be too long

# (id, argv, needle, setup). `{r}` is the case directory (the working directory is {r}/work).
CASES: list[tuple[str, list[str], str, Callable[[Path], None]]] = [
    # ------------------------------------------------------------- files and YAML (one line: file:line:col: problem)
    ("train-missing-config", ["train", "{r}/nope.yaml"], "nope.yaml", nothing),
    ("train-config-is-directory", ["train", "{r}/cfgdir"], "not a directory", files(cfgdir__x="")),
    ("train-empty-config", ["train", "{r}/empty.yaml"], "the file is empty", files(**{"empty.yaml": ""})),
    ("check-comments-only", ["check", "{r}/c.yaml"], "the file is empty", files(**{"c.yaml": "# nothing\n\n"})),
    ("data-empty-config", ["data", "{r}/e.yaml"], "e.yaml", files(**{"e.yaml": "\n"})),
    ("train-unclosed-flow", ["train", "{r}/bad.yaml"], "bad.yaml:2:1: not valid YAML", files(**{"bad.yaml": "optim: {lr: 0.1\n"})),
    ("check-bad-indent", ["check", "{r}/bad.yaml"], "bad.yaml:3:5: not valid YAML", files(**{"bad.yaml": "optim:\n  lr: 0.1\n   x: 2\n"})),
    ("tune-tab-indent", ["tune", "{r}/t.yaml"], "t.yaml:2:1: not valid YAML", files(**{"t.yaml": "space:\n\toptim.lr: 1\n"})),
    ("data-python-tag", ["data", "{r}/evil.yaml"], "evil.yaml:1:4: not valid YAML",
     files(**{"evil.yaml": "a: !!python/object/apply:builtins.open ['{r}/PWNED', 'w']\n"})),
    ("train-top-level-list", ["train", "{r}/l.yaml"], "mapping at the top level", files(**{"l.yaml": "- 1\n- 2\n"})),
    ("train-not-utf8", ["train", "{r}/b.yaml"], "UTF-8", files(**{"b.yaml": b"optim: {lr: 0.1}\n\xff\xfe\n"})),
    ("check-base-cycle", ["check", "{r}/a.yaml"], "loops: a.yaml -> b.yaml -> a.yaml", base_cycle),
    ("train-base-self-cycle", ["train", "{r}/s.yaml"], "loops: s.yaml -> s.yaml", files(**{"s.yaml": "base: s.yaml\n"})),
    ("check-base-missing", ["check", "{r}/c.yaml"], "missing.yaml", files(**{"c.yaml": "base: missing.yaml\n"})),
    ("train-base-not-a-path", ["train", "{r}/c.yaml"], "config key 'base'", files(**{"c.yaml": "base: 5\n"})),
    ("train-set-without-value", ["train", "--set", "optim.lr"], "dotted.key=value", nothing),
    ("train-set-bad-yaml", ["train", "--set", "optim.lr=[1,"], "optim.lr", nothing),
    ("data-set-empty-key-part", ["data", "--set", "data..name=x"], "--set", nothing),
    ("tune-no-file", ["tune"], "config key 'file'", nothing),
    ("train-unknown-option", ["train", "--out"], "--out", nothing),
    # --------------------------------------------------------------------------- unknown keys, with "did you mean"
    ("train-typo-optim-key", ["train", "--set", "optim.lrr=0.1"], "Did you mean 'lr'?", nothing),
    ("check-typo-section", ["check", "{r}/c.yaml"], "Did you mean 'train'?", files(**{"c.yaml": "trian: {epochs: 3}\n"})),
    ("data-typo-data-key", ["data", "--set", "data.imbalanse=10"], "Did you mean 'imbalance'?", nothing),
    ("tune-typo-search-section", ["tune", QUICK, "--set", "searh.num_samples=2"], "Did you mean 'search'?", nothing),
    ("tune-typo-search-key", ["tune", QUICK, "--set", "search.num_sample=2"], "Did you mean 'num_samples'?", nothing),
    ("check-typo-space-key", ["check", QUICK, "--set", "space.optim.lrr={loguniform: [0.01, 0.1]}"], "Did you mean 'optim.lr'?", nothing),
    ("train-typo-loss-name", ["train", "--set", "loss.name=ldma"], "Did you mean 'ldam'?", nothing),
    ("train-typo-augmenter-name", ["train", "--set", "augmenter.name=smrt"], "Did you mean 'smart'?", nothing),
    ("tune-typo-scheduler-name", ["tune", QUICK, "--set", "scheduler.name=ashaa"], "Did you mean 'asha'?", nothing),
    ("check-typo-sampler", ["check", QUICK, "--set", "search.sampler=tpee"], "Did you mean 'tpe'?", nothing),
    ("train-typo-method-key", ["train", "--set", "augmenter.smart.tua=1"], "Did you mean 'tau'?", nothing),
    ("tune-typo-resources-key", ["tune", QUICK, "--set", "resources.cpus=1"], "Did you mean 'cpu'?", nothing),
    ("data-typo-dataset", ["data", "--set", "data.name=cifar01"], "Did you mean 'cifar10'?", nothing),
    # ------------------------------------------------------------------------------------------------ wrong types
    ("train-lr-string", ["train", "--set", "optim.lr=abc"], "optim.lr", nothing),
    ("train-epochs-fraction", ["train", "--set", "train.epochs=2.5"], "train.epochs", nothing),
    ("train-amp-number", ["train", "--set", "train.amp=3"], "train.amp", nothing),
    ("data-name-list", ["data", "--set", "data.name=[1, 2]"], "data.name", nothing),
    ("check-num-samples-word", ["check", QUICK, "--set", "search.num_samples=ten"], "search.num_samples", nothing),
    ("train-section-scalar", ["train", "--set", "optim=5"], "config key 'optim'", nothing),
    ("tune-resources-scalar", ["tune", QUICK, "--set", "resources=3"], "resources", nothing),
    ("check-space-scalar", ["check", QUICK, "--set", "space.optim.lr=5"], "space.optim.lr", nothing),
    # ------------------------------------------------------------------------------------------------- nan and inf
    ("train-lr-nan", ["train", "--set", "optim.lr=.nan"], "'optim.lr': got nan", nothing),
    ("train-lr-inf", ["train", "--set", "optim.lr=.inf"], "'optim.lr': got inf", nothing),
    ("train-smart-tau-nan", ["train", "--set", "augmenter.name=smart", "augmenter.smart.tau=.nan"], "augmenter.smart.tau", nothing),
    ("train-head-ratio-nan", ["train", "--set", "augmenter.head_ratio=.nan"], "augmenter.head_ratio", nothing),
    ("data-imbalance-nan", ["data", "--set", "data.imbalance=.nan"], "data.imbalance", nothing),
    ("data-imbalance-minus-inf", ["data", "--set", "data.imbalance=-.inf"], "data.imbalance", nothing),
    ("train-weight-decay-inf", ["train", "--set", "optim.weight_decay=.inf"], "optim.weight_decay", nothing),
    ("train-grad-clip-nan", ["train", "--set", "optim.grad_clip=.nan"], "optim.grad_clip", nothing),
    ("train-beta-nan", ["train", "--set", "loss.reweight.beta=.nan"], "loss.reweight.beta", nothing),
    ("check-space-bound-inf", ["check", QUICK, "--set", "space.optim.lr={uniform: [0.01, .inf]}"], "finite number", nothing),
    ("check-space-choice-nan", ["check", QUICK, "--set", "space.optim.lr={choice: [0.1, .nan]}"], "space.optim.lr", nothing),
    ("tune-cpu-inf", ["tune", QUICK, "--set", "resources.cpu=.inf"], "resources.cpu", nothing),
    ("train-ldam-margin-nan", ["train", "--set", "loss.name=ldam", "loss.ldam.max_m=.nan"], "loss.ldam.max_m", nothing),
    # ----------------------------------------------------------------------------------------------- out of range
    ("train-lr-negative", ["train", "--set", "optim.lr=-1"], "optim.lr", nothing),
    ("train-momentum-above-1", ["train", "--set", "optim.momentum=1.5"], "optim.momentum", nothing),
    ("data-val-fraction-1", ["data", "--set", "data.val_fraction=1"], "data.val_fraction", nothing),
    ("train-zero-epochs", ["train", "--set", "train.epochs=0"], "train.epochs", nothing),
    ("train-head-ratio-above-1", ["train", "--set", "augmenter.head_ratio=1.5"], "augmenter.head_ratio", nothing),
    ("train-insert-at-beyond-backbone", ["train", "--set", "augmenter.name=smart", "augmenter.insert_at=99"], "augmenter.insert_at", nothing),
    ("tune-zero-samples", ["tune", QUICK, "--set", "search.num_samples=0"], "search.num_samples", nothing),
    ("check-negative-failures", ["check", QUICK, "--set", "max_failures=-1"], "max_failures", nothing),
    ("train-select-on-test", ["train", "--set", "train.select_metric=test/top1"], "train.select_metric", nothing),
    ("tune-metric-on-test", ["tune", QUICK, "--set", "metric=test/top1"], "config key 'metric'", nothing),
    # ---------------------------------------------------------------------------------------- invalid distributions
    ("check-low-above-high", ["check", QUICK, "--set", "space.optim.lr={loguniform: [0.2, 0.1]}"], "low <= high", nothing),
    ("check-loguniform-zero", ["check", QUICK, "--set", "space.optim.lr={loguniform: [0, 0.1]}"], "low > 0", nothing),
    ("check-empty-choice", ["check", QUICK, "--set", "space.model.width={choice: []}"], "non-empty list", nothing),
    ("check-int-fraction-bounds", ["check", QUICK, "--set", "space.model.width={int: [1.5, 3]}"], "integer bounds", nothing),
    ("check-two-distributions", ["check", QUICK, "--set", "space.optim.lr={uniform: [0, 1], choice: [1]}"], "one distribution", nothing),
    ("check-zero-step", ["check", QUICK, "--set", "space.optim.lr={uniform: [0.01, 0.1], step: 0}"], "step > 0", nothing),
    ("check-duplicate-choice", ["check", QUICK, "--set", "space.model.width={choice: [16, 16]}"], "distinct values", nothing),
    ("tune-range-outside-config", ["tune", QUICK, "--set", "space.optim.lr={uniform: [-1, 0.1]}"], "space.optim.lr", nothing),
    ("check-empty-space", ["check", QUICK, "--set", "space={}"], "config key 'space'", nothing),
    # ------------------------------------------------------------------------------- schedulers against the epochs
    ("check-asha-grace-above-epochs", ["check", QUICK, "--set", "train.epochs=1"], "scheduler.grace_period", nothing),
    ("tune-asha-grace-above-max-t", ["tune", QUICK, "--set", "scheduler={name: asha, grace_period: 5, max_t: 3}"], "scheduler.grace_period", nothing),
    ("check-asha-max-t-above-epochs", ["check", QUICK, "--set", "scheduler.max_t=50"], "scheduler.max_t", nothing),
    ("tune-hyperband-max-t-above-epochs", ["tune", QUICK, "--set", "scheduler={name: hyperband, max_t: 100}"], "scheduler.max_t", nothing),
    ("check-median-grace-at-epochs", ["check", QUICK, "--set", "scheduler={name: median, grace_period: 30}"], "scheduler.grace_period", nothing),
    ("check-pbt-interval-at-epochs", ["check", QUICK, "--set", "search.sampler=random", "space.loss.ldam.max_m=null", "space.loss.name=null",
                                      "scheduler={name: pbt, perturbation_interval: 30}"], "scheduler.perturbation_interval", nothing),
    ("tune-fifo-with-parameters", ["tune", QUICK, "--set", "scheduler={name: fifo, grace_period: 2}"], "scheduler.grace_period", nothing),
    # ------------------------------------------------------------------------------ resources this machine lacks
    ("tune-more-gpus-than-any", ["tune", QUICK, "--set", "resources.gpu=4096"], "resources.gpu", nothing),
    ("tune-more-cpus-than-here", ["tune", QUICK, "--set", f"resources.cpu={TOO_MANY_CPUS}"], "resources.cpu", nothing),
    ("tune-gpu-fraction-above-1", ["tune", QUICK, "--set", "resources.gpu=1.5"], "resources.gpu", nothing),
    # ------------------------------------------------------------------------------------- data files, every source
    ("train-cifar-missing-root", ["train", "--set", "data.name=cifar10", "data.root={r}/nowhere"], "CIFAR-10 files not found", nothing),
    ("tune-cifar-missing-root", ["tune", QUICK, "--set", "data.name=cifar10", "data.root={r}/nowhere"], "CIFAR-10 files not found", nothing),
    ("data-cifar100-missing", ["data", "--set", "data.name=cifar100", "data.root={r}"], "CIFAR-100 files not found", nothing),
    ("data-cifar-crafted-meta", ["data", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "refusing CIFAR file", cifar(evil_meta)),
    ("train-cifar-crafted-batch", ["train", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "refusing CIFAR file", cifar(evil_batch)),
    ("tune-cifar-crafted-test-batch", ["tune", QUICK, "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "refusing CIFAR file", cifar(evil_test_batch_protocol4)),
    ("data-cifar-truncated-batch", ["data", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "truncated or corrupt", cifar(lambda folder, root: truncate(folder / "data_batch_2"))),
    ("data-cifar-empty-batch", ["data", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "data_batch_4", cifar(lambda folder, root: (folder / "data_batch_4").write_bytes(b""))),
    ("data-cifar-object-array", ["data", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "array of Python objects", cifar(object_array_batch)),
    ("train-cifar-wrong-shape", ["train", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "expected (N, 3072)", cifar(wrong_shape_batch)),
    ("data-cifar-meta-without-names", ["data", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "label_names", cifar(meta_without_names)),
    ("data-cifar-label-out-of-range", ["data", "--set", "data.name=cifar10", "data.root={r}/cifar", "data.imbalance=1"],
     "outside 0..9", cifar(label_out_of_range)),
    ("train-npz-missing", ["train", "--set", "data.name=npz", "data.path={r}/none.npz"], "none.npz", nothing),
    ("train-npz-path-unset", ["train", "--set", "data.name=npz"], "data.path", nothing),
    ("data-npz-truncated", ["data", "--set", "data.name=npz", "data.path={r}/d.npz"], "truncated, corrupt", npz_then(zip_without_central_directory)),
    ("train-npz-text-file", ["train", "--set", "data.name=npz", "data.path={r}/d.npz"], "d.npz", files(**{"d.npz": "x_train,y_train\n1,2\n"})),
    ("data-npz-lacks-arrays", ["data", "--set", "data.name=npz", "data.path={r}/d.npz"], "lacks", npz(x_test=None)),
    ("data-npz-object-array", ["data", "--set", "data.name=npz", "data.path={r}/d.npz"], "d.npz",
     npz(y_train=np.array([{"a": 1}] * 30, dtype=object))),
    ("train-npz-float-pixels", ["train", "--set", "data.name=npz", "data.path={r}/d.npz"], "uint8", npz(x_train=np.zeros((30, 8, 8, 3)))),
    ("tune-npz-truncated", ["tune", QUICK, "--set", "data.name=npz", "data.path={r}/d.npz"], "truncated, corrupt",
     npz_then(zip_without_central_directory)),
    ("train-imagelist-missing-image", ["train", "--set", "data.name=imagelist", "data.root={r}/img", "data.train_list=train.txt",
                                       "data.test_list=test.txt", "data.image_size=4", "model.name=resnet32"], "img0.png' does not exist",
     images(lambda root: (root / "train" / "c1" / "img0.png").unlink())),
    ("tune-imagelist-missing-image", ["tune", QUICK, "--set", "data.name=imagelist", "data.root={r}/img", "data.train_list=train.txt",
                                      "data.test_list=test.txt", "data.image_size=4", "model.name=resnet32"], "does not exist",
     images(lambda root: (root / "test" / "c2" / "img1.png").unlink())),
    ("data-imagelist-empty-image", ["data", "--set", "data.name=imagelist", "data.root={r}/img", "data.train_list=train.txt",
                                    "data.test_list=test.txt"], "is empty", images(lambda root: (root / "train" / "c0" / "img1.png").write_bytes(b""))),
    ("data-imagelist-not-an-image", ["data", "--set", "data.name=imagelist", "data.root={r}/img", "data.train_list=train.txt",
                                     "data.test_list=test.txt"], "is not a JPEG", images(lambda root: (root / "train" / "c0" / "img1.png").write_text("hi"))),
    ("train-imagelist-list-missing", ["train", "--set", "data.name=imagelist", "data.root={r}/img", "data.train_list=nope.txt",
                                      "data.test_list=test.txt"], "nope.txt", images()),
    ("data-imagelist-escapes-root", ["data", "--set", "data.name=imagelist", "data.root={r}/img", "data.train_list=evil.txt",
                                     "data.test_list=test.txt"], "not a path inside data.root",
     images(lambda root: (root / "evil.txt").write_text("../../etc/passwd 0\n"))),
    ("train-imagelist-bad-line", ["train", "--set", "data.name=imagelist", "data.root={r}/img", "data.train_list=bad.txt",
                                  "data.test_list=test.txt"], "bad.txt:1:", images(lambda root: (root / "bad.txt").write_text("just-a-path\n"))),
    ("train-weights-missing", ["train", "--set", "model.weights={r}/w.pt"], "model.weights", nothing),
    ("train-init-from-missing", ["train", "--set", "train.init_from={r}/nope"], "train.init_from", nothing),
    ("train-init-from-crafted", ["train", "--set", "train.init_from={r}/init.pt"], "refusing", evil_init_from),
    ("tune-init-from-crafted", ["tune", QUICK, "--set", "train.init_from={r}/init.pt"], "refusing", evil_init_from),
    # ----------------------------------------------------------------------------------------- --out and --resume
    ("train-out-holds-a-run", ["train", *FAST, "--out", "{r}/run"], "--resume", finished_run()),
    ("train-out-is-a-file", ["train", *FAST, "--out", "{r}/f"], "is a file", files(f="x")),
    ("tune-out-exists", ["tune", QUICK, "--out", "{r}/sweep"], "--out", sweep_dir),
    ("tune-out-under-a-file", ["tune", QUICK, "--out", "{r}/f/sweep"], "is a file", files(f="x")),
    ("train-resume-not-a-run", ["train", "--resume", "{r}/sweep"], "--resume", sweep_dir),
    ("train-resume-nonexistent", ["train", "--resume", "{r}/gone"], "--resume", nothing),
    ("train-resume-with-config", ["train", DIGITS, "--resume", "{r}/run"], "--resume", finished_run()),
    ("tune-resume-not-a-sweep", ["tune", "--resume", "{r}/sweep"], "--resume", sweep_dir),
    ("tune-resume-with-file", ["tune", QUICK, "--resume", "{r}/sweep"], "a sweep directory alone", sweep_dir),
    ("tune-resume-corrupt-sweep-file", ["tune", "--resume", "{r}/sweep"], "sweep.yaml:2:1: not valid YAML", corrupt_sweep_dir),
    ("tune-resume-before-first-trial", ["tune", "--resume", "{r}/sweep"], "experiment state", saved_sweep),
    ("train-resume-shrinks-epochs", ["train", "--resume", "{r}/run", "--set", "train.epochs=1"], "train.epochs", finished_run()),
    ("train-resume-crafted-checkpoint", ["train", "--resume", "{r}/run"], "refusing", finished_run(evil_checkpoint_in_run)),
    ("train-resume-crafted-raw-pickle", ["train", "--resume", "{r}/run"], "refusing", finished_run(raw_evil_checkpoint_in_run)),
    ("train-resume-truncated-no-previous", ["train", "--resume", "{r}/run"], "truncated or corrupt", finished_run(truncated_checkpoint_alone)),
    ("train-resume-foreign-checkpoint", ["train", "--resume", "{r}/run"], "not an ltsearch training checkpoint", finished_run(not_a_checkpoint)),
    ("train-resume-changed-width", ["train", "--resume", "{r}/run", "--set", "model.width=64"], "does not fit", finished_run()),
    # ------------------------------------------------------------------------------------------ cluster addresses
    ("tune-address-closed-port", ["tune", QUICK, "--address", "127.0.0.1:{port}"], "nothing accepts connections", nothing),
    ("tune-address-no-port", ["tune", QUICK, "--address", "localhost"], "IP:PORT", nothing),
    ("tune-address-port-out-of-range", ["tune", QUICK, "--address", "127.0.0.1:99999"], "IP:PORT", nothing),
    ("tune-ray-client-closed-port", ["tune", QUICK, "--address", "ray://127.0.0.1:{port}"], "nothing accepts connections", nothing),
    # ------------------------------------------------------------------------------------- names, storage, paths
    ("check-name-traversal", ["check", QUICK, "--set", "name=../../escape"], "config key 'name'", nothing),
    ("tune-name-dotdot", ["tune", QUICK, "--set", "name=.."], "config key 'name'", nothing),
    ("tune-name-300-chars", ["tune", QUICK, "--set", f"name={LONG}"], "at most 200 characters", nothing),
    ("check-name-hidden", ["check", QUICK, "--set", "name=.hidden"], "config key 'name'", nothing),
    ("tune-storage-unknown-scheme", ["tune", QUICK, "--set", "storage=foo://bucket/x"], "config key 'storage'", nothing),
    ("tune-storage-is-a-file", ["tune", QUICK, "--set", "storage={r}/f"], "is a file", files(f="x")),
    ("tune-long-ray-tmpdir", ["tune", QUICK, "--set", "train.epochs=3"], "RAY_TMPDIR", nothing),
    # ------------------------------------------------------------------------------------------------ ui and runs
    ("runs-missing-store", ["runs", "--set", "tracking.uri=sqlite:///{r}/none.db"], "tracking.uri", nothing),
    ("ui-missing-store", ["ui", "--port", "5999", "--set", "tracking.uri=sqlite:///{r}/none.db"], "tracking.uri", nothing),
    ("ui-port-out-of-range", ["ui", "--port", "99999"], "--port", nothing),
    ("ui-port-not-a-number", ["ui", "--port", "http"], "--port", nothing),
    ("runs-zero-limit", ["runs", "--limit", "0"], "--limit", nothing),
    # --------------------------------------------------------------------------------------------------- ablate
    ("ablate-unknown-baseline", ["ablate", "{r}/tiny.yaml", "--set", "baseline=nobody", "--out", "{r}/out"], "baseline", tiny),
    ("ablate-row-sets-an-inactive-key", ["ablate", "{r}/tiny.yaml", "--set", "rows.LDAM={loss.name: ce, loss.ldam.max_m: 0.5}",
                                         "--out", "{r}/out"], "loss.ldam.max_m", tiny),
    ("ablate-typo-columns", ["ablate", "{r}/tiny.yaml", "--set", "colums={}", "--out", "{r}/out"], "colums", tiny),
    ("ablate-empty-column", ["ablate", "{r}/tiny.yaml", "--set", "columns={data.imbalance: []}", "--out", "{r}/out"],
     "columns.data.imbalance", tiny),
    ("ablate-duplicate-seeds", ["ablate", "{r}/tiny.yaml", "--set", "seeds={train: [0, 0]}", "--out", "{r}/out"], "seeds.train", tiny),
    ("ablate-reference-without-source", ["ablate", "{r}/tiny.yaml", "--set", "reference={LDAM: {10: 95.0}}", "--out", "{r}/out"],
     "reference.source", tiny),
    ("ablate-row-negative-lr", ["ablate", "{r}/tiny.yaml", "--set", "rows.CE={optim.lr: -1}", "--out", "{r}/out"], "optim.lr", tiny),
    ("ablate-more-cpus-than-here", ["ablate", "{r}/tiny.yaml", "--set", f"resources.cpu={TOO_MANY_CPUS}", "--out", "{r}/out"],
     "resources.cpu", tiny),
    ("ablate-cifar-missing-root", ["ablate", "{r}/tiny.yaml", "--set", "data.name=cifar10", "data.root={r}/nowhere", "--out", "{r}/out"],
     "CIFAR-10 files not found", tiny),
    ("ablate-no-file", ["ablate"], "config key 'file'", nothing),
    ("ablate-missing-file", ["ablate", "{r}/nope.yaml"], "nope.yaml", nothing),
    ("ablate-unclosed-flow", ["ablate", "{r}/bad.yaml"], "bad.yaml:2:1: not valid YAML", files(**{"bad.yaml": "rows: [\n"})),
    ("ablate-not-utf8", ["ablate", "{r}/b.yaml"], "UTF-8", files(**{"b.yaml": b"name: x\n\xff\xfe\n"})),
    ("ablate-out-holds-something-else", ["ablate", "{r}/tiny.yaml", "--out", "{r}/sweep"], "--out",
     lambda root: (tiny(root), sweep_dir(root))),
    ("ablate-address-closed-port", ["ablate", "{r}/tiny.yaml", "--address", "127.0.0.1:{port}", "--out", "{r}/out"],
     "nothing accepts connections", tiny),
    ("ablate-resume-not-an-ablation", ["ablate", "--resume", "{r}/sweep"], "--resume", sweep_dir),
    ("ablate-resume-with-file", ["ablate", "{r}/tiny.yaml", "--resume", "{r}/abl"], "an ablation directory alone", saved_ablation()),
    ("ablate-resume-corrupt-file", ["ablate", "--resume", "{r}/abl"], "ablation.yaml:2:1: not valid YAML", saved_ablation("rows: [\n")),
    ("ablate-resume-empty-file", ["ablate", "--resume", "{r}/abl"], "ablation.yaml", saved_ablation("")),
    # --------------------------------------------------------------------------------------------------- report
    ("report-missing-directory", ["report", "{r}/gone"], "gone", nothing),
    ("report-unknown-name", ["report", "nosuch", "--storage", "{r}"], "nosuch-*", nothing),
    ("report-neither-kind-of-directory", ["report", "{r}/sweep"], "sweep.yaml", sweep_dir),
    ("report-corrupt-sweep-file", ["report", "{r}/sweep"], "sweep.yaml:2:1: not valid YAML", corrupt_sweep_dir),
    ("report-corrupt-ablation-file", ["report", "{r}/abl"], "ablation.yaml:2:1: not valid YAML", saved_ablation("rows: [\n")),
    ("report-empty-ablation-file", ["report", "{r}/abl"], "ablation.yaml", saved_ablation("")),
    ("report-latex-for-a-sweep", ["report", "{r}/sweep", "--format", "latex"], "--format", saved_sweep),
    ("report-importance-of-an-unfinished-sweep", ["report", "{r}/sweep", "--importance"], "trials.parquet", saved_sweep),
    ("report-importance-of-an-ablation", ["report", "{r}/abl", "--importance"], "--importance", saved_ablation()),
    ("report-unknown-format", ["report", "{r}/abl", "--format", "pdf"], "--format", saved_ablation()),
    ("report-top-not-a-number", ["report", "{r}/sweep", "--top", "x"], "--top", saved_sweep),
    ("report-no-target", ["report"], "target", nothing),
]


def _template(tmp_path_factory) -> Path:
    from ltsearch.cli import main

    out = tmp_path_factory.mktemp("template") / "run"
    assert main(["train", "--set", "train.epochs=2", "train.device=cpu", "model.width=8", "tracking.enabled=false", "--quiet",
                 "--out", str(out)]) == 0
    return out


RUN_TEMPLATE: Path = Path("/nonexistent")


@pytest.fixture(scope="module", autouse=True)
def run_template(tmp_path_factory):
    """One finished 2-epoch digits run (with checkpoint.prev.pt), copied into the cases that need a run."""
    global RUN_TEMPLATE
    RUN_TEMPLATE = _template(tmp_path_factory)
    yield RUN_TEMPLATE


@pytest.fixture(autouse=True)
def restore_environment():
    """`ltsearch tune --address` switches Ray's token auth on in its own environment (cli/tune.py); in-process, that
    would leak into later tests that start Ray here, so every case gets the environment back as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 80 and len({case[0] for case in CASES}) == len(CASES)
    commands = {case[1][0] for case in CASES}
    assert {"train", "data", "check", "tune", "ablate", "report", "ui", "runs"} == commands


#: Ray's own log lines as a terminal shows them: its Python loggers' format, and what its processes print
RAY_LOG = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+\.py:\d+ -- |\((?:raylet|gcs_server|pid=\d+)[^)]*\)|"
                     r"Started a local Ray instance|Connecting to existing Ray cluster")


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(child) for child in task.read_text().split())
        except OSError:  # the process or thread has just ended
            pass
    return found


def _descendants(skip: frozenset[int] = frozenset()) -> set[int]:
    """This process's descendants, walked down through /proc/<pid>/task/*/children (no other process is looked at),
    leaving out the subtrees of `skip` (processes an earlier test left running, and whatever they start)."""
    found, todo = set(), [os.getpid()]
    while todo:
        for child in _children(todo.pop()) - found - skip:
            found.add(child)
            todo.append(child)
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:160] or f"pid {pid}"
    except OSError:
        return f"pid {pid} (ended)"


class _RayRecords(logging.Handler):
    """Every record Ray's Python loggers emit at INFO or above (what `ray.init` prints to a terminal)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:200])


class Refusal:
    """What a user would see of a refused command besides its exit code and its one line: whether anything
    started. Enter before the command, then `problems(...)` lists every rule it broke (empty: refused cleanly).

    - Ray: a local Ray writes its session directory under $RAY_TMPDIR before it starts a process, and its GCS
      server and raylet are children of the process that called `ray.init`; so the case gets a RAY_TMPDIR of
      its own, which must stay empty, and every process started below this one during the command is
      recorded by a thread looking every 10 ms. Ray's log lines: its loggers' records at INFO and above, and
      Ray-formatted lines on the file descriptors (capfd), where a C++ core or a pre-bound handler writes.
    - MLflow: no thread opening a store (`prewarm`, a Tracker) and, once such a thread has ended, no store.
    """

    def __init__(self, tmp_path: Path, store: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
        self.tmp_path, self.store, self.capfd = tmp_path, store, capfd
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ltsearch-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        monkeypatch.setenv("RAY_TMPDIR", str(self.ray_tmp))
        self.started: dict[int, str] = {}
        self._stop = threading.Event()

    def __enter__(self) -> "Refusal":
        self.before = snapshot(self.tmp_path)
        self.threads = set(threading.enumerate())
        self.records = _RayRecords()
        ray_logger = logging.getLogger("ray")
        self.level = ray_logger.level
        ray_logger.addHandler(self.records)
        ray_logger.setLevel(logging.INFO)  # Ray's default; an earlier test's `ray.init(logging_level=...)` may have raised it
        self.capfd.readouterr()
        self.existing = frozenset(_descendants())
        self.watcher = threading.Thread(target=self._watch, name="corpus-descendants", daemon=True)
        self.watcher.start()
        return self

    def _watch(self) -> None:
        while True:
            for pid in _descendants(self.existing):  # looked at again while alive: a child is named after its exec
                line = _command_line(pid)
                if pid not in self.started or not line.endswith("(ended)"):
                    self.started[pid] = line
            if self._stop.wait(0.01):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.watcher.join(10)
        ray_logger = logging.getLogger("ray")
        ray_logger.removeHandler(self.records)
        ray_logger.setLevel(self.level)
        self.fd_out, self.fd_err = self.capfd.readouterr()

    def problems(self, code: int, out: str, err: str, needle: str) -> list[str]:
        found = []
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 2:
            found.append(f"exit code {code}, not 2")
        if len(lines) != 1 or "Traceback" in err or needle not in lines[0]:
            found.append(f"stderr is not one line naming {needle!r}: {err[-1500:]!r}")
        opening = [t.name for t in set(threading.enumerate()) - self.threads if t.name.startswith("ltsearch-tracking")]
        for thread in set(threading.enumerate()) - self.threads:
            if thread.name.startswith("ltsearch-tracking-prewarm"):
                thread.join(120)  # then the store it opens exists, if it ever will
        if opening:
            found.append(f"an MLflow store is being opened ({opening})")
        if self.store.exists():
            found.append("the MLflow store was created")
        if snapshot(self.tmp_path) != self.before:
            found.append("files were written or changed")
        ray_files = sorted(str(path.relative_to(self.ray_tmp)) for path in self.ray_tmp.rglob("*"))
        if ray_files:
            found.append(f"Ray started: its files under RAY_TMPDIR: {ray_files[:4]}")
        if self.started:
            found.append(f"processes were started: {sorted(self.started.values())[:4]}")
        ray_lines = self.records.lines + [line for text in (out, err, self.fd_out, self.fd_err) for line in text.splitlines() if RAY_LOG.search(line)]
        if ray_lines:
            found.append(f"Ray log lines: {ray_lines[:3]}")
        return found

    def remove(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def refusal(tmp_path: Path, mlflow_store: str, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    watch = Refusal(tmp_path, Path(mlflow_store.removeprefix("sqlite:///")), capfd, monkeypatch)
    yield watch
    watch.remove()


@pytest.mark.parametrize(("argv", "needle", "setup"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_refused_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: Refusal,
                                                     request: pytest.FixtureRequest, argv, needle, setup) -> None:
    root = tmp_path / "case"
    (root / "work").mkdir(parents=True)
    monkeypatch.chdir(root / "work")
    monkeypatch.setenv("LTSEARCH_CACHE", str(root / "cache"))
    if request.node.callspec.id == "tune-long-ray-tmpdir":
        monkeypatch.setenv("RAY_TMPDIR", str(refusal.ray_tmp / LONG_NAME))
    setup(root)
    port = str(closed_port())
    argv = [word.replace("{r}", str(root)).replace("{port}", port) for word in argv]
    needle = needle.replace("{r}", str(root))

    with refusal:
        code, out, err = run_main(argv)

    problems = refusal.problems(code, out, err, needle)
    assert not problems, "\n".join(problems)
    assert not (root / MARKER).exists(), "a crafted file ran code"


def test_the_fake_cifar_the_corpus_corrupts_is_itself_valid(tmp_path: Path) -> None:
    """The CIFAR cases fail because of what they change, not because the fake data set is broken."""
    fake_cifar10(tmp_path / "cifar")
    code, out, err = run_main(["data", "--set", "data.name=cifar10", f"data.root={tmp_path / 'cifar'}", "data.imbalance=1", "--json"])
    assert code == 0, err
    assert '"num_classes": 10' in out


def test_the_image_lists_the_corpus_corrupts_are_themselves_valid(tmp_path: Path) -> None:
    image_root(tmp_path / "img")
    code, _, err = run_main(["data", "--set", "data.name=imagelist", f"data.root={tmp_path / 'img'}", "data.train_list=train.txt",
                             "data.test_list=test.txt"])
    assert code == 0, err


def test_unknown_key_errors_suggest_the_closest_key_only_when_one_is_close() -> None:
    from ltsearch.config import load_run_config
    from ltsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'momentum'"):
        load_run_config(None, ["optim.momentun=0.9"])
    with pytest.raises(ConfigError) as error:
        load_run_config(None, ["optim.zzzzzz=1"])
    assert "Did you mean" not in str(error.value)


def test_nan_is_rejected_by_every_number_check() -> None:
    from ltsearch import _checks
    from ltsearch.errors import ConfigError

    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match="finite"):
            _checks.number("k", value, low=0.0)
        with pytest.raises(ConfigError, match="finite"):
            _checks.number("k", value)


def test_a_gpu_fraction_on_a_machine_without_a_gpu_names_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: Refusal) -> None:
    """`resources.gpu: 0.5` here would wait forever under Ray; it is refused with the --set that works."""
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU: resources.gpu=0.5 is satisfiable here")
    monkeypatch.chdir(tmp_path)
    with refusal:
        code, out, err = run_main(["tune", QUICK, "--set", "resources.gpu=0.5"])
    problems = refusal.problems(code, out, err, "--set resources.gpu=0")
    assert not problems, "\n".join(problems)
