"""The `reclra` command line: train (and compare rules) from a TOML config with --set overrides;
export and evaluate a trained model."""

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
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="remove an earlier run's files from the rule folders this run writes "
        "(train.out_dir/<rule>) before it starts; without it such a train.out_dir is refused",
    )
    x = sub.add_parser(
        "export",
        help="write a trained model's forward weights and BatchNorm as plain torch files",
    )
    x.add_argument(
        "run",
        metavar="RUN_OR_CKPT",
        help="a checkpoint file, a run's checkpoint directory (its newest good checkpoint) or "
        "a run folder (train.out_dir/<rule>); a path or a URI",
    )
    x.add_argument(
        "--format",
        default="state_dict",
        help="torchvision (loads into torchvision.models.<name>, ImageNet-form ResNets of width "
        "64), state_dict (any model; loads into driver.run.export.plain_model's module) or "
        "safetensors (default: state_dict)",
    )
    x.add_argument(
        "--out", help="the file to write (default: model.pt or model.safetensors in the run folder)"
    )
    x.add_argument(
        "--with-synapses",
        action="store_true",
        help="also the error synapses, under reclra.<layer>.feedback / reclra.<block>.skipN",
    )
    x.add_argument(
        "--with-aux-heads",
        action="store_true",
        help="also a decoupled run's auxiliary heads, under reclra.aux.*",
    )
    e = sub.add_parser(
        "eval", help="the test accuracy of a trained model: a run, a checkpoint or an export"
    )
    e.add_argument(
        "model",
        metavar="RUN_OR_CKPT_OR_EXPORT",
        help="a checkpoint, a run folder (train.out_dir/<rule>) or a file `reclra export` wrote",
    )
    e.add_argument(
        "--config",
        help="TOML config (default: the run's recorded config, or the one written beside an "
        "export)",
    )
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
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
    from driver.api import runs_cli

    runs_cli.add_parser(sub)
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
    from driver.run.fresh import ensure_fresh
    from driver.run.train import train

    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite removes it: pass one of them")
    if not args.resume:  # before anything is written: a fresh run meets no old files
        ensure_fresh(cfg, overwrite=args.overwrite)
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


def _use_trained(args: argparse.Namespace) -> int:
    """`reclra export` and `reclra eval`: a bad input is one line and exit 2."""
    from driver.run.evaluate import evaluate_trained
    from driver.run.export import export

    try:
        if args.command == "export":
            weights, config = export(
                args.run,
                args.format,
                args.out,
                with_synapses=args.with_synapses,
                with_aux_heads=args.with_aux_heads,
            )
            print(f"export: {storage.describe(weights)} (config: {storage.describe(config)})")
        else:
            print(evaluate_trained(args.model, args.config, args.overrides).line())
    except (ConfigError, DataError, ValueError) as exc:  # CheckpointError, ExportError too
        print(f"reclra: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command in ("export", "eval"):
        return _use_trained(args)
    if args.command == "runs":
        from driver.api import runs_cli

        return runs_cli.main(args)
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
