"""`ltsearch tune FILE [--set k=v] [--address A] [--out DIR]` and `ltsearch tune --resume DIR`.

Runs a search file on Ray Tune: locally (Ray started in-process) or on a cluster (`--address auto`,
`IP:PORT` or `ray://HOST:PORT`). Writes into the sweep directory: `sweep.yaml` (the resolved file,
what `--resume` reads), one folder per trial (Ray's results and checkpoints), and at the end
`best.yaml` (rerun it with `ltsearch train`), `trials.parquet` and `history.parquet`.

Before Ray starts or anything is written, `preflight` checks what would otherwise fail late or hang: the
data every trial reads, this machine's (or, once joined, the cluster's) CPUs and GPUs against `resources:`,
that something listens at `--address`, that Ray's socket paths fit, and that the sweep directory can be made.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltsearch.cli._common import add_overrides
from ltsearch.errors import ConfigError

if TYPE_CHECKING:
    from ltsearch.tune import Sweep


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tune", help="search hyperparameters on Ray Tune (Optuna samplers, ASHA), locally or on a Ray cluster")
    parser.add_argument("file", nargs="?", help="search file: a run config (or `base:`) plus `space:`, `search:`, `scheduler:` ...")
    add_overrides(parser)
    parser.add_argument("--address", help="join a running Ray cluster: auto, IP:PORT or ray://HOST:PORT (default: start Ray here)")
    parser.add_argument("--out", help="sweep directory, a local path or a URI such as s3://bucket/sweeps/x "
                                      "(default: <storage or runs>/<name>-<time>); must not exist yet")
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR: finished trials are kept, "
                                                        "unfinished ones resume from their checkpoints")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="train every one of the trials from epoch 0, even those that agree until their method's start epoch "
                             "(by default such trials train that shared prefix once and fork from it; same as --set share_prefix=false)")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS", help="seconds between progress tables (default 10)")
    parser.set_defaults(handler=run)


def use_token_auth(address: str | None, environ: dict[str, str] = os.environ) -> None:
    """Send this machine's Ray token when joining a cluster by IP:PORT (clusters use token auth by default).

    `address=auto` turns token auth on by itself when a token exists; an explicit address does not, and
    Ray reads RAY_AUTH_MODE once, when it is imported, so this must run before `import ray`.
    A user's own RAY_AUTH_MODE always wins.
    """
    if address in (None, "local", "auto") or address.startswith("ray://") or "RAY_AUTH_MODE" in environ:
        return
    if environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file():
        environ["RAY_AUTH_MODE"] = "token"


def run(args: argparse.Namespace) -> int:
    use_token_auth(args.address)
    if args.no_share_prefix:
        args.overrides = [*args.overrides, "share_prefix=false"]
    from ltsearch.tune import load_sweep, resume_sweep, run_sweep  # Ray and torch: imported only when a sweep runs
    from ltsearch.tune.runner import check_restorable
    from ltsearch.tune.session import ray_session

    if args.resume:
        if args.file or args.overrides or args.out:
            raise ConfigError("--resume", args.resume, "a sweep directory alone: the sweep continues exactly as it was saved",
                              hint="Drop FILE, --set and --out; to change the search, start a new sweep.")
        sweep = saved_sweep(args.resume)
        if sweep is None:  # not a sweep directory: resume_sweep says so, before Ray starts
            outcome = resume_sweep(args.resume, address=args.address)
        else:
            preflight(sweep, args.address, None)
            check_restorable(args.resume)  # before joining a cluster; resume_sweep checks again for Python callers
            joining = args.address not in (None, "local")
            with ray_session(args.address) if joining else contextlib.nullcontext():
                if joining:
                    check_cluster(sweep, args.address)
                outcome = resume_sweep(args.resume, address=args.address)
    else:
        if not args.file:
            raise ConfigError("file", None, "a search file, e.g. `ltsearch tune search_spaces/quickstart.yaml`, or --resume DIR")
        sweep = load_sweep(args.file, args.overrides)
        preflight(sweep, args.address, args.out)
        joining = args.address not in (None, "local")
        with ray_session(args.address) if joining else contextlib.nullcontext():  # joined once: its resources are checked first
            if joining:
                check_cluster(sweep, args.address)
            outcome = run_sweep(sweep, directory=args.out, address=args.address, progress_interval_s=args.progress_every)
    if not outcome.finished:
        return 130
    return 0 if outcome.best is not None else 1


def saved_sweep(directory: str) -> "Sweep | None":
    """The sweep a `--resume DIR` continues, parsed like a new one (None when DIR holds none: resume_sweep says so)."""
    import yaml

    from ltsearch.config import yaml_error_line
    from ltsearch.results import location_exists, read_text_from
    from ltsearch.tune import SWEEP_FILE, parse_sweep
    from ltsearch.tune._names import _absolute, _join

    sweep_file = _join(_absolute(directory), SWEEP_FILE)
    if not location_exists(sweep_file):
        return None
    try:
        raw = yaml.safe_load(read_text_from(sweep_file))
    except yaml.YAMLError as error:
        raise ConfigError("--resume", directory, "valid YAML", message=yaml_error_line(sweep_file, error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("--resume", directory, f"a readable {SWEEP_FILE} ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError("--resume", directory, f"a sweep directory whose {SWEEP_FILE} is a mapping written by `ltsearch tune`")
    return parse_sweep(raw, source=sweep_file)


def preflight(sweep: "Sweep", address: str | None, out: str | None) -> None:
    """Everything checkable before Ray starts or a file is written; each failure is one line and exit code 2.

    Local runs: Ray's socket paths fit AF_UNIX's limit, and this machine has the CPUs and GPUs one trial asks
    for. Cluster runs: something accepts connections at --address (Ray would retry for minutes); the
    cluster's resources are checked once connected (`check_cluster`). Both: the sweep directory can be
    created, and every data file a trial reads is there and readable (`check_data`).
    """
    from ltsearch.tune.session import check_machine

    check_machine(sweep.execution.resources.cpu, sweep.execution.resources.gpu, address)
    check_location(out or sweep.default_dir(), "--out" if out or not sweep.execution.storage else "storage")
    check_data(sweep)


def check_cluster(sweep: "Sweep", address: str) -> None:
    """Once connected: some node of the cluster can run one trial; and say where the cluster's processes listen."""
    import sys

    from ltsearch.tune.session import check_resources, cluster_nodes

    resources = sweep.execution.resources
    check_resources(resources.cpu, resources.gpu, cluster_nodes(), f"any node of the cluster at {address}")
    print(f"ltsearch tune: joined the Ray cluster at {address}; its processes listen on the addresses it was started with "
          "(ray start --node-ip-address / --port), not on ones ltsearch chooses", file=sys.stderr, flush=True)


