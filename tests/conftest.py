"""Shared test set-up: one torch thread per test process (2-core CI), paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LTSEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_DIR = SHARED_DATA / "cifar-10-batches-py"


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """Root holding cifar-10-batches-py (the real files); skips the test when they are absent."""
    if not (CIFAR10_DIR / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 files not found under {CIFAR10_DIR} (set LTSEARCH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _each_test_is_its_own_command() -> None:
    """The tracking writer tells each unreachable store once per process (one command may use several writers);
    in this process every test is a command of its own. Without this, a test whose closed port an earlier test had
    drawn too (bind(0) repeats ports) never heard "cannot reach" (seen once in CI)."""
    from ltsearch.tracking import store

    store._TOLD_AWAY.clear()


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """M2m's g and shared prefixes are cached in a temporary directory, never in ~/.cache (a test that expects
    a prefix to be trained must not find one an earlier test run left). Modules may point it elsewhere."""
    os.environ.setdefault("LTSEARCH_CACHE", str(tmp_path_factory.mktemp("ltsearch-cache")))


@pytest.fixture(scope="module")
def ray_runtime(tmp_path_factory: pytest.TempPathFactory):
    """A real local Ray runtime (2 CPUs) for one test module, shut down even when a test fails; M2m's g and
    shared prefixes are cached in a directory of the module's own (set before ray.init: workers inherit it)."""
    import ray

    previous = os.environ.get("LTSEARCH_CACHE")
    os.environ["LTSEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("LTSEARCH_CACHE", None)
        else:
            os.environ["LTSEARCH_CACHE"] = previous


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test tracks into its own sqlite store (the default would be ./mlruns.db in the repository)."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
