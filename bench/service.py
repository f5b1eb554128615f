"""Benchmark: the cost of running as a service, recovery time, checkpoint write speed.

    python -m bench.service --json results.json

1. Samples/s of a K = 2 Ray run with /metrics served, checkpoints every N steps and W gRPC
   watchers streaming its progress, as a ratio to the same run with none of them (in
   alternation, --rounds times each, on the same machine).
2. Recovery: seconds from SIGKILL of a stage's worker process to training again.
3. Checkpoint write time per MB, for a ResNet-18's full state (weights, synapses, AdamW).
4. What a checkpoint costs the training loop (the checkpointing state's seconds): a cut in flow
   with the write in the background, and the final one (drained, written and waited for).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray

from bench.output import save
from driver.api.metrics import Metrics, MetricsServer
from driver.api.service import Client, Service, messages
from driver.config import parse_config
from driver.config.service import ServiceConfig
from driver.data.load import load_dataset
from driver.run import checkpoint_store
from driver.run.callbacks import Callback
from driver.run.controller import Controller, RunState

RUN = """
[model]
name = "resnet8"
width = 32
[data]
name = "synthetic"
synthetic_size = {size}
[train]
epochs = 1
batch_size = 32
compare = []
log_every = 100000
checkpoint_every = {every}
[pipeline]
stages = 2
boundaries = [2]
micro_batches = 4
schedule = "async"
"""


def plain(size: int, out: Path) -> float:
    cfg = parse_config(RUN.format(size=size, every=0))
    cfg = cfg.__class__(
        **{
            **cfg.__dict__,
            "train": cfg.train.__class__(**{**cfg.train.__dict__, "max_restarts": 0}),
        }
    )
    t0 = time.perf_counter()
    run = Controller(cfg, out_dir=out, splits=load_dataset(cfg.data)).run_to_end()
    return run.steps * cfg.train.batch_size / (time.perf_counter() - t0)


def served(size: int, every: int, watchers: int, out: Path) -> float:
    metrics = Metrics()
    endpoint = MetricsServer(metrics)
    svc = Service(
        ServiceConfig(port=0, token="bench", runs_dir=str(out), max_workers=watchers + 16), metrics
    )
    client = Client(f"127.0.0.1:{svc.port}", "bench")
    try:
        t0 = time.perf_counter()
        reply = client.call(
            "StartRun", messages.StartRunRequest(config_toml=RUN.format(size=size, every=every))
        )
        done = []

        def watch() -> None:
            done.append(list(client.watch(reply.run_id))[-1].run)

        threads = [threading.Thread(target=watch) for _ in range(watchers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        final = done[0]
        assert final.state == "succeeded", final
        assert len(done) == watchers
        return final.step * 32 / (time.perf_counter() - t0)
    finally:
        client.close()
        svc.stop()
        endpoint.close()


class CheckpointTimer(Callback):
    """Seconds from entering the checkpointing state to leaving it, per checkpoint."""

    def __init__(self) -> None:
        self.entered: float | None = None
        self.seconds: list[float] = []

    def after_transition(self, ctl, previous, current) -> None:  # noqa: ANN001
        now = time.perf_counter()
        if previous is RunState.CHECKPOINTING and self.entered is not None:
            self.seconds.append(now - self.entered)
        self.entered = now if current is RunState.CHECKPOINTING else None


def loop_cost(size: int, every: int, out: Path) -> dict:
    cfg = parse_config(RUN.format(size=size, every=every))
    timer = CheckpointTimer()
    ctl = Controller(cfg, out_dir=out, splits=load_dataset(cfg.data), callbacks=[timer])
    ctl.run_to_end()
    in_flow = timer.seconds[:-1]
    return {
        "in_flow_median_s": statistics.median(in_flow) if in_flow else None,
        "final_s": timer.seconds[-1],
        "published": ctl.checkpoints_written,
        "failed": ctl.checkpoints.failed,
    }


def recovery(size: int, out: Path) -> float:
    cfg = parse_config(RUN.format(size=size, every=5))
    ctl = Controller(cfg, out_dir=out, splits=load_dataset(cfg.data))
    while ctl.run.steps < 8:
        ctl.step()
    actor = ctl.runner.group.actors[1]  # type: ignore[union-attr]
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)
    t_kill = time.perf_counter()
    recovered = False
    while not ctl.done:
        before = ctl.run.steps
        state = ctl.step()
        recovered = recovered or state is RunState.RECOVERING
        if recovered and state is RunState.RUNNING and ctl.run.steps > before:
            seconds = time.perf_counter() - t_kill
            ctl.request_stop()
            ctl.run_to_end()
            return seconds
    raise RuntimeError(f"the run never recovered: {ctl.state}, {ctl.error}")


def checkpoint_speed(out: Path) -> dict:
    import torch

    from workers.models import ModelConfig, model_plan
    from workers.optim import OptimConfig
    from workers.rules import ErrorSignal, RuleConfig
    from workers.spec import StageSpec
    from workers.stage import Stage

    model = ModelConfig(name="resnet18", width=64)
    n = len(model_plan(model, (3, 32, 32), 10))
    st = Stage(
        StageSpec(
            model=model,
            rule=RuleConfig(),
            optim=OptimConfig(),
            input_shape=(3, 32, 32),
            num_classes=10,
            blocks=(0, n),
        )
    )
    st.forward(0, torch.randn(4, 3, 32, 32))
    st.learn(0, ErrorSignal(labels=torch.randint(0, 10, (4,))))
    st.apply()  # AdamW moments exist
    state = {"runner": st.state_dict()}
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        path = checkpoint_store.save(out, i, state, keep=1)
        times.append(time.perf_counter() - t0)
    mb = path.stat().st_size / 2**20
    return {
        "megabytes": mb,
        "seconds": statistics.median(times),
        "seconds_per_mb": statistics.median(times) / mb,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--size", type=int, default=1024, help="synthetic training samples per run")
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="plain/served pairs (medians taken)")
    args = p.parse_args(argv)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    tmp = Path(tempfile.mkdtemp(prefix="reclra-bench-service-"))
    try:
        rates: dict[str, list[float]] = {"plain": [], "served": []}
        for i in range(args.rounds):
            rates["plain"].append(plain(args.size, tmp / f"plain{i}"))
            rates["served"].append(
                served(args.size, args.checkpoint_every, args.watchers, tmp / f"served{i}")
            )
            print(
                f"round {i}: plain {rates['plain'][-1]:.1f}, served {rates['served'][-1]:.1f}"
                " samples/s",
                flush=True,
            )
        rec = recovery(args.size, tmp / "recovery")
        cost = loop_cost(args.size, args.checkpoint_every, tmp / "cost")
        ckpt = checkpoint_speed(tmp / "ckpt")
    finally:
        ray.shutdown()
    plain_rate, served_rate = statistics.median(rates["plain"]), statistics.median(rates["served"])
    result = {
        "watchers": args.watchers,
        "checkpoint_every": args.checkpoint_every,
        "plain_samples_per_s": plain_rate,
        "served_samples_per_s": served_rate,
        "ratio": served_rate / plain_rate,
        "recovery_seconds": rec,
        "checkpoint": ckpt,
        "checkpoint_loop": cost,
    }
    print(
        f"served / plain samples/s: {result['ratio']:.3f} (with /metrics, a checkpoint every "
        f"{args.checkpoint_every} steps, {args.watchers} watchers)"
    )
    print(f"recovery after a stage kill: {rec:.1f} s to training again")
    print(
        f"the loop's time per checkpoint: {1e3 * (cost['in_flow_median_s'] or 0):.1f} ms in flow, "
        f"{1e3 * cost['final_s']:.0f} ms for the final one (drained, written, waited for)"
    )
    print(
        f"checkpoint: {ckpt['megabytes']:.1f} MB in {ckpt['seconds']:.2f} s "
        f"({1e3 * ckpt['seconds_per_mb']:.1f} ms/MB)"
    )
    return save(result, args.json)


if __name__ == "__main__":
    main()
