"""Start-up costs: what importing ltsearch's layers pulls in, and what a local Ray runtime starts.

A Ray trial worker imports the trainable, unpickles the built dataset and looks its data source up in the
registry; none of that may import torchvision (with torch._dynamo) or scikit-learn/scipy, ~2 s of imports
on 2 cores that only decoding files, building a torchvision network or reading the digits file needs.
Each check runs in a fresh interpreter, so what the test process already imported does not count.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from ltsearch.config import DataConfig
from ltsearch.data import build_dataset

HEAVY = ("torchvision", "sklearn", "scipy")


def imported_after(code: str, watched: tuple[str, ...] = HEAVY) -> list[str]:
    """The modules (packages, or submodules such as torch._dynamo) of `watched` that running `code` in a fresh
    interpreter imported."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(name for name in {watched!r} if name in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_layers_a_trial_worker_imports_pull_in_no_torchvision_sklearn_or_scipy():
    code = ("import ltsearch.data, ltsearch.engine, ltsearch.tune.trainable\n"
            "from ltsearch.registry import BACKBONES, DATASETS\n"
            "assert 'digits' in DATASETS.names() and 'resnet50' in BACKBONES.names()\n"
            "DATASETS.get('digits'); DATASETS.get('cifar10'); DATASETS.get('imagelist'); BACKBONES.get('resnet50')")
    assert imported_after(code) == []


def test_unpickling_a_built_dataset_imports_no_torchvision_sklearn_or_scipy(tmp_path: Path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(build_dataset(DataConfig())))
    code = f"import pickle\ndata = pickle.loads(open({str(path)!r}, 'rb').read())\nassert data.num_classes == 10"
    assert imported_after(code) == []


def test_building_the_digits_dataset_does_not_import_sklearn():
    code = "from ltsearch.config import DataConfig\nfrom ltsearch.data import build_dataset\nbuild_dataset(DataConfig(name='digits'))"
    assert imported_after(code) == []


def test_torchvision_is_imported_when_a_torchvision_network_is_built():
    code = ("from ltsearch.models import create_backbone\n"
            "net = create_backbone('resnet50', num_classes=3, in_chans=1, mean=(0.5,), std=(0.5,))\n"
            "assert len(net.stages) == 5 and net.classifier.out_features == 3")
    assert imported_after(code) == ["torchvision"]


def test_training_a_run_does_not_import_torch_dynamo():
    """torch.optim imports torch._dynamo (~1.1 s) at an optimizer's first step or add_param_group/zero_grad/
    state_dict; the engine's EagerSGD does not, also after a plain SGD in the same process has re-wrapped
    `SGD.step` (torch's profiling hook). The state_dict round trip covers the last two."""
    code = ("import torch\n"
            "from ltsearch.config import build_run_config\n"
            "from ltsearch.engine import Trainer\n"
            "config = build_run_config({'train': {'epochs': 2, 'device': 'cpu'}, 'data': {'max_train_per_class': 8, 'max_eval_per_class': 4}})\n"
            "trainer = Trainer(config)\n"
            "assert len(list(trainer.run(until=1))) == 1\n"
            "trainer.optimizer.load_state_dict(trainer.optimizer.state_dict())\n"
            "torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)\n"
            "assert len(list(trainer.run())) == 1")
    assert imported_after(code, ("torch._dynamo",)) == []
    assert imported_after("import torch\nopt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)",
                          ("torch._dynamo",)) == ["torch._dynamo"]  # what torch does on its own


def test_building_the_cli_parser_imports_neither_torch_nor_ray():
    watched = ("torch", "ray", "mlflow", "optuna", *HEAVY)
    assert imported_after("import ltsearch.cli\nltsearch.cli.build_parser()", watched) == []


