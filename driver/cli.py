"""The `reclra` command line: train (and compare rules) from a TOML config with --set overrides."""

from __future__ import annotations

import argparse
import logging
import sys

from driver.config import ConfigError, load_config
from driver.data import DataError


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
        "--resume",
        metavar="PATH",
        help="continue from a checkpoint file, or a run's checkpoint directory "
        "(its newest checkpoint); trains cfg.rule only",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "train" and args.resume:
            from driver.train import train

            run = train(cfg, quiet=args.quiet, resume=args.resume)
            print(
                f"{run.rule}: test acc {run.test_acc:.4f} after {run.steps} steps; "
                f"curves: {cfg.train.out_dir}/{run.rule}/metrics.json"
            )
        elif args.command == "train":
            from driver.compare import compare_rules, format_table

            runs = compare_rules(cfg, quiet=args.quiet)
            print(format_table(runs))
            print(f"curves: {cfg.train.out_dir}/<rule>/metrics.json")
    except (ConfigError, DataError, ValueError) as exc:
        print(f"reclra: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
