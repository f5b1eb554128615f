"""The `reclra` command line: train (and compare rules) from a TOML config with --set overrides."""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.errors import ClusterError
from driver.config import Config, ConfigError, load_config
from driver.data.common import DataError
from driver.run import storage
from driver.run.controller import RunFailed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reclra", description="Backprop-free layer-parallel training")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train a model; with no arguments, rec-LRA vs backprop on digits"
    )
    t.add_argument("--config", help="TOML config file (sections: model, rule, optim, data, train)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set rule.beta=0.2 (repeatable)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars (for jobs and logs)")
    t.add_argument(
        "--progress",
        action="store_true",
        help="progress bars even when stderr is not a terminal (default: bars on a terminal, "
        "else a log line every train.log_every steps)",
    )
    t.add_argument(
        "--resume",
        metavar="PATH_OR_URI",
        help="continue from a checkpoint file, or a run's checkpoint directory (its newest "
        "good checkpoint), a local path or a URI such as s3://bucket/runs/rec_lra/checkpoints; "
        "trains cfg.rule only",
    )
    c = sub.add_parser(
        "config",
        help="print the resolved config of a file and --sets (recipes applied) as TOML, each "
        "key with where its value came from and what it does",
    )
    c.add_argument("--config", help="TOML config file")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("report", help="plots and a markdown summary of a finished run")
    r.add_argument("run_dir", help="the run's train.out_dir (holding <rule>/metrics.json)")
    r.add_argument("--out", help="where to write (default: the run directory)")
    v = sub.add_parser("serve", help="run the training service: gRPC control API + /metrics")
    v.add_argument("--config", help="TOML config with [service] and [metrics] sections")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def _serve(cfg: Config) -> None:
    import signal
    import threading

    from driver.api.metrics import Metrics, MetricsServer
    from driver.api.service import Service

    metrics = Metrics()
    endpoint = MetricsServer(metrics, cfg.metrics.addr, cfg.metrics.port)
    service = Service(cfg.service, metrics)
    print(
        f"reclra: serving gRPC on {cfg.service.addr}:{service.port}, metrics at {endpoint.url}",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    service.stop()
    endpoint.close()


def _train(cfg: Config, args: argparse.Namespace) -> None:
    """`reclra train`: the main rule (resumed with --resume), then the compared rules and their
    table; with metrics.enabled, one /metrics endpoint serves every run of the command."""
    from driver.api.metrics import Metrics, MetricsServer
    from driver.api.metrics_callback import MetricsCallback
    from driver.run.compare import compare_rules, format_table
    from driver.run.train import train

    metrics = server = None
    if cfg.metrics.enabled:
        metrics = Metrics()
        server = MetricsServer(metrics, cfg.metrics.addr, cfg.metrics.port)
        logging.getLogger(__name__).info("metrics at %s", server.url)

    def observers(c: Config) -> list:
        return [] if metrics is None else [MetricsCallback(metrics, c.rule.label)]

    try:
        if args.resume:
            run = train(
                cfg,
                quiet=args.quiet,
                progress=args.progress,
                resume=args.resume,
                callbacks=observers(cfg),
            )
            curves = storage.describe(storage.join(cfg.train.out_dir, run.rule, "metrics.json"))
            print(
                f"{run.rule}: test acc {run.test_acc:.4f} after {run.steps} steps; curves: {curves}"
            )
            return
        runs = compare_rules(cfg, quiet=args.quiet, progress=args.progress, callbacks=observers)
        print(format_table(runs))
        curves = storage.describe(storage.join(cfg.train.out_dir, "<rule>", "metrics.json"))
        print(f"curves: {curves}")
    finally:
        if server is not None:
            server.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "report":
        from driver.api.report import ReportError, report

        try:
            print(f"report: {report(args.run_dir, args.out)}")
        except ReportError as exc:
            print(f"reclra: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            from driver.config.docs import describe

            print(describe(cfg), end="")
        elif args.command == "serve":
            _serve(cfg)
        else:
            _train(cfg, args)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"reclra: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        if isinstance(exc.__cause__, ValueError):  # a config or data the run could not use
            print(f"reclra: error: {exc.__cause__}", file=sys.stderr)
            return 2
        print(f"reclra: run failed: {exc}", file=sys.stderr)
        return 1
    except ClusterError as exc:  # the run started and failed: say why, in a line
        print(f"reclra: run failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