# --------------------------------------------------------------------------- the local runtime's processes
LEAN = """
import json, os
import ray
import ray._private.node as node_module
from ray.tune.execution.class_cache import _ActorClassCache
from ltsearch.tune.session import ray_session
init, api_server, cache_get = node_module.Node.__init__, node_module.Node.start_api_server, _ActorClassCache.get

class Trial:
    def env(self):
        return os.environ.get("PL_DISABLE_FORK"), os.environ.get("RAY_CHDIR_TO_TRIAL_DIR")

with ray_session(None):
    from ray._private import worker
    started = sorted(worker._global_node.all_processes)
    assert (node_module.Node.__init__, node_module.Node.start_api_server) == (init, api_server)  # put back once up
    cache = _ActorClassCache()
    inherited = cache.get(Trial)._default_options.get("runtime_env")
    env = ray.get(cache.get(Trial).options(num_cpus=0).remote().env.remote())
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # set after ray.init: the workers do not have it, so Tune's runtime env stays
    kept = _ActorClassCache().get(Trial)._default_options.get("runtime_env")
assert _ActorClassCache.get is cache_get
print(json.dumps({"started": started, "inherited": inherited, "env": env, "kept": kept}))
"""


def test_a_local_runtime_starts_no_monitor_log_monitor_or_api_server_and_trials_inherit_tunes_env():
    """The three head processes that only serve other clients are left out (and Ray's Node is put back once the
    runtime is up); a trial actor registered through Tune's class cache gets no runtime env, yet its worker has
    the variable Tune would have set; a variable set after `ray.init` keeps Tune's runtime env."""
    done = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ("PL_DISABLE_FORK", "RAY_CHDIR_TO_TRIAL_DIR")})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert {"gcs_server", "raylet"} <= set(seen["started"]), seen
    assert not {"monitor", "log_monitor", "dashboard"} & set(seen["started"]), seen
    assert seen["inherited"] is None and seen["env"] == ["1", None], seen
    assert seen["kept"] == {"env_vars": {"PL_DISABLE_FORK": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0"}}, seen


def test_a_joined_cluster_keeps_tunes_runtime_env(monkeypatch):
    """Outside `inherited_trial_env` (a cluster's workers inherit their own node's environment) Tune's class cache
    registers trainables with its env_vars runtime env, as Ray ships it."""
    from ray.tune.execution.class_cache import _ActorClassCache

    class Trial:
        pass

    monkeypatch.delenv("RAY_CHDIR_TO_TRIAL_DIR", raising=False)
    assert _ActorClassCache().get(Trial)._default_options["runtime_env"]["env_vars"]["PL_DISABLE_FORK"] == "1"


# --------------------------------------------------------------------------- the local runtime's start
START = """
import os, sys
from ray._private import services, state
from ray.air._internal import usage
from ltsearch.tune.session import ray_session
original, polled, looked_up, tag = services.get_node, [], [], usage.tag_callbacks
node_table = state.GlobalState.node_table
state.GlobalState.node_table = lambda self: polled.append(1) or node_table(self)
def spy(address, node_id):
    looked_up.append(node_id)
    return original(address, node_id)
services.get_node = spy
with ray_session(None):
    import ray
    assert ray.is_initialized() and services.get_node is spy  # put back once the runtime is up
    assert looked_up == [ray.get_runtime_context().get_node_id()] and polled
    counted = usage.tag_callbacks is tag
    assert (os.environ["RAY_raylet_client_connect_timeout_milliseconds"], os.environ["RAY_raylet_client_num_connect_attempts"]) == ("50", "200")
assert usage.tag_callbacks is tag
print("counted" if counted else "skipped", os.environ["RAY_USAGE_STATS_ENABLED"])
"""


def test_a_local_runtime_starts_through_the_prompt_node_wait_and_skips_the_callback_count():
    """ray.init's wait for the new node goes through the GCS node table (polled every NODE_POLL_S), then Ray's own
    lookup, which finds the node; afterwards Ray's function is back. A local runtime has Ray's usage stats off,
    so Tune's callback count (which imports mlflow) is skipped while the runtime is in use, and put back after."""
    done = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["skipped", "0"]


def test_the_callback_count_is_left_alone_when_usage_stats_are_on(monkeypatch):
    from ray.air._internal import usage

    from ltsearch.tune.local_runtime import no_callback_usage_count

    tag = usage.tag_callbacks
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    with no_callback_usage_count():
        assert usage.tag_callbacks is tag
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    with no_callback_usage_count():
        assert usage.tag_callbacks is not tag and usage.tag_callbacks([object()]) is False
    assert usage.tag_callbacks is tag
