"""`reclra runs start|list|get|watch|stop`: the training service from the shell, over Client.

The address comes from --addr (or RECLRA_ADDR), the bearer token from RECLRA_TOKEN or the file
named by RECLRA_TOKEN_FILE (never from the command line, which `ps` shows), and TLS from
--root-ca/--cert/--key (or RECLRA_ROOT_CA/RECLRA_CERT/RECLRA_KEY). Every call has a deadline.
Exit codes: 0 done; 1 the watched run failed; 3 the watched run was stopped; 2 an error (the
request, the server, the token, the deadline), said in one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from driver.api.service import Client

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WAIT_S = 24 * 3600.0
TOKEN_ENV, TOKEN_FILE_ENV = "RECLRA_TOKEN", "RECLRA_TOKEN_FILE"
# the exit code of a watched run's end state (an error of the call itself is 2)
END_CODES = {"succeeded": 0, "failed": 1, "stopped": 3}
TABLE = ("run_id", "state", "step", "epoch", "val_acc", "test_acc", "restarts", "pid")


class CliError(Exception):
    """One line for stderr; exit code 2."""


def _connection_options() -> argparse.ArgumentParser:
    """The options every `reclra runs` subcommand takes (after its name)."""
    env = os.environ.get
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--addr",
        default=env("RECLRA_ADDR", DEFAULT_ADDR),
        help=f"the service's host:port (default: RECLRA_ADDR, else {DEFAULT_ADDR})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"deadline of each call in seconds (default {DEFAULT_TIMEOUT_S:g}); watch and "
        "stop's wait use --wait",
    )
    p.add_argument(
        "--root-ca",
        default=env("RECLRA_ROOT_CA"),
        metavar="PEM",
        help="speak TLS, trusting this CA (or self-signed certificate) (env RECLRA_ROOT_CA)",
    )
    p.add_argument(
        "--cert",
        default=env("RECLRA_CERT"),
        metavar="PEM",
        help="this client's certificate, for mutual TLS (env RECLRA_CERT; with --key)",
    )
    p.add_argument(
        "--key",
        default=env("RECLRA_KEY"),
        metavar="PEM",
        help="this client's private key, for mutual TLS (env RECLRA_KEY; with --cert)",
    )
    p.add_argument(
        "--server-name",
        default=env("RECLRA_SERVER_NAME"),
        help="the name the server's certificate must carry, when --addr is not it "
        "(env RECLRA_SERVER_NAME)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS against the system's CA roots (implied by --root-ca or --cert)",
    )
    return p


def _wait_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help=f"give up {what} after S seconds (default {DEFAULT_WAIT_S:g}), exit code 2",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`reclra runs` and its subcommands, on the `reclra` command's subparsers."""
    common = _connection_options()
    runs = subparsers.add_parser(
        "runs",
        help="drive the training service (reclra serve): start, list, get, watch, stop runs",
        description=f"Talks to `reclra serve` at --addr; the bearer token comes from "
        f"{TOKEN_ENV} or the file named by {TOKEN_FILE_ENV}.",
    )
    sub = runs.add_subparsers(dest="runs_command", required=True)
    start = sub.add_parser("start", parents=[common], help="start a run; prints its id")
    start.add_argument("--config", help="TOML config file (as `reclra train --config`)")
    start.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set train.epochs=3 (repeatable)",
    )
    start.add_argument("--run-id", default="", help="the run's id (default: the service picks)")
    start.add_argument("--json", action="store_true", help="print the run as JSON")
    listing = sub.add_parser("list", parents=[common], help="every run the service knows")
    listing.add_argument("--json", action="store_true", help="a JSON list of runs")
    get = sub.add_parser("get", parents=[common], help="one run: state, step, accuracy, error...")
    get.add_argument("run_id")
    get.add_argument("--json", action="store_true", help="print the run as JSON")
    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="print a run's progress until it ends; exit 0 succeeded, 1 failed, 3 stopped",
    )
    watch.add_argument("run_id")
    _wait_option(watch, "watching")
    stop = sub.add_parser(
        "stop", parents=[common], help="stop a run (it checkpoints, then stops); waits for it"
    )
    stop.add_argument("run_id")
    stop.add_argument("--no-wait", action="store_true", help="return once the stop is asked")
    _wait_option(stop, "waiting for the run to end")
    return runs


def _token() -> str:
    token, path = os.environ.get(TOKEN_ENV), os.environ.get(TOKEN_FILE_ENV)
    if token and path:
        raise CliError(f"both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set; unset one of them")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise CliError(
                f"{TOKEN_FILE_ENV}: cannot read {path} ({exc.strerror or exc}); point it at "
                "the service's token file"
            ) from None
        if not token:
            raise CliError(f"{TOKEN_FILE_ENV}: {path} is empty; it must hold the bearer token")
    if not token:
        raise CliError(
            f"no bearer token: set {TOKEN_ENV}, or {TOKEN_FILE_ENV} to a file holding it "
            "(the service's service.token or service.token_file)"
        )
    return token


def _client(args: argparse.Namespace) -> Client:
    from driver.api.service import Client
    from driver.config import ConfigError

    for option in ("timeout", "wait"):
        seconds = getattr(args, option, 1.0)
        if not seconds > 0:  # NaN too
            raise CliError(f"--{option} must be a positive number of seconds, not {seconds:g}")
    try:
        return Client(
            args.addr,
            _token(),
            root_ca=args.root_ca,
            cert=args.cert,
            key=args.key,
            server_name=args.server_name,
            tls=True if args.tls else None,
        )
    except (ConfigError, ValueError) as exc:  # a PEM file that is not one; cert without key
        raise CliError(str(exc)) from None


