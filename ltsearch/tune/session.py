"""The Ray runtime a sweep runs on (`ray_session`), and the warning when its storage is not shared by every node.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import ray

from ltsearch.tune.local_runtime import inherited_trial_env, local_start, no_callback_usage_count

#: driver-side Ray settings (a user's own environment wins): our ProgressTable replaces Ray's console output, and the
#: experiment-state snapshot that `checkpoint.keep` forces is cheap on these small states, so its warning is noise.
#: A local raylet (it inherits this environment) prestarts no idle workers: it would start one per CPU when the
#: driver registers and hold `ray.init` until they are up (~0.5 s on 2 cores). A trial could now start on one (see
#: below), but on 2 cores that was no faster: 2.58 against 2.64 s from `ray.init` to an actor with torch imported.
#: PL_DISABLE_FORK is what Tune sets in its trial actors' runtime env; set here, a local raylet's workers inherit
#: it and the trials start without one (local_runtime.inherited_trial_env).
#: Tune's automatic loggers are off: `result_loggers` adds back the two whose files we read (see there).
#: A process that connects to a Unix socket not yet listening (the raylet to its just-started object store, a new
#: worker to its raylet) retries every 50 ms, 200 times, instead of every 1000 ms, 10 times: the same 10 s of
#: patience, but a local `ray.init` that lost that race waited a whole second (2.5 s on average, 1.9 s now).
RAY_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
           "RAY_prestart_worker_first_driver": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
           "RAY_raylet_client_connect_timeout_milliseconds": "50", "RAY_raylet_client_num_connect_attempts": "200",
           "PL_DISABLE_FORK": "1"}


def result_loggers() -> list[Any]:
    """Ray's per-trial result.json and progress.csv writers, which `tune.outputs` reads a trial's reports back from.

    Tune's third automatic logger, TensorBoard's, is left out: it wrote every report as scalars plus a histogram
    per list (per-class accuracies) on the driver's event loop while the trial waited, ~11 of the ~18 ms a report
    cost on 2 cores (benchmarks/RESULTS.md, platform.py), for files nothing here reads; MLflow shows the same
    curves. Running with TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 brings it back.
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the caller's Ray runtime if there is one; else start Ray in-process (address None) or join `address`.

    Only what this function started is shut down. `address=None` means "local": Ray's own default
    would join whatever cluster `ray start` left on this machine, which a laptop user did not ask for.
    A local runtime starts lean (`local_runtime`: on 127.0.0.1 only, without the processes that serve other
    clients, trial workers without Tune's runtime-env shim); a cluster's processes listen where that cluster was
    started (`ray start --node-ip-address ...`), which is the user's choice.
    Joining a token-authenticated cluster by IP:PORT needs RAY_AUTH_MODE=token before Ray is imported
    (the CLI sets it; see cli/tune.py).
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    local = address in (None, "local")
    runtime_env = dict(os.environ)
    with local_start() if local else contextlib.nullcontext():
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        with inherited_trial_env(runtime_env) if local else contextlib.nullcontext(), no_callback_usage_count():
            yield
    finally:
        ray.shutdown()


# -------------------------------------------------------------------------------- checks before launch
#: Linux's limit on a unix socket path (sun_path holds 108 bytes with the terminating NUL)
AF_UNIX_PATH_MAX = 107
#: the longest socket path Ray puts under its temp dir: /session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
RAY_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


def ray_temp_dir() -> str:
    """The directory a local Ray runtime puts its session (and sockets) in: $RAY_TMPDIR, else $TMPDIR, else /tmp, + /ray."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(root, "ray")


def check_temp_dir(temp_dir: str | None = None) -> None:
    """Refuse a Ray temp directory whose socket paths would exceed AF_UNIX's limit (Ray fails with an OSError)."""
    from ltsearch.errors import ConfigError

    temp_dir = temp_dir or ray_temp_dir()
    longest = len(os.fsencode(temp_dir)) + RAY_SOCKET_SUFFIX
    if longest > AF_UNIX_PATH_MAX:
        raise ConfigError("RAY_TMPDIR", temp_dir, f"a directory whose path is at most {AF_UNIX_PATH_MAX - RAY_SOCKET_SUFFIX} characters: "
                          f"Ray's unix sockets below it would be {longest} characters, over the {AF_UNIX_PATH_MAX} a socket path may hold",
                          hint="Run with RAY_TMPDIR=/tmp (Ray's session files go there; TMPDIR may stay as it is).")


def parse_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `IP:PORT`, `[IPv6]:PORT` or `ray://HOST:PORT`; None when it has no port."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
    else:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check_address(address: str | None, *, timeout_s: float = 3.0) -> str | None:
    """Before joining a cluster, make sure something listens at its address (Ray would retry for minutes).

    `auto` is resolved the way Ray resolves it (RAY_ADDRESS, then the cluster `ray start` left here).
    Returns the host:port probed (None for a local run).
    """
    import socket

    from ltsearch.errors import ConfigError

    if address in (None, "local"):
        return None
    target = address
    if address == "auto":
        from ray._private import services

        try:
            target = services.canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError, OSError) as error:
            raise ConfigError("--address", address, f"a running Ray cluster to join ({str(error).splitlines()[0]})",
                              hint="Start one with `ray start --head`, pass its IP:PORT, or drop --address to run locally.") from None
        if target is None:
            raise ConfigError("--address", address, "a running Ray cluster on this machine, but none was found (no `ray start` left its address here)",
                              hint="Start one with `ray start --head`, pass its IP:PORT, or drop --address to run locally.")
    parsed = parse_host_port(target)
    if parsed is None:
        raise ConfigError("--address", address, "auto, IP:PORT or ray://HOST:PORT with a port from 1 to 65535")
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise ConfigError("--address", address, f"a reachable Ray head, but nothing accepts connections at {host}:{port} ({reason})",
                          hint="Check the head with `ray status`, or drop --address to run locally.") from None
    return f"{host}:{port}"


