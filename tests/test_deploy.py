"""deploy/: the cluster-launcher YAML is valid for `ray up`, the KubeRay RayJob runs `ltsearch tune` correctly,
and the commands both show parse with ltsearch's own CLI and point at search files that pass validation."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml

from ltsearch.cli import build_parser
from ltsearch.tune import load_sweep

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def ltsearch_commands(text: str) -> list[list[str]]:
    """Every `ltsearch <command> <arguments>` in a text (usage lines, YAML values), split like a shell would;
    a bare `ltsearch tune` in prose is no invocation."""
    commands = []
    for match in re.finditer(r"ltsearch (?:tune|ablate|train|check) [^\"`\n]+", text):
        commands.append(shlex.split(match.group(0), comments=True)[1:])
    return commands


def check_tune_command(argv: list[str], *, path_root: Path = REPO, prefix: str = "") -> None:
    """The command parses with ltsearch's parser, joins the cluster, and writes to storage other nodes can see."""
    args = build_parser().parse_args(argv)
    assert args.command == "tune"
    assert args.address == "auto"
    if args.resume:
        return
    storage = [o.split("=", 1)[1] for o in args.overrides if o.startswith("storage=")]
    assert storage and (storage[0].startswith(("s3://", "gs://")) or storage[0].startswith("/shared/")), storage
    file = path_root / args.file.removeprefix(prefix)
    assert file.is_file(), file
    sweep = load_sweep(file, args.overrides)  # the whole file validates with these overrides, starting nothing
    assert sweep.execution.storage == storage[0]


def test_cluster_launcher_yaml_is_valid_for_ray_up():
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    # the checkout is synced to every node and installed there; the token is shared with every node
    assert config["file_mounts"]["/home/ubuntu/ltsearch"] == "."
    assert any("pip install" in c and "/home/ubuntu/ltsearch" in c for c in config["setup_commands"])
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" in command or "RAY_AUTH_MODE=token ray start" in command


def test_cluster_launcher_usage_runs_ltsearch_tune_on_the_cluster():
    commands = ltsearch_commands((DEPLOY / "cluster.yaml").read_text())
    assert len(commands) == 2  # a sweep and its resume
    for argv in commands:
        check_tune_command(argv)


def test_rayjob_runs_ltsearch_tune_with_shared_storage():
    documents = list(yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text()))
    job = next(d for d in documents if d["kind"] == "RayJob")
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["shutdownAfterJobFinishes"] is True
    check_tune_command(shlex.split(job["spec"]["entrypoint"])[1:], prefix="/app/")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod: the shared volume at /shared, token auth with the shared secret, the cache on it
        (container,) = pod["containers"]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/shared"}
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert env["LTSEARCH_CACHE"]["value"].startswith("/shared/")
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])


def test_the_image_installs_ltsearch_with_its_search_files():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "pip install" in dockerfile
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    assert {"pyproject.toml", "ltsearch", "configs", "search_spaces"} <= copied
    for path in copied:
        assert (REPO / path).exists(), path


def test_readme_commands_parse():
    commands = ltsearch_commands((DEPLOY / "README.md").read_text())
    assert len(commands) >= 5
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        if args.command == "tune" and args.address:
            assert args.address in ("auto", "HEAD:6379")