def check_location(location: str, key: str) -> None:
    """A local sweep directory must be creatable: no file in its way, the nearest existing folder writable."""
    if "://" in location:
        return
    path = Path(location).expanduser().absolute()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(key, location, f"a location whose folders can be created, but '{parent}' is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(key, location, f"a location this user can write, but '{parent}' is not writable")
            return


def check_data(sweep: "Sweep") -> None:
    """Read every dataset the trials will use (each distinct `data:` among the space's corners) and check its
    files, plus any checkpoint a trial starts from (`train.init_from`), before anything is launched."""
    import json

    from ltsearch.config import build_run_config, to_dict
    from ltsearch.data import build_dataset, verify_files
    from ltsearch.checkpoints import CHECKPOINT_FILE, load_model_state
    from ltsearch.space import apply_point

    seen: set[str] = set()
    for point in sweep.space.corners() or [{}]:
        config = build_run_config(apply_point(sweep.base, point))
        key = json.dumps(to_dict(config.data), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            data = build_dataset(config.data)
            verify_files(data)
            check_groups(sweep, data)
        if config.train.init_from and config.train.init_from not in seen:
            seen.add(config.train.init_from)
            source = Path(config.train.init_from)
            load_model_state(source / CHECKPOINT_FILE if source.is_dir() else source)


def check_groups(sweep: "Sweep", data: Any) -> None:
    """An objective on a shot group (val/many, val/medium, val/few) needs validation images of classes in that group:
    otherwise every trial reports None for it and the search has nothing to optimise (CIFAR-10-LT at rho = 100 has no
    class under 20 training images, so no few-shot class)."""
    from ltsearch.metrics import FEW_SHOT_BELOW, MANY_SHOT_ABOVE, class_groups
    from ltsearch.tune.objectives import SCORE_GROUP

    groups = class_groups(data.class_counts)
    scored = data.val.class_counts(data.num_classes)
    present = {name: [c for c in members if int(scored[c]) > 0] for name, members in groups.items()}
    for metric in sweep.objective.metrics:
        group = SCORE_GROUP.get(metric)
        if group is not None and not present[group]:
            counts = ", ".join(f"{name} {len(members)}" for name, members in present.items())
            raise ConfigError("metric", metric, f"a metric this data can score, but no validation class of {data.name} is {group}-shot "
                              f"(classes with validation images: {counts}; many > {MANY_SHOT_ABOVE} training images, "
                              f"few < {FEW_SHOT_BELOW})", hint="Choose another group (val/medium is the tail of CIFAR-10-LT), "
                              "or a longer tail (data.imbalance).")
