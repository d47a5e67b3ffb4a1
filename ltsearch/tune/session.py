"""The Ray runtime a sweep runs on (`ray_session`), and the warning when its storage is not shared by every node.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import ray


#: driver-side Ray settings (a user's own environment wins): our ProgressTable replaces Ray's console output, and the
#: experiment-state snapshot that `checkpoint.keep` forces is cheap on these small states, so its warning is noise
RAY_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the caller's Ray runtime if there is one; else start Ray in-process (address None) or join `address`.

    Only what this function started is shut down. `address=None` means "local": Ray's own default
    would join whatever cluster `ray start` left on this machine, which a laptop user did not ask for.
    Joining a token-authenticated cluster by IP:PORT needs RAY_AUTH_MODE=token before Ray is imported
    (the CLI sets it; see cli/tune.py).
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


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