def local_capacity() -> tuple[float, int]:
    """(CPUs, GPUs) a local Ray runtime would offer: cgroup-aware CPU count, visible CUDA devices."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # pragma: no cover - Ray's helper moved: fall back to the affinity mask
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    import torch

    return cpus, torch.cuda.device_count()


def check_machine(cpu: float, gpu: float, address: str | None) -> None:
    """Before launch: a local run fits this machine (one trial's CPUs and GPUs; else Ray waits forever) and
    Ray's socket paths fit AF_UNIX's limit; a cluster run's address answers (its resources are checked once joined)."""
    if address in (None, "local"):
        check_temp_dir()
        cpus, gpus = local_capacity()
        check_resources(cpu, gpu, [("this machine", cpus, gpus)], "this machine")
    else:
        check_address(address)


def check_resources(cpu: float, gpu: float, nodes: list[tuple[str, float, float]], where: str) -> None:
    """Refuse a per-trial request no single node can meet (Ray would wait for it forever).

    `nodes` are (name, CPUs, GPUs) of every node that could run a trial.
    """
    from ltsearch.errors import ConfigError

    if gpu > 0 and not any(node_gpu >= gpu for _, _, node_gpu in nodes):
        most = max((node_gpu for _, _, node_gpu in nodes), default=0)
        if not most:
            raise ConfigError("resources.gpu", gpu, f"0: {where} has no GPU, so a trial asking for one would wait forever",
                              hint="Run with --set resources.gpu=0 (trials then train on CPU).")
        raise ConfigError("resources.gpu", gpu, f"at most {most:g}, the GPUs {where} has",
                          hint=f"Run with --set resources.gpu={most:g} or a fraction such as 0.5.")
    if not any(node_cpu >= cpu and node_gpu >= gpu for _, node_cpu, node_gpu in nodes):
        most = max((node_cpu for _, node_cpu, node_gpu in nodes if node_gpu >= gpu), default=0)
        raise ConfigError("resources.cpu", cpu, f"at most {most:g}, the CPUs {where} has" + (f" beside {gpu:g} GPU(s)" if gpu else ""),
                          hint=f"Run with --set resources.cpu={max(1, int(most)) if most >= 1 else most:g}.")


def cluster_nodes() -> list[tuple[str, float, float]]:
    """(address, CPUs, GPUs) of every alive node of the connected Ray cluster."""
    return [(n.get("NodeManagerAddress", "?"), float(n.get("Resources", {}).get("CPU", 0)), float(n.get("Resources", {}).get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "fuse.glusterfs",
                       "fuse.gcsfuse", "fuse.s3fs", "fuse.sshfs", "fuse.juicefs", "fuse.ceph", "fuse.mountpoint-s3")


def storage_warning(directory: str, node_addresses: list[str], driver_address: str, mounts: str) -> str | None:
    """A warning when trials on other machines would write checkpoints to a path only this machine has.

    Since Ray 2.7 nothing syncs trial directories to the head node, so the storage must be a URI
    (s3://, gs://) or a network filesystem that every node mounts.
    """
    if "://" in directory:
        return None
    others = sorted({a for a in node_addresses if a != driver_address})
    if not others:
        return None
    fstype = _filesystem_type(directory, mounts)
    if fstype in NETWORK_FILESYSTEMS:
        return None
    return (f"warning: the sweep directory {directory} is on a local filesystem ({fstype or 'unknown'}), but the cluster has nodes on "
            f"{', '.join(others)} that cannot see it: their checkpoints and results would stay on their own disks. "
            "Use an NFS path mounted on every node, or storage: s3://bucket/path (or gs://...).")


def _filesystem_type(path: str, mounts: str) -> str | None:
    best, fstype = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
            best, fstype = parts[1], parts[2]
    return fstype


def _warn_if_storage_is_local(directory: str, stream: Any) -> None:
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").is_file() else ""
    message = storage_warning(directory, nodes, ray.util.get_node_ip_address(), mounts)
    if message:
        print(message, file=stream, flush=True)
