"""Stage: a plain class owning a contiguous group of blocks, their synapses and optimizer state."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.allocator import keep_freed_memory
from workers.assemble import (
    block_units,
    build_aux,
    build_blocks,
    kp_pairs,
    named_parameters,
    trainable,
)
from workers.blocks import Block, BlockCache
from workers.compiled import compile_stage
from workers.diagnostics import BackpropProbe, synapse_angles
from workers.held import SavedBytes, cache_bytes
from workers.mirror import mirror
from workers.optim import build_optimizer, reproject_, set_lr
from workers.rules import ErrorSignal, make_rule, rule_chained
from workers.spec import DTYPES, PRECISIONS, NonFiniteError, StageSpec, StageStats
from workers.state import load_stage_state, stage_state, unit_buffers, with_buffers
from workers.sweep import sweep_stage


class Stage:
    """Owns blocks [first, last): forward (caching per micro-batch), learn, apply, state.

    The same class runs in-process (tests, K = 1) and as a Ray actor (the pipeline).
    """

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.rule = make_rule(spec.rule)
        self.chained = rule_chained(spec.rule)  # sends the boundary down to the stage below
        self.dtype = DTYPES[spec.dtype]  # master weights, error synapses, optimizer state
        # train.precision: forward maps, errors and carries under autocast in this dtype
        self.precision = PRECISIONS[spec.precision]
        # activations, errors and what goes between stages (the top's logits go in self.dtype)
        self.act_dtype = self.precision or self.dtype
        self.device = torch.device(spec.device)
        self.blocks, self.is_first, self.is_last = build_blocks(spec, self.rule)
        self.trunk: list[Block] = list(self.blocks)  # type: ignore[arg-type]
        # decoupled (below the top): an auxiliary head, and a decoder, on the trunk's output
        self.aux = build_aux(spec, self.rule, self.trunk, self.is_last)
        if self.aux is not None:
            self.blocks.extend([*self.aux.head, *self.aux.recon])
        self.block_list: list[Block] = list(self.blocks)  # type: ignore[arg-type]
        # auxiliary heads and error synapses a resume found no state for (load_state_dict)
        self.started_fresh: list[str] = []
        forward, feedback = trainable(self.blocks)
        self.optimizer = build_optimizer(
            spec.optim, forward, feedback, feedback_rate=spec.rule.gamma
        )
        self._noise = torch.Generator().manual_seed(spec.seed * 7919 + 17)
        self._started = False  # the first forward has run (the mirror phase is due before it)
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        if spec.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self._training = False
        self._last_end: float | None = None
        self._cache: dict[Any, Any] = {}
        self._losses: dict[str, torch.Tensor] = {}
        self._samples = 0  # learned since the last apply
        self._learns = 0  # learns since the last apply
        self._named_params = named_parameters(self.units())
        self._kp = kp_pairs(self.block_list)  # (E, W): E takes W's final update
        self.step = 0  # optimizer steps taken
        self.progress = 0.0  # training steps covered by them: the lr schedule's position
        self.stats = StageStats()
        self._probe = BackpropProbe(self.trunk) if spec.diagnose_every > 0 else None
        self._cached_bytes = 0  # held now between forwards and their learns
        self._mark: tuple[dict, torch.Tensor] | None = None  # forward-side state held by mark()
        # train.compile: the trunk's forward maps, compiled (None: eager)
        self._compiled = compile_stage(self.trunk, self.rule, spec) if spec.compile else None

    def _autocast(self) -> AbstractContextManager:
        """train.precision's autocast for forward maps, errors and carries (none in float32)."""
        if self.precision is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def units(self) -> dict[str, nn.Module]:
        """Every learnable unit by its model-wide name: layers and skip synapses."""
        return block_units(self.block_list)

    # -- the three verbs ------------------------------------------------------------------------
    def forward(self, mb: Any, x: torch.Tensor) -> torch.Tensor:
        """Train-mode forward of micro-batch `mb`; keeps what learn needs until learn(mb)."""
        if len(self._cache) >= self.spec.max_cached:
            raise RuntimeError(
                f"stage {self.spec.index}: {len(self._cache)} micro-batches cached without learn; "
                "raise pipeline.max_in_flight or call learn for each forward"
            )
        if not self._started:
            self._start()
        t0 = self._begin(x)
        if not self._training:
            self.blocks.train()
            self._training = True
        if self.is_first and self.spec.rule.input_noise > 0:
            x = x.to(self.device, self.dtype)
            noise = torch.randn(x.shape, generator=self._noise, dtype=x.dtype)
            x = x + self.spec.rule.input_noise * noise.to(self.device)
        x = x.to(self.device, self.act_dtype)
        with self._autocast():
            out, cached, held = self._forward_train(x)
        self._cache[mb] = (self.step, cached, held)
        self._cached_bytes += held
        self.stats.cached_bytes = max(self.stats.cached_bytes, self._cached_bytes)
        self.stats.forward_seconds += self._end() - t0
        return self._send(out, logits=self.is_last)

    def _forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, int]:
        """The trunk's (and auxiliary blocks') train-mode forward: (output, what learn needs,
        the bytes that holds)."""
        compiled = self._compiled
        if self.rule.autograd:
            x_in = x.detach().requires_grad_(not self.is_first)
            saved = SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                if compiled is not None:
                    out = compiled.forward(x_in)
                else:
                    out = x_in
                    for block in self.trunk:
                        out = block(out, self.rule.layer_map)  # type: ignore[attr-defined]
            return out, (x_in, out), cache_bytes([x_in, out], saved)
        caches: list[BlockCache] = []
        if compiled is not None:
            out, caches = compiled.forward_local(x)
        else:
            out = x
            for block in self.trunk:
                out, cache = block.forward_local(out)
                caches.append(cache)
        if self.aux is not None:
            for chain in (self.aux.head, self.aux.recon):
                z = out
                for block in chain:
                    z, cache = block.forward_local(z)
                    caches.append(cache)
        return out, caches, cache_bytes(caches)

    def _start(self) -> None:
        """Before the first training forward of a fresh stage: the weight-mirror phase, and the
        angles between E and W that training starts from (stats.start_angle)."""
        self._started = True
        if self.step > 0:  # resumed: its synapses come from the checkpoint
            return
        rule = self.spec.rule
        if rule.mirror_angle > 0:
            t0 = time.perf_counter()
            mirror(self.block_list, rule.mirror_angle, self.spec.seed, 0)
            spent = time.perf_counter() - t0
            self.stats.mirror_seconds += spent
            if self._last_end is not None:  # not idle: counted as mirror time
                self._last_end += spent
        self.stats.start_angle = synapse_angles(self.block_list)

    def forward_learn(
        self, mb: Any, x: torch.Tensor, signal: ErrorSignal, *, apply: bool = False
    ) -> tuple[torch.Tensor, ErrorSignal]:
        """forward then learn of the same micro-batch in one call (the last stage, which holds
        the labels, needs nothing else in between)."""
        out = self.forward(mb, x)
        return out, self.learn(mb, signal, apply=apply)

    def _send(self, t: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
        """`t` as it leaves the stage: in act_dtype (bf16 under train.precision = "bf16": half
        the bytes between stages), or in the weights' dtype for `logits` (the model's output)."""
        t = t.detach()
        dtype = self.dtype if logits else self.act_dtype
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.cpu() if self.spec.send_to_cpu else t

    def _begin(self, *received: torch.Tensor | None) -> float:
        t0 = time.perf_counter()
        if self._last_end is not None:
            self.stats.idle_seconds += t0 - self._last_end
        self.stats.bytes_received += sum(
            t.numel() * t.element_size() for t in received if t is not None
        )
        return t0

    def _end(self) -> float:
        self._last_end = time.perf_counter()
        return self._last_end

    def learn(self, mb: Any, signal: ErrorSignal, *, apply: bool = False) -> ErrorSignal:
        """Learn micro-batch `mb` from its error signal. Updates are summed over samples until
        apply(), which takes their mean: K micro-batches then one apply equal one big batch.
        With `apply`, the update is applied at once (the async schedule)."""
        t0 = self._begin(signal.output_error, signal.boundary)
        if mb not in self._cache:
            raise KeyError(f"stage {self.spec.index}: learn({mb!r}) without a forward for it")
        forward_step, cached, held = self._cache.pop(mb)
        self._cached_bytes -= held
        self.stats.staleness.append(self.step - forward_step)
        e_out = signal.output_error
        if self.is_last or self.aux is not None:
            if signal.labels is None:
                who = "the last stage" if self.is_last else "a decoupled stage"
                raise ValueError(f"stage {self.spec.index}: {who} needs labels to learn")
            if self.rule.autograd:
                logits = cached[1]
            else:
                logits = cached[-1 if self.aux is None else self._head_end - 1].z[-1]
            labels = signal.labels.to(self.device)
            probs = torch.softmax(logits.detach().to(self.dtype), dim=1)  # bf16: in float32
            e_out = probs - F.one_hot(labels, logits.shape[1]).to(probs.dtype)
        if e_out is None:
            raise ValueError(f"stage {self.spec.index}: no output error in the signal")
        e_out = e_out.to(self.device, self.act_dtype)
        boundary = signal.boundary
        if boundary is not None:
            boundary = boundary.to(self.device, self.act_dtype)
        if self.rule.autograd:  # the backward runs outside autocast, in the forward's dtypes
            boundary = self._learn_autograd(cached, labels if self.is_last else None, boundary)
        else:
            with self._autocast():
                if self.aux is not None:  # the trunk's top learns from the auxiliary blocks
                    boundary = self._learn_aux(cached, e_out)
                boundary = sweep_stage(
                    self.trunk,
                    cached[: len(self.trunk)],
                    self.rule,
                    d_out=boundary,
                    e_out=e_out,
                    losses=self._losses,
                )
        self._check_finite("error", e_out)
        true_grad = self._diagnose(cached, signal)
        self.stats.micro_batches += 1
        self._samples += e_out.shape[0]
        self._learns += 1
        if apply and self._learns >= self.spec.apply_every:
            self._apply(self._learns * self.spec.learn_fraction)
        self.stats.learn_seconds += self._end() - t0
        if self.aux is not None:
            return ErrorSignal()  # nothing goes down a decoupled stage's boundary
        send = boundary if (self.chained and not self.is_first) else None
        return ErrorSignal(
            output_error=self._send(e_out),
            boundary=None if send is None else self._send(send),
            true_grad=None if true_grad is None else self._send(true_grad),
        )

    @property
    def _head_end(self) -> int:
        """Where the auxiliary head's caches end (the decoder's begin)."""
        assert self.aux is not None
        return len(self.trunk) + len(self.aux.head)

    def _learn_aux(self, cached: list[BlockCache], e_head: torch.Tensor) -> torch.Tensor:
        """Learn the auxiliary head from its error (and the decoder from its reconstruction
        error); return the displacement they carry to the trunk's output."""
        assert self.aux is not None
        n, end = len(self.trunk), self._head_end
        d = sweep_stage(
            self.aux.head, cached[n:end], self.rule, d_out=None, e_out=e_head, losses=self._losses
        )
        if self.aux.recon:
            recon = cached[-1].z[-1]
            x = cached[0].input
            target = (
                F.adaptive_avg_pool2d(x, (recon.shape[2], recon.shape[3]))
                if recon.dim() == 4
                else x.flatten(1)
            )
            # the gradient of aux_recon * mean((recon - target)^2) / 2 per sample
            e_rec = (recon - target).mul_(self.spec.rule.aux_recon / recon[0].numel())
            d_rec = sweep_stage(
                self.aux.recon,
                cached[end:],
                self.rule,
                d_out=None,
                e_out=e_rec,
                losses=self._losses,
            )
            assert d_rec is not None and d is not None
            d = d + d_rec
        assert d is not None
        return d

    def _diagnose(self, cached: Any, signal: ErrorSignal) -> torch.Tensor | None:
        """The side backprop pass of diagnostics: the last stage starts it every
        `diagnose_every` steps; a stage below follows whenever the gradient arrives."""
        if self._probe is None:
            return None
        if self.is_last:
            if self.step % self.spec.diagnose_every:
                return None
        elif signal.true_grad is None:
            return None
        x = cached[0] if self.rule.autograd else cached[0].input
        x = x.to(self.dtype)  # the probe is backprop in the weights' dtype, never autocast
        return self._probe.run(
            x,
            labels=signal.labels.to(self.device) if self.is_last else None,  # type: ignore[union-attr]
            grad_out=signal.true_grad,
            needs_input_grad=not self.is_first,
        )

    def _learn_autograd(
        self, cached: tuple, labels: torch.Tensor | None, grad: torch.Tensor | None
    ) -> torch.Tensor | None:
        x_in, out = cached
        if labels is not None:  # the loss in the weights' dtype (bf16 logits cast up)
            loss = F.cross_entropy(out.to(self.dtype), labels, reduction="sum")
            self._losses["head.loss"] = loss.detach() / out.shape[0]
            loss.backward()
        else:
            if grad is None:
                raise ValueError(f"stage {self.spec.index}: backprop needs the boundary gradient")
            out.backward(grad.to(out.dtype))
        return x_in.grad

    def apply(self) -> dict[str, float]:
        """Re-project, check and apply the updates accumulated over one training step."""
        return self._apply(1.0)

    def apply_pending(self) -> dict[str, float]:
        """Apply what learns since the last apply accumulated (the end of an async stream)."""
        return self._apply(self._learns * self.spec.learn_fraction) if self._learns else {}

    def _apply(self, covered: float) -> dict[str, float]:
        """One optimizer step over `covered` training steps' worth of learns (the lr schedule
        moves by as much)."""
        owners = [o for o, p in self._named_params if p.grad is not None]
        grads = [p.grad for _, p in self._named_params if p.grad is not None]
        if grads and self._samples:
            torch._foreach_mul_(grads, 1.0 / self._samples)  # sums over samples -> means
        self._samples = 0
        if self._probe is not None and self._probe.grads:
            self.stats.backprop_cosine = self._probe.cosines()
        norms = reproject_(grads, self.spec.rule.reproject)
        if not torch.isfinite(norms).all():
            bad = next(o for o, g in zip(owners, grads, strict=True) if not torch.isfinite(g).all())
            raise NonFiniteError(
                f"stage {self.spec.index}: non-finite update of {bad} at step {self.step}; "
                "lower optim.lr or rule.beta, or set rule.reproject"
            )
        for feedback, weight in self._kp:  # KP: E takes its layer's final update (lr: gamma)
            if weight.grad is not None and feedback is not None:
                feedback.grad = weight.grad  # shared, and only read from here on
        set_lr(self.optimizer, self.spec.optim, self.progress)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        rule = self.spec.rule
        if rule.mirror_every and self.step % rule.mirror_every == 0:
            t0 = time.perf_counter()
            mirror(self.block_list, rule.mirror_angle, self.spec.seed, self.step, rule.mirror_rate)
            self.stats.mirror_seconds += time.perf_counter() - t0
        self.progress += covered
        self._learns = 0
        per_unit: dict[str, float] = {}
        if owners:
            for owner, v in zip(owners, norms.pow(2).tolist(), strict=True):
                unit = owner.rsplit(".", 1)[0].removesuffix(".bn")
                per_unit[unit] = per_unit.get(unit, 0.0) + v
        self.stats.update_norm = {k: v**0.5 for k, v in per_unit.items()}
        self.stats.local_loss.update({k: float(v) for k, v in self._losses.items()})
        self._losses.clear()
        return self.stats.update_norm

    def _check_finite(self, what: str, t: torch.Tensor) -> None:
        if not torch.isfinite(t).all():
            raise NonFiniteError(
                f"stage {self.spec.index}: non-finite {what} at step {self.step}; "
                "lower optim.lr or rule.beta, or set rule.reproject"
            )

    def mark(self) -> None:
        """Hold what forwards change (BN statistics, the input noise RNG) as it is now."""
        self._mark = (unit_buffers(self.units()), self._noise.get_state())

    def state_dict(self, *, marked: bool = False) -> dict[str, Any]:
        """Units keyed by model-wide layer name, plus the stage's step and noise RNG; `marked`:
        what forwards change as of the last mark() (a checkpoint cut, driver/pipeline/cut.py)."""
        units, noise = stage_state(self.units(), self.optimizer), self._noise.get_state()
        if marked and self._mark is not None:
            (buffers, noise), self._mark = self._mark, None
            with_buffers(units, buffers)
        return {"units": units, "step": self.step, "progress": self.progress, "noise_rng": noise}

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Load this stage's units from `state`. Where the rule sends nothing below a stage
        (decoupled, skip, stage), a stage's bottom layer has no error synapse, so a checkpoint
        cut elsewhere can lack a synapse this stage has, or lack an auxiliary head (decoupled:
        a boundary the checkpoint did not have). Those start fresh, from their initialisation
        and a weight mirror, and are named once in the next stats; the blocks' weights load."""
        units = self.units()
        fresh = sorted(n for n in units if n.startswith("aux.") and n not in state["units"])
        left = load_stage_state(
            {n: u for n, u in units.items() if n not in fresh},
            self.optimizer,
            state["units"],
            strict=strict,
            cut_free=not self.chained,
        )
        if (fresh or left) and self.spec.rule.mirror_angle > 0:
            angle, seed = self.spec.rule.mirror_angle, self.spec.seed
            mirror(self.block_list, angle, seed, 0, only={*fresh, *left})
        self.started_fresh = sorted({n.rsplit(".", 2)[0] for n in fresh} | set(left))
        self.step = int(state.get("step", 0))
        self.progress = float(state.get("progress", self.step))
        if self.is_first and "noise_rng" in state:
            self._noise.set_state(state["noise_rng"])

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode forward, no caching (under train.precision's autocast, as training)."""
        return self._send(self._infer(x), logits=self.is_last)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        self.blocks.eval()
        self._training = False
        out = x.to(self.device, self.act_dtype)
        with self._autocast():
            for block in self.trunk:
                out = block(out)
        return out

    @torch.no_grad()
    def infer_exit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval-mode forward, and the stage's early-exit logits: its auxiliary head's (the
        output itself at the top; None for a stage with no head)."""
        out = self._infer(x)
        logits: torch.Tensor | None = out if self.is_last else None
        if self.aux is not None:
            logits = out
            with self._autocast():
                for block in self.aux.head:
                    logits = block(logits)
        exit_logits = None if logits is None else self._send(logits, logits=True)
        return self._send(out, logits=self.is_last), exit_logits

    def pop_stats(self) -> StageStats:
        """The stats since the last call, and a fresh window."""
        stats, self.stats = self.stats, StageStats(cached_bytes=self._cached_bytes)
        stats.cached = len(self._cache)
        if self.started_fresh:
            stats.started_fresh, self.started_fresh = self.started_fresh, []
        stats.synapse_angle = synapse_angles(self.block_list)
        self._last_end = time.perf_counter()
        return stats

    def ping(self) -> bool:
        """True: the stage exists and answers (readiness checks)."""
        return True

    def drop_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    @property
    def cached(self) -> int:
        return len(self._cache)
