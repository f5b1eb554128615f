"""A discrete-event simulation of the pipeline's real schedules (driver/pipeline/schedule.py).

Each stage runs its ops in the order `schedule.stage_ops` gives; an op starts when its stage is
free and every op it depends on (`schedule.dependencies`, chained or broadcast) has finished,
plus the hop time (latency + bytes / bandwidth) for an input made on another stage. At most
`cores` ops compute at once: with more running, they share the cores equally (processor
sharing, as the OS scheduler shares cores between single-threaded actors).

Rules as schedules (all from schedule.py, none re-implemented here):
- rec-LRA, e_L broadcast (`topology = "skip"`): chained=False, window K (the default).
- rec-LRA, mirror (the default topology): chained=True, window K.
- backprop 1F1B (PipeDream-Flush): chained=True, window K: stage s warms up K - s forwards,
  then alternates one learn (backward) and one forward, then drains.
- backprop GPipe: chained=True, window M + K - 1, so that `warmup` gives every stage all M
  forwards before its first learn (backward): all forwards, then all backwards.
- rec-LRA decoupled (`topology = "decoupled"`): decoupled=True, window 1. Every stage below the
  top learns each micro-batch from an auxiliary head of its own right after its forward
  (`schedule.dependencies(..., decoupled=True)`: a learn waits for no other stage), so a stage
  runs F0 L0 F1 L1 ... (`stage_ops(s, n, 1)`). The head's cost is not the simulator's: the
  stage costs carry it (bench.scaling.project adds it to every stage below the top). The
  stream engine runs each decoupled stage's forward and learn as one call (forward_learn, two
  results), whose activation the next stage can take only once the call ends: the simulated
  forward of stage s + 1 waits for stage s's learn of the same micro-batch, its hop at the
  top signal's bandwidth (the object store) where one is set. The p2p engine sends the
  activation right after the forward.
`sync` appends each stage's apply and flushes: the step ends when the last op ends. `async`
streams `steps` x M micro-batches with no apply op (each learn applies its own update, so its
cost belongs in the learn) and no flush.

The p2p engine (`calls` > 0) feeds the stream in `calls` step calls: each stage runs the ops a
replica of the stream (`schedule.Stream`, as driver/pipeline/p2p_stage.py does) allows once
that step's micro-batches are fed, its top forward-learning each micro-batch at once. The
driver's CPU for a step's K calls (submitting them, gathering their results) is one driver op
the step's calls wait for. Sync: the driver gathers a step before it starts the next (a
barrier per step). Async: a step's calls queue behind the step before's, and the driver
gathers step t - 1 after submitting step t (driver/pipeline/p2p.py), so no stage waits on it
while the driver keeps up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from driver.pipeline.schedule import (
    FORWARD,
    LEARN,
    Op,
    Stream,
    dependencies,
    fuse_top,
    stage_ops,
    warmup,
)

EPS = 1e-12
DRIVER = "D"  # an op of the driver's (its share of one micro-batch)


@dataclass(frozen=True)
class StageCosts:
    """Seconds per micro-batch of each of K stages, and what crossing into it costs."""

    forward: tuple[float, ...]
    learn: tuple[float, ...]
    apply: tuple[float, ...] = ()  # per step (sync); () for none
    call: float = 0.0  # one actor call's own work on its stage (0: in one process)
    latency: float = 0.0  # seconds per cross-stage hop
    bandwidth: float = float("inf")  # bytes per second of a hop
    fwd_bytes: tuple[float, ...] = ()  # bytes of the activation stage s receives (s >= 1)
    signal_bytes: tuple[float, ...] = ()  # bytes of the signal stage s learns from (s < K-1)
    fused_top: bool = True  # the last stage's forward and learn are one call (stream.py)
    node_size: int = 0  # stages per node (0: one link for all hops)
    intra_bandwidth: float = float("inf")  # bytes per second of a hop within a node
    # bytes per second of the top stage's learn signal (0: as activations): its fused
    # forward + learn returns two results, which the direct transports cannot carry
    signal_bandwidth: float = 0.0
    # a hop's bytes / bandwidth is CPU work of the op that takes it (CPU hosts: gloo and the
    # object store copy and serialize on the cores that compute), not only a delay
    hop_cpu: bool = False
    # the driver's own CPU seconds per micro-batch (submitting its calls, gathering results):
    # a process of its own, sharing the cores; stage 0 forwards micro-batch n once the driver
    # has done n's share (0: no driver)
    driver: float = 0.0

    def bandwidth_between(self, a: int, b: int) -> float:
        same = self.node_size > 0 and a // self.node_size == b // self.node_size
        return self.intra_bandwidth if same else self.bandwidth

    @property
    def k(self) -> int:
        return len(self.forward)

    def hop(self, nbytes: float, bandwidth: float | None = None) -> float:
        return self.latency + nbytes / (self.bandwidth if bandwidth is None else bandwidth)

    def work(self, op: Op, *, decoupled: bool = False) -> float:
        """Seconds of compute (on one core) op takes, its call included (`decoupled`: every
        stage's learn is fused with its forward where the top's is)."""
        s, top = op.stage, op.stage == self.k - 1
        if op.kind == FORWARD:
            return self.forward[s] + self.call
        if op.kind == LEARN:
            return self.learn[s] + (0.0 if (top or decoupled) and self.fused_top else self.call)
        if op.kind == DRIVER:
            return self.driver
        return (self.apply[s] if self.apply else 0.0) + self.call

    def _bytes_over(self, dep: Op, op: Op) -> tuple[float, float]:
        """(bytes, bandwidth) of the hop from dep's stage to op's."""
        bw = self.bandwidth_between(dep.stage, op.stage)
        if op.kind == FORWARD:
            if dep.kind == LEARN and self.signal_bandwidth:  # a fused call's activation: its
                bw = self.signal_bandwidth  # two results go by the object store
            return (self.fwd_bytes[op.stage] if self.fwd_bytes else 0.0), bw
        if self.signal_bandwidth and dep.stage == self.k - 1:
            bw = self.signal_bandwidth
        return (self.signal_bytes[op.stage] if self.signal_bytes else 0.0), bw

    def transfer(self, dep: Op, op: Op) -> float:
        """Hop delay from dep's stage to op's (0 on the same stage, to or from the driver)."""
        if dep.stage == op.stage or DRIVER in (dep.kind, op.kind):
            return 0.0
        if self.hop_cpu:
            return self.latency
        return self.hop(*self._bytes_over(dep, op))

    def transfer_work(self, dep: Op, op: Op) -> float:
        """CPU seconds the hop adds to op (hop_cpu only)."""
        if dep.stage == op.stage or DRIVER in (dep.kind, op.kind) or not self.hop_cpu:
            return 0.0
        nbytes, bw = self._bytes_over(dep, op)
        return nbytes / bw


@dataclass
class Trace:
    start: dict[Op, float] = field(default_factory=dict)
    end: dict[Op, float] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)


def p2p_calls(
    k: int,
    n: int,
    window: int,
    calls: int,
    *,
    chained: bool,
    sync: bool,
    decoupled: bool = False,
) -> list[list[list[Op]]]:
    """calls[t][s]: the ops stage s runs in its call for step t of the p2p engine (n / calls
    micro-batches a step; the last call closes the stream), the top's learn right after its
    forward (decoupled: every stage's). Sync closes the stream at every step: simulate one
    step (calls = 1)."""
    if sync and calls != 1:
        raise ValueError("p2p_calls: a sync stream is one step; simulate calls = 1")
    stream = Stream(k, window, chained=chained, sync=sync, decoupled=decoupled)
    out = []
    for t in range(calls):
        stream.available += n // calls
        stream.closed = sync or t == calls - 1
        ops = list(stream.ready())
        per = [[op for op in ops if op.stage == s] for s in range(k)]
        per[-1] = fuse_top(per[-1])
        out.append(per)
    return out


def simulate(
    costs: StageCosts,
    n: int,
    window: int,
    *,
    chained: bool,
    sync: bool,
    cores: float = float("inf"),
    calls: int = 0,
    decoupled: bool = False,
) -> Trace:
    """Run one stream of `n` micro-batches through K stages; each op's start and end. `calls`:
    fed in that many p2p step calls (the driver's CPU, `costs.driver` per micro-batch, is
    spent once per call, between calls). `decoupled`: every stage learns from its own head
    right after its forward (window 1, as schedule.ticks and Stream force it)."""
    k = costs.k
    window = 1 if decoupled else window
    # the stream engine's fused calls (decoupled, below the top): the activation is a result
    # of the forward_learn call, there once the call (the learn) ends
    fused = decoupled and costs.fused_top
    gate: dict[Op, Op] = {}  # an op -> the driver op it waits for (p2p: its call's start)
    if calls:
        per_call = p2p_calls(k, n, window, calls, chained=chained, sync=sync, decoupled=decoupled)
        queues = [[op for call in per_call for op in call[s]] for s in range(k)]
        drv = [Op(DRIVER, k, t) for t in range(calls)]
        queues.append(drv)
        for step, call in enumerate(per_call):
            for s in range(k):
                if call[s]:
                    gate[call[s][0]] = drv[step]
        lasts = [[c[s][-1] for s in range(k) if c[s]] for c in per_call]
        lag = 0 if sync else 1  # async: a step's calls queue behind the step before's
    else:
        queues = [list(stage_ops(s, n, window, apply_at_end=sync)) for s in range(k)]
        if costs.driver > 0:  # the driver: a queue of its own, index k
            queues.append([Op(DRIVER, k, mb) for mb in range(n)])
    heads = [0] * len(queues)
    running: dict[int, list] = {}  # stage -> [op, remaining work]
    trace = Trace()
    t = 0.0
    while True:
        wake = float("inf")
        for s in range(len(queues)):
            if s in running or heads[s] == len(queues[s]):
                continue
            op = queues[s][heads[s]]
            deps = (
                []
                if op.kind == DRIVER
                else dependencies(op, k, chained=chained, decoupled=decoupled)
            )
            if fused:
                deps = [Op(LEARN, d.stage, d.mb) if d.kind == FORWARD else d for d in deps]
            if calls:  # the driver submits call t once it has gathered call t - 1 - lag
                back = op.mb - 1 - lag
                deps = (lasts[back] if back >= 0 else []) if op.kind == DRIVER else deps
                deps = [*deps, gate[op]] if op in gate else deps
            elif costs.driver > 0 and op.kind == FORWARD and op.stage == 0:
                deps = [*deps, Op(DRIVER, k, op.mb)]
            if not all(d in trace.end for d in deps):
                continue
            ready = max((trace.end[d] + costs.transfer(d, op) for d in deps), default=0.0)
            if ready <= t + EPS:
                hops = sum(costs.transfer_work(d, op) for d in deps)
                share = n // calls if calls and op.kind == DRIVER else 1  # p2p: a step's
                running[s] = [op, costs.work(op, decoupled=decoupled) * share + hops]
                trace.start[op] = t
                heads[s] += 1
            else:
                wake = min(wake, ready)
        if not running:
            if wake == float("inf"):
                break
            t = wake
            continue
        rate = min(1.0, cores / len(running))
        dt = min(min(w for _, w in running.values()) / rate, wake - t)
        t += dt
        for s in list(running):
            running[s][1] -= dt * rate
            if running[s][1] <= EPS:
                trace.end[running.pop(s)[0]] = t
    left = sum(len(q) - h for q, h in zip(queues, heads, strict=True))
    if left:
        raise RuntimeError(f"simulate: {left} ops never became ready (a dependency cycle)")
    return trace


@dataclass(frozen=True)
class Rule:
    chained: bool
    # "k": the stage count (1F1B); "all": M + K - 1 (GPipe, all forwards first); "one": 1
    window: str
    decoupled: bool = False  # every stage learns from its own head (no signal goes down)


RULES = {
    "rec_lra": Rule(chained=False, window="k"),  # e_L broadcast (topology = "skip")
    "rec_lra_mirror": Rule(chained=True, window="k"),  # the default topology
    "backprop_1f1b": Rule(chained=True, window="k"),
    "backprop_gpipe": Rule(chained=True, window="all"),
    # topology = "decoupled" (preset rec_lra_decoupled): auxiliary heads, window 1
    "rec_lra_decoupled": Rule(chained=False, window="one", decoupled=True),
}


def window_of(rule: Rule, k: int, m: int) -> int:
    return {"k": k, "all": m + k - 1, "one": 1}[rule.window]


def held_micro_batches(rule: Rule, k: int, m: int) -> list[int]:
    """Micro-batches each stage holds at most between a forward and its learn (its cached
    activations): schedule.warmup of its window. 1F1B: K - s; GPipe: M; decoupled: 1."""
    return [warmup(s, window_of(rule, k, m), m) for s in range(k)]


def step_seconds(
    costs: StageCosts,
    rule: Rule,
    m: int,
    *,
    sync: bool,
    cores: float = float("inf"),
    steps: int = 4,
    step_overhead: float = 0.0,
    engine: str = "stream",
) -> float:
    """Seconds per step of M micro-batches: one flushed stream (sync), or the steady share of
    a `steps`-step stream (async); the p2p engine feeds it a step per call."""
    w = window_of(rule, costs.k, m)
    p2p = engine == "p2p" and costs.k > 1
    if sync:
        trace = simulate(
            costs,
            m,
            w,
            chained=rule.chained,
            sync=True,
            cores=cores,
            calls=1 if p2p else 0,
            decoupled=rule.decoupled,
        )
        return trace.makespan + step_overhead
    trace = simulate(
        costs,
        m * steps,
        w,
        chained=rule.chained,
        sync=False,
        cores=cores,
        calls=steps if p2p else 0,
        decoupled=rule.decoupled,
    )
    return trace.makespan / steps + step_overhead


def one_process(costs: StageCosts, m: int) -> float:
    """K = 1 in one process: every op in order, no calls, no hops."""
    return m * (sum(costs.forward) + sum(costs.learn)) + sum(costs.apply)
