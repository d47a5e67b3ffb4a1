"""How a private, single-machine Ray runtime starts: only the processes a sweep uses, as fast as they can come up.

`ltsearch tune` and `ltsearch ablate` without `--address` start Ray in-process for one command and stop it at the
end. On 2 cores that start-up was ~7.5 s of a 30 s shared-prefix sweep (benchmarks/RESULTS.md, prefix.py), paid
by every command; each context manager here removes one cost that a runtime nobody else joins does not need.
Every one leaves Ray as it found it on exit, and does nothing on a Ray that lacks what it relies on
(tests/test_startup.py pins the installed Ray's behaviour). A cluster (`--address`) is started by its owner
and joined as Ray does it; none of this applies there, except `no_callback_usage_count`, which follows Ray's
usage-stats setting wherever the driver runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

#: Ray's switch between "this machine only" (its processes take the loopback address as the node IP and
#: bind to it) and "a node others can join" (they bind the machine's address or every interface). Ray reads it
#: from this variable when imported, and from `ray_constants.ENABLE_RAY_CLUSTER` when it picks the node IP.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

#: seconds between two looks for the new local node in the GCS while `ray.init` waits for it
NODE_POLL_S = 0.02


@contextlib.contextmanager
def local_start() -> Iterator[None]:
    """Around `ray.init` of a local runtime: every start-up change below at once."""
    with loopback_only(), lean_head_node(), prompt_node_wait():
        yield


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While a local runtime starts, make Ray take 127.0.0.1 as the node IP, so every process it starts (GCS,
    raylet, object manager, workers, agents) listens on the loopback interface only; restored afterwards.

    The variable reaches the processes Ray spawns (they inherit the environment); the constant, the
    driver already imported.
    """
    import ray._private.ray_constants as ray_constants

    previous_env, previous_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = previous_env


@contextlib.contextmanager
def lean_head_node() -> Iterator[None]:
    """While a local runtime starts, leave out the three head processes that only serve other clients.

    - the autoscaler monitor: a fixed single-node runtime has nothing to scale; at exit its SIGTERM handler
      also tried to report to the GCS that `ray.shutdown` had already stopped, and Ray waited 1 s for it;
    - the log monitor: it forwards worker output to the driver, which `log_to_driver=False` turns away
      (workers still write their own log files under the session directory);
    - the API server ("minimal" dashboard, even with `include_dashboard=False`): job submission and the
      `ray list ...` state API for outside clients; `ray.init` waited ~0.8 s for it to answer. What this
      process asks of the runtime (actors, nodes, resources) it asks the GCS directly. Without it the runtime
      is what Ray makes when that server fails to start, which Ray treats as non-fatal.
    Python daemons all three: on 2 cores their start-up competed for the CPUs with everything after `ray.init`
    (GCS and raylet, then the first trial's worker). Measured: `ray.init` 1.9 -> 0.95 s, and to a first actor
    that has imported torch 4.0 -> 3.2 s (benchmarks/RESULTS.md).
    """
    from ray._private import node

    original_init, original_api_server = node.Node.__init__, getattr(node.Node, "start_api_server", None)
    if original_api_server is None:
        yield
        return

    def init(self: Any, ray_params: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("head", args[0] if args else False):
            ray_params.no_monitor = True
            ray_params.include_log_monitor = False
        original_init(self, ray_params, *args, **kwargs)

    node.Node.__init__ = init
    node.Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        node.Node.__init__, node.Node.start_api_server = original_init, original_api_server


@contextlib.contextmanager
def prompt_node_wait() -> Iterator[None]:
    """While a local runtime starts, let `ray.init` see the new node within NODE_POLL_S of its registration.

    After starting its processes `ray.init` asks the GCS for the new node, and the GCS client retries that
    question once a second until the raylet has registered (~1.8 s after the start on 2 cores, once its agents
    are up), so `ray.init` took 2.1 or 3.1 s. This looks the node up in the GCS's node table every NODE_POLL_S
    first (the same GCS, the same node id), then asks as Ray does, which then answers at once: 1.9-2.1 s
    (benchmarks/RESULTS.md). A Ray without these functions starts as before.
    """
    from ray._private import services, state

    original = getattr(services, "get_node", None)
    if original is None or not hasattr(services, "_get_gcs_client_options") or not hasattr(state.GlobalState, "node_table"):
        yield
        return

    def get_node(gcs_address: str, node_id: str) -> Any:
        try:
            global_state = state.GlobalState()
            global_state._initialize_global_state(services._get_gcs_client_options(gcs_address))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(node.get("NodeID") == node_id and node.get("Alive")
                                                          for node in global_state.node_table()):
                time.sleep(NODE_POLL_S)
        except Exception:  # noqa: BLE001 - only a faster wait: Ray's own call below waits (or fails) as it always did
            pass
        return original(gcs_address, node_id)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


@contextlib.contextmanager
def inherited_trial_env(runtime_env: dict[str, str]) -> Iterator[None]:
    """While a local runtime is in use, start Tune's trial actors without a runtime env when it would only set
    environment variables their worker inherits anyway.

    Tune registers every trainable with `runtime_env={"env_vars": ...}` (PL_DISABLE_FORK=1, plus any of a fixed
    list found in the driver's environment). A worker with a runtime env is started through Ray's setup shim, a
    second Python process that imports Ray before it execs the worker (~0.25 s per trial worker on 2 cores,
    benchmarks/RESULTS.md). A local runtime's workers are children of a raylet started from this process with
    `runtime_env` (the environment `ray.init` ran in; RAY_ENV sets PL_DISABLE_FORK), so when every variable
    Tune asks for already has that value there, the trial gets the same environment without the shim. Any
    other value (a variable set after `ray.init`) leaves Tune's registration as it is.
    """
    try:
        from ray.tune.execution.class_cache import _ActorClassCache
    except ImportError:
        yield
        return
    original = _ActorClassCache.get

    def get(self: Any, trainable_cls: Any) -> Any:
        remote_cls = original(self, trainable_cls)
        asked = dict(getattr(remote_cls, "_default_options", {}).get("runtime_env") or {})
        env_vars = asked.pop("env_vars", None)
        if env_vars is not None and not asked and all(runtime_env.get(key) == value for key, value in env_vars.items()):
            import ray

            remote_cls = self._cache[trainable_cls] = ray.remote(trainable_cls)
        return remote_cls

    _ActorClassCache.get = get
    try:
        yield
    finally:
        _ActorClassCache.get = original


@contextlib.contextmanager
def no_callback_usage_count() -> Iterator[None]:
    """With Ray's usage stats off, skip the usage tag `Tuner.fit` computes from the run's callbacks.

    To count callbacks by kind, Ray imports its MLflow, W&B, Comet and Aim integrations, and with them mlflow:
    ~0.8 s on 2 cores between `fit` and the first trial's start, in every sweep and ablation, for a tag that
    usage stats switched off never record (ray.air._internal.usage.tag_callbacks). `ray.init` switches them off
    whenever it starts a local runtime (release wheels); a cluster joined with usage stats on, or a Ray
    without that function, counts as before.
    """
    try:
        from ray._common.usage.usage_lib import usage_stats_enabled
        from ray.air._internal import usage
    except ImportError:
        yield
        return
    original = getattr(usage, "tag_callbacks", None)
    if original is None or usage_stats_enabled():
        yield
        return
    usage.tag_callbacks = lambda callbacks: False
    try:
        yield
    finally:
        usage.tag_callbacks = original