def _explain(exc: Any, args: argparse.Namespace, deadline: float) -> str:
    """An RpcError as one line naming what to do."""
    from driver.api.service import StatusCode

    code, details = exc.code(), " ".join(str(exc.details() or "").split())
    if code == StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the service at {args.addr} ({details}); is `reclra serve` "
            "running there? (--addr or RECLRA_ADDR; TLS with --root-ca)"
        )
    if code == StatusCode.UNAUTHENTICATED:
        return (
            f"the service at {args.addr} refused the token; set {TOKEN_ENV} or "
            f"{TOKEN_FILE_ENV} to the service's token"
        )
    if code == StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {args.addr} within {deadline:g} s (the deadline: --timeout/--wait)"
    return f"{code.name}: {details}"


def _fields(run: Any) -> dict[str, Any]:
    """A Run message as a dict of every field (zeros and empty strings included)."""
    return {f.name: getattr(run, f.name) for f in run.DESCRIPTOR.fields}


def _cell(name: str, value: Any, run: dict[str, Any]) -> str:
    if name == "step":
        return f"{value}/{run['total_steps']}"
    if isinstance(value, float):
        return f"{value:.4f}" if value else "-"
    if name == "pid" or isinstance(value, str):
        return str(value) if value else "-"
    return str(value)


def format_table(runs: list[dict[str, Any]]) -> str:
    """Runs as a plain-text table, one row each, columns as wide as their widest cell."""
    rows = [[c.upper() for c in TABLE]]
    rows += [[_cell(c, r[c], r) for c in TABLE] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_run(run: dict[str, Any]) -> str:
    """One run, a field a line (step as step/total_steps)."""
    shown = {k: _cell(k, v, run) for k, v in run.items() if k != "total_steps"}
    width = max(len(k) for k in shown) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in shown.items())


def _progress(run: dict[str, Any]) -> str:
    line = f"{run['run_id']}: {run['state']} step {run['step']}/{run['total_steps']}"
    line += f" epoch {run['epoch']}"
    if run["val_acc"]:
        line += f" val_acc {run['val_acc']:.4f}"
    if run["test_acc"]:
        line += f" test_acc {run['test_acc']:.4f}"
    if run["error"]:
        line += f" error: {run['error']}"
    return line


def _watch(client: Client, run_id: str, wait: float) -> dict[str, Any]:
    """Prints each event; returns the last run (its end state, unless the stream ended early)."""
    last: dict[str, Any] | None = None
    for event in client.watch(run_id, timeout=wait):
        last = _fields(event.run)
        print(_progress(last), flush=True)
    if last is None or last["state"] not in END_CODES:
        raise CliError(f"the service ended the watch of {run_id} before the run ended")
    return last


def _run(args: argparse.Namespace, client: Client) -> int:
    from driver.api.service import messages as pb

    cmd = args.runs_command
    if cmd == "start":
        toml = ""
        if args.config:
            try:
                toml = Path(args.config).read_text()
            except OSError as exc:
                raise CliError(
                    f"--config: cannot read {args.config} ({exc.strerror or exc})"
                ) from None
        request = pb.StartRunRequest(config_toml=toml, overrides=args.overrides, run_id=args.run_id)
        run = _fields(client.call("StartRun", request, timeout=args.timeout))
        if args.json:
            print(json.dumps(run, indent=2))
        else:
            print(
                f"{run['run_id']}: {run['state']}; memory estimate {run['memory_estimate'] or '-'}"
            )
        return 0
    if cmd == "list":
        reply = client.call("ListRuns", pb.ListRunsRequest(), timeout=args.timeout)
        runs = [_fields(r) for r in reply.runs]
        print(json.dumps(runs, indent=2) if args.json else format_table(runs))
        return 0
    if cmd == "get":
        run = _fields(
            client.call("GetRun", pb.GetRunRequest(run_id=args.run_id), timeout=args.timeout)
        )
        print(json.dumps(run, indent=2) if args.json else format_run(run))
        return 0
    if cmd == "watch":
        return END_CODES[_watch(client, args.run_id, args.wait)["state"]]
    # stop
    run = _fields(
        client.call("StopRun", pb.StopRunRequest(run_id=args.run_id), timeout=args.timeout)
    )
    if args.no_wait or run["state"] in END_CODES:
        print(_progress(run))
        return 0
    _watch(client, args.run_id, args.wait)
    return 0


def main(args: argparse.Namespace) -> int:
    """Runs one `reclra runs` subcommand; its exit code."""
    from driver.api.service import RpcError

    try:
        client = _client(args)
    except CliError as exc:
        print(f"reclra: error: {exc}", file=sys.stderr)
        return 2
    deadline = args.wait if args.runs_command in ("watch", "stop") else args.timeout
    try:
        return _run(args, client)
    except CliError as exc:
        print(f"reclra: error: {exc}", file=sys.stderr)
    except RpcError as exc:
        print(f"reclra: error: {_explain(exc, args, deadline)}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C on watch or stop's wait: the run goes on
        print("reclra: interrupted; the run goes on (reclra runs stop ends it)", file=sys.stderr)
        return 130
    finally:
        client.close()
    return 2
