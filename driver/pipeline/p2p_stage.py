"""A stage that runs its own op order and talks to its neighbours itself (pipeline.engine = "p2p").

The driver of the stream engine submits every op of every micro-batch as an actor call (2K - 1
calls per micro-batch) and spends about 1.5 ms of its CPU on each (bench.scaling): it cannot
feed fast GPUs. Here each stage is given a whole step in one call and runs its ops in the
order `schedule.stage_ops` gives, receiving activations from the stage below and signals from
the stage above (or from the top, under a broadcast error) by torch.distributed point-to-point
messages: gloo on CPU, NCCL between GPUs. Both ends follow the same static order, so every send
has its receive; sends are non-blocking (a stage sending up while its neighbour sends down
cannot deadlock), receives block with the process group's deadline.

Messages carry data only: every shape is known at both ends. The driver gives each stage the
step's micro-batch sizes; an activation into stage s is (size, *its first block's input
shape), an error e_L is (size, classes), and a boundary has the shape of the receiver's own
output for that micro-batch. So an activation is one message and a signal one (broadcast e_L)
or two (chained: e_L and the boundary); with diagnostics on, a flag says whether backprop's
gradient follows.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from driver.pipeline.schedule import APPLY, FORWARD, stage_ops
from workers.chain import learns_chained
from workers.rules import ErrorSignal
from workers.spec import StageSpec, StageStats
from workers.stage import Stage


class P2PStage(Stage):
    """A Stage (blocks, rule, optimizer, state) that trains a whole step per call."""

    def __init__(self, spec: StageSpec, stages: int, window: int) -> None:
        super().__init__(spec)
        self.k, self.window = stages, window
        self.s = spec.index
        self.broadcast = not learns_chained(spec)
        self.comm = torch.device("cuda" if spec.device.startswith("cuda") else "cpu")
        self._sends: list[Any] = []  # in-flight sends, with their buffers
        self._sizes: list[int] = []  # this step's micro-batch sizes
        self._out_shape: dict[int, tuple[int, ...]] = {}  # micro-batch -> this stage's output

    # -- set-up ---------------------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it (stage 0 hosts the group's store)."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int, backend: str, timeout_s: float) -> bool:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.s,
            world_size=self.k,
            timeout=timedelta(seconds=timeout_s),
        )
        return True

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- messages -------------------------------------------------------------------------------
    def _post(self, t: torch.Tensor, dst: int) -> None:
        t = t.detach().to(self.comm).contiguous()
        self._sends.append((dist.isend(t, dst), t))

    def _take(
        self, src: int, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype or self.dtype, device=self.comm)
        dist.recv(out, src)
        return out

    def _post_signal(self, sig: ErrorSignal, dst: int) -> None:
        if self.spec.diagnose_every > 0:
            self._post(torch.tensor([sig.true_grad is not None], dtype=torch.int64), dst)
        assert sig.output_error is not None
        for t in (sig.output_error, sig.boundary, sig.true_grad):
            if t is not None:
                self._post(t, dst)

    def _take_signal(self, src: int, mb: int) -> ErrorSignal:
        has_grad = self.spec.diagnose_every > 0 and bool(self._take(src, (1,), torch.int64))
        e = self._take(src, (self._sizes[mb], self.spec.num_classes))
        # a chained rule's sender (never stage 0) sends the boundary at this stage's output
        out = self._out_shape[mb]
        boundary = self._take(src, out) if self.chained else None
        grad = self._take(src, out) if has_grad else None
        return ErrorSignal(output_error=e, boundary=boundary, true_grad=grad)

    # -- a step ---------------------------------------------------------------------------------
    def run_step(
        self, xs: list[torch.Tensor] | None, labels: list[torch.Tensor] | None, sizes: list[int]
    ) -> tuple[list[torch.Tensor], StageStats]:
        """Forward, learn and apply one step of micro-batches of `sizes` samples in this stage's
        order (sync: every learn sees the step's starting weights, one apply at the end). `xs`:
        the inputs (stage 0); `labels`: the labels (the top). Returns the top's logits and the
        stats."""
        self._sizes = sizes
        logits: list[torch.Tensor] = []
        in_shape = tuple(self.block_list[0].in_shape)
        for op in stage_ops(self.s, len(sizes), self.window, apply_at_end=True):
            if op.kind == FORWARD:
                x = (
                    xs[op.mb]
                    if xs is not None
                    else self._take(self.s - 1, (sizes[op.mb], *in_shape))
                )
                out = self.forward(op.mb, x)
                self._out_shape[op.mb] = tuple(out.shape)
                if self.s < self.k - 1:
                    self._post(out, self.s + 1)
                else:
                    logits.append(out.cpu())
            elif op.kind == APPLY:
                self.apply()
            else:
                self._learn_op(op.mb, labels)
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        return logits, self.pop_stats()

    def _learn_op(self, mb: int, labels: list[torch.Tensor] | None) -> None:
        top = self.s == self.k - 1
        if top:
            assert labels is not None, "the top stage needs the labels"
            signal = ErrorSignal(labels=labels[mb])
        else:
            signal = self._take_signal(self.k - 1 if self.broadcast else self.s + 1, mb)
        sent = self.learn(mb, signal)
        self._out_shape.pop(mb, None)
        if top and self.broadcast:
            for dst in range(self.k - 1):
                self._post_signal(sent, dst)
        elif not self.broadcast and self.s > 0:
            self._post_signal(sent, self.s - 1)
