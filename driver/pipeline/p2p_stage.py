"""A stage that runs its own op order and talks to its neighbours itself (pipeline.engine = "p2p").

The driver of the stream engine submits every op of every micro-batch as an actor call (2K - 1
calls per micro-batch) and spends about 1.5 ms of its CPU on each (bench.scaling): it cannot
feed fast GPUs. Here each stage is given a whole step in one call. It keeps a replica of the
pipeline's stream (`schedule.Stream`, pure bookkeeping) and runs the ops of its own that the
stream allows, in the order the stream engine would submit them, receiving activations from the
stage below and signals from the stage above (or from the top, under a broadcast error) by
torch.distributed point-to-point messages: gloo on CPU, NCCL between GPUs. Every stage follows
the same stream, so every send has its receive, and no op waits on one a later call brings;
sends are non-blocking (a stage sending up while its neighbour sends down cannot deadlock),
receives block with the process group's deadline.

`sync` closes the stream at every step (one apply at its end: one process's weights). `async`
keeps it open across steps, as the stream engine does: learns apply as they come, the window
stays full across step ends, and the signals of a step's last micro-batches reach the stages
below in the next call; a flush closes it.

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

from driver.pipeline.schedule import APPLY, FORWARD, Stream, fuse_top
from workers.chain import learns_chained, learns_decoupled
from workers.rules import ErrorSignal
from workers.spec import StageSpec, StageStats
from workers.stage import Stage


class P2PStage(Stage):
    """A Stage (blocks, rule, optimizer, state) that trains a whole step per call."""

    def __init__(self, spec: StageSpec, stages: int, window: int, sync: bool = True) -> None:
        super().__init__(spec)
        self.k, self.window, self.sync = stages, window, sync
        self.s = spec.index
        # decoupled: every stage learns from its own head on the labels, nothing comes down
        self.decoupled = learns_decoupled(spec)
        self.broadcast = not learns_chained(spec) and not self.decoupled
        self.comm = torch.device("cpu")  # where messages live (join() sets it per backend)
        self._sends: list[Any] = []  # in-flight sends, with their buffers
        self._out_shape: dict[int, tuple[int, ...]] = {}  # micro-batch -> this stage's output
        self._stream: Stream
        self._forgotten: int
        self._sizes: dict[int, int]  # per micro-batch: its size, input (stage 0), labels (top)
        self._inputs: dict[int, torch.Tensor]
        self._labels: dict[int, torch.Tensor]
        self._cut_at: int | None = None  # a checkpoint cut being taken, at this position
        self._cut_state: dict[str, Any] | None = None  # taken, not yet returned
        self._restart()

    # -- set-up ---------------------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it (stage 0 hosts the group's store)."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int, backend: str, timeout_s: float) -> bool:
        # nccl sends from the GPU; gloo from host memory (a GPU stage's tensors go through it)
        self.comm = torch.device("cuda" if backend == "nccl" else "cpu")
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
        # activations and signals travel in act_dtype (bf16 under train.precision = "bf16")
        out = torch.empty(shape, dtype=dtype or self.act_dtype, device=self.comm)
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
        self,
        xs: list[torch.Tensor] | None,
        labels: list[torch.Tensor] | None,
        sizes: list[int],
        close: bool = True,
        cut: int | None = None,
    ) -> tuple[list[torch.Tensor], StageStats, dict[str, Any] | None]:
        """Feed micro-batches of `sizes` samples to this stage's stream and run every op of it
        the stream allows now, in this stage's order (`schedule.Stream`, the same order the
        stream engine submits). `xs`: the inputs (stage 0); `labels`: the labels (the top).
        `close`: end the stream (sync: every step; async: a flush) and apply what is pending.
        `cut`: take this stage's checkpoint state at stream position `cut` (driver/pipeline/
        cut.py: forward-side state as of its forward of micro-batch `cut`, the rest as of its
        learn of `cut` - 1), in this call or a later one. Returns the logits the top computed
        in this call, in micro-batch order, the stats, and the cut's state once taken."""
        stream = self._stream
        if cut is not None:
            self._arm(cut)
        first = stream.available
        self._sizes.update(enumerate(sizes, start=first))
        if xs is not None:
            self._inputs.update(enumerate(xs, start=first))
        if labels is not None:
            self._labels.update(enumerate(labels, start=first))
        stream.available += len(sizes)
        stream.closed = close
        ops = [op for op in stream.ready() if op.stage == self.s]
        if self.s == self.k - 1:  # decoupled: window 1, each learn already follows its forward
            ops = fuse_top(ops)
        for mb in range(self._forgotten, min(seq.next_l for seq in stream.seqs)):
            stream.forget(mb)  # every stage's learn of mb is in some call by now
            self._forgotten = mb + 1
        logits: list[torch.Tensor] = []
        for op in ops:
            if op.kind == FORWARD:
                self._forward_op(op.mb, logits)
            elif op.kind == APPLY:
                self.apply()
            else:
                self._learn_op(op.mb)
        if close:
            if not self.sync:
                self.apply_pending()
            assert stream.finished(), "the stage's stream did not drain"
            self._restart()
        self._settle(wait=close)
        taken, self._cut_state = self._cut_state, None
        return logits, self.pop_stats(), taken

    def _arm(self, n: int) -> None:
        """Take the cut at position n (all fed so far): hold the forward-side state now (each
        call forwards everything it was fed: an open stream only stops for data, which
        tests/test_schedule.py checks), and take the state now if every learn before n is done,
        else right after this stage's learn of n - 1."""
        seq = self._stream.seqs[self.s]
        assert seq.next_f == n, f"stage {self.s}: a cut at {n} after {seq.next_f} forwards"
        self._cut_at = n
        self.mark()
        learned = seq.next_f if self.s == self.k - 1 else seq.next_l  # the top: at its forward
        if learned == n:
            self._take_cut()

    def _take_cut(self) -> None:
        self._cut_state = self.state_dict(marked=True)
        self._cut_at = None

    def _restart(self) -> None:
        """A new stream: the next micro-batch is number 0 (every stage restarts at a close)."""
        self._stream = Stream(
            self.k,
            self.window,
            chained=not (self.broadcast or self.decoupled),
            sync=self.sync,
            decoupled=self.decoupled,
        )
        self._forgotten = 0  # micro-batches below this are dropped from the stream
        self._sizes = {}
        self._inputs = {}
        self._labels = {}

    def _settle(self, *, wait: bool) -> None:
        """Drop completed sends; with `wait`, wait for all (a closed stream: the receivers take
        them in this call). An open async stream keeps some in flight into the next call."""
        if wait:
            for work, _ in self._sends:
                work.wait()
            self._sends.clear()
        else:
            self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]

    def _forward_op(self, mb: int, logits: list[torch.Tensor]) -> None:
        shape = (self._sizes[mb], *self.block_list[0].in_shape)
        x = self._inputs.pop(mb) if self.s == 0 else self._take(self.s - 1, shape)
        out = self.forward(mb, x)
        self._out_shape[mb] = tuple(out.shape)
        if self.s < self.k - 1:
            self._post(out, self.s + 1)
        else:
            logits.append(out.cpu())

    def _learn_op(self, mb: int) -> None:
        top = self.s == self.k - 1
        if top or self.decoupled:
            signal = ErrorSignal(labels=self._labels.pop(mb))
        else:
            signal = self._take_signal(self.k - 1 if self.broadcast else self.s + 1, mb)
        sent = self.learn(mb, signal, apply=not self.sync)
        self._out_shape.pop(mb, None)
        self._sizes.pop(mb, None)
        if self._cut_at is not None and mb == self._cut_at - 1:
            self._take_cut()
        if top and self.broadcast:
            for dst in range(self.k - 1):
                self._post_signal(sent, dst)
        elif not (self.broadcast or self.decoupled) and self.s > 0:
            self._post_signal(sent, self.s - 1)
