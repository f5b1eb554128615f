"""Per-hop transport between two actors: actor calls through the object store (with and without
zero-copy tensors), Ray Direct Transport over gloo, and a Ray Compiled Graph."""

from __future__ import annotations

import time

import ray
import torch


class Hop:
    """An actor that makes a tensor of a given shape, or takes one and answers its size."""

    def make(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ones(shape)

    def take(self, t: torch.Tensor) -> int:
        return t.numel()


def actor_call_hop(shape: tuple[int, ...], iters: int) -> float:
    """Seconds added per hop by passing `shape` (vs a 1-element tensor) between two actors."""
    a, b = (ray.remote(num_cpus=0)(Hop).remote() for _ in range(2))
    try:

        def run(sh: tuple[int, ...]) -> float:
            ray.get(b.take.remote(a.make.remote(sh)))  # warm
            t0 = time.perf_counter()
            for _ in range(iters):
                ray.get(b.take.remote(a.make.remote(sh)))
            return (time.perf_counter() - t0) / iters

        return max(run(shape) - run((1,)), 0.0)
    finally:
        for actor in (a, b):
            ray.kill(actor)


def direct_hop(shape: tuple[int, ...], iters: int, backend: str = "gloo") -> float:
    """The same hop with the tensor sent by Ray Direct Transport over a collective group."""
    from ray.experimental.collective import create_collective_group

    remote = ray.remote(num_cpus=0, enable_tensor_transport=True)(Hop)
    a, b = remote.remote(), remote.remote()
    try:
        create_collective_group([a, b], backend=backend)

        def run(sh: tuple[int, ...]) -> float:
            make = a.make.options(tensor_transport=backend)
            ray.get(b.take.remote(make.remote(sh)), timeout=60)  # warm
            t0 = time.perf_counter()
            for _ in range(iters):
                ray.get(b.take.remote(make.remote(sh)), timeout=60)
            return (time.perf_counter() - t0) / iters

        return max(run(shape) - run((1,)), 0.0)
    finally:
        for actor in (a, b):
            ray.kill(actor)


def _compiled_round_trip(shape: tuple[int, ...], iters: int) -> float:
    """Seconds per execution of make -> take through a compiled graph on two fresh actors.

    Each size gets its own graph: on Ray 2.60 here, one graph alternating message sizes
    stalled after a few dozen executions."""
    import math

    from ray.dag import InputNode

    a, b = (ray.remote(num_cpus=0)(Hop).remote() for _ in range(2))
    compiled = None
    try:
        with InputNode() as inp:
            dag = b.take.bind(a.make.bind(inp))
        compiled = dag.experimental_compile(_buffer_size_bytes=8 * math.prod(shape) + (1 << 20))
        ray.get(compiled.execute(shape), timeout=60)
        t0 = time.perf_counter()
        for _ in range(iters):
            ray.get(compiled.execute(shape), timeout=60)
        return (time.perf_counter() - t0) / iters
    finally:
        if compiled is not None:
            compiled.teardown()
        for actor in (a, b):
            ray.kill(actor)


def compiled_graph_hop(shape: tuple[int, ...], iters: int) -> float | None:
    """The same hop through Ray Compiled Graph channels; None if compiled graphs fail here."""
    try:
        return max(_compiled_round_trip(shape, iters) - _compiled_round_trip((1,), iters), 0.0)
    except Exception as exc:  # noqa: BLE001 - report, do not hide: the caller records None
        print(f"compiled graph hop failed: {type(exc).__name__}: {exc}")
        return None


MODES = {  # mode -> (JSON key, function, environment)
    "actor": ("actor_calls_s", "actor_call_hop", {}),
    "zero_copy": ("zero_copy_s", "actor_call_hop", {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}),
    "gloo": ("gloo_s", "direct_hop", {}),
    "compiled": ("compiled_graph_s", "compiled_graph_hop", {}),
}


def measure(shape: tuple[int, ...], iters: int, timeout_s: float = 120.0) -> dict:
    """Every hop, each in its own process with a deadline (a stalled transport must not hang
    the benchmark): {"actor_calls_s": .., "zero_copy_s": .., "gloo_s": .., "compiled_graph_s":
    .., each None with an "<key>_error" when it failed}."""
    import json
    import os
    import subprocess
    import sys

    out: dict = {}
    for mode, (key, _, env) in MODES.items():
        cmd = [sys.executable, "-m", "bench.transport", mode, ",".join(map(str, shape)), str(iters)]
        try:
            p = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **env}
            )
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            out[key] = json.loads(lines[-1])["seconds"] if lines else None
            if not lines:
                out[f"{key}_error"] = (p.stderr.strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            out[key] = None
            out[f"{key}_error"] = f"stalled past {timeout_s:g}s"
    return out


if __name__ == "__main__":
    import json
    import sys

    mode, shape_text, iters_text = sys.argv[1:4]
    env = MODES[mode][2]
    runtime_env = {"env_vars": env} if env else None
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env=runtime_env)
    shape_ = tuple(int(v) for v in shape_text.split(","))
    fn = globals()[MODES[mode][1]]
    print(json.dumps({"seconds": fn(shape_, int(iters_text))}), flush=True)
    ray.shutdown()
