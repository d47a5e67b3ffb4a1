"""`ltsearch ui [--port P] [--host H] [--config FILE] [--set tracking.uri=...]`: the MLflow UI on the store.

Starts `mlflow server` on the store the sweeps logged to (default sqlite:///mlruns.db, artifacts in the
`mlartifacts/` beside it), waits until it answers, and prints where the latest sweep (or ablation) is:
its experiment's runs table, its trials best first (a saved view with its metrics and searched keys as columns;
an ablation's cells grouped as its matrix), its best trials or Pareto front in MLflow's compare page, and its
own run page. Listens on 127.0.0.1 unless
--host says otherwise. Ctrl-C or SIGTERM stops the server and every process it started; both exit 0,
as stopping the UI is its normal end. The server logic is in ltsearch/tracking/server.py.
"""

from __future__ import annotations

import argparse
import sys

from ltsearch.cli._common import add_overrides
from ltsearch.cli._links import children_links
from ltsearch.tracking import browse, server
from ltsearch.tracking.settings import PARENT_KINDS


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("ui", help="start the MLflow UI on the run store and print the latest sweep's pages")
    parser.add_argument("--port", type=port_number, default=server.DEFAULT_PORT, help=f"port to listen on (default {server.DEFAULT_PORT})")
    parser.add_argument("--host", default=server.LOOPBACK,
                        help=f"address to listen on (default {server.LOOPBACK}, this machine only; the UI has no authentication)")
    parser.add_argument("--config", metavar="FILE", help="read the store's location from FILE's tracking: section (default: sqlite:///mlruns.db)")
    add_overrides(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = browse.load_settings(args.config, args.overrides)
    command = server.server_command(settings, args.host, args.port)
    client = browse.open_client(settings)  # a missing store is an error here, before anything starts
    server.check_port(args.host, args.port)
    if not server.is_loopback(args.host):
        print(f"WARNING: --host {args.host} makes the MLflow UI reachable from the network, and it has NO authentication: "
              f"anyone who can reach port {args.port} can read, change and delete runs and artifacts. For remote use prefer "
              f"the default host and an SSH tunnel: ssh -L {args.port}:127.0.0.1:{args.port} THIS_MACHINE", file=sys.stderr, flush=True)
    latest = browse.latest(client, limit=1, kinds=PARENT_KINDS) or browse.latest(client, limit=1)
    ui = server.MlflowServer(command, server.health_url(args.host, args.port))
    base = server.base_url(server.browser_host(args.host), args.port)
    with server.sigterm_as_interrupt():
        try:
            ui.start()
            print(f"ltsearch ui: starting MLflow on {base} for {settings.resolved_uri()} (server log: {ui.log_path})", flush=True)
            ui.wait_ready()
            print(f"ltsearch ui: MLflow UI at {base} (Ctrl-C stops it)", flush=True)
            print(pages(base, latest[0]) if latest else f"the store holds no sweeps, ablations or train runs yet. {browse.CREATE_HINT}", flush=True)
            code = ui.wait()
            print(f"ltsearch ui: mlflow server exited by itself with code {code}; {ui.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("ltsearch ui: stopping MLflow", file=sys.stderr, flush=True)
            return 0
        finally:
            ui.stop()


def pages(base: str, top: browse.TopRun) -> str:
    """Where to look: the experiment's runs table, a parent's children (its saved view when the store holds one), a
    sweep's best trials (or its Pareto front) in MLflow's compare page, the run's own page."""
    lines = [f"latest {top.kind}: {top.name} (experiment {top.experiment}"
             + (f", {len(top.children)} child runs)" if top.kind in PARENT_KINDS else ")"),
             f"  runs:    {server.runs_url(base, top.experiment_id)}"]
    lines += children_links(base, top)
    lines.append(f"  run:     {server.run_url(base, top.experiment_id, top.run_id)}")
    return "\n".join(lines)


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got {text}")
    return value
