"""The top-down target sweep through one block: errors, local updates, displacements below."""

from __future__ import annotations

import torch

from workers.blocks import Block, BlockCache
from workers.rules.base import Rule


def accumulate(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)


def _add(slot: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if slot is None else slot + value


def sweep_block(
    block: Block, cache: BlockCache, rule: Rule, *, d_out: torch.Tensor | None,
    e_out: torch.Tensor, scale: float, losses: dict[str, float],
) -> torch.Tensor | None:
    """Learn one block from its output displacement (or e_L for the head); return the
    displacement at the block input (None when the rule sends nothing down from here).

    Gradients (batch-summed local updates times `scale`) accumulate in each parameter's .grad.
    Every tensor used here is this block's own cache, e_L, or the displacement handed to it.
    """
    n_nodes = len(block.acts)
    d: list[torch.Tensor | None] = [None] * n_nodes
    d_in: torch.Tensor | None = None
    if d_out is not None and not block.head:
        d[block.out_node] = block.unpool(d_out, cache)
    for n in reversed(range(n_nodes)):
        if block.head:
            e = e_out
        else:
            d_n = _node_displacement(block, n, d[n], cache, rule, e_out, scale)
            e = rule.node_error(cache.h[n], cache.z[n], d_n, block.acts[n], rule.mix(block, n))
        losses[f"{block.name}.node{n}"] = 0.5 * float(e.detach().pow(2).sum()) / e.shape[0]
        for wire in block.wires:
            if wire.tgt != n:
                continue
            layer = block.layers[wire.layer]
            params = [p for p in layer.parameters() if p.requires_grad and p is not layer.feedback]
            grads = torch.autograd.grad(cache.layer_out[wire.layer], params, e * scale)
            for p, g in zip(params, grads, strict=True):
                accumulate(p, g)
            mode = rule.feedback_mode(block, wire)
            if mode is None:
                continue
            src = cache.input if wire.src < 0 else cache.z[wire.src]
            carried = layer.carry(e, src.shape)
            if mode == "kp":
                accumulate(layer.feedback, rule.cfg.gamma * grads[0])
            elif mode == "local":
                accumulate(layer.feedback, -rule.cfg.gamma * scale * layer.weight_grad(carried, e))
            if wire.src < 0:
                d_in = _add(d_in, carried)
            else:
                d[wire.src] = _add(d[wire.src], carried)
        if rule.uses_identity():
            for s, t in block.identity:
                if t == n:
                    if s < 0:
                        d_in = _add(d_in, e)
                    else:
                        d[s] = _add(d[s], e)
    return d_in


def _node_displacement(
    block: Block, n: int, d_adjacent: torch.Tensor | None, cache: BlockCache, rule: Rule,
    e_out: torch.Tensor, scale: float,
) -> torch.Tensor:
    mode = rule.skip_mode(block, n)
    if mode is None:
        return torch.zeros_like(cache.z[n]) if d_adjacent is None else d_adjacent
    synapse = block.skips[str(n)]
    d_n = synapse(e_out)
    if mode == "corr":
        accumulate(synapse.weight, -rule.cfg.gamma * scale * synapse.correlate(e_out, cache.z[n]))
    elif mode == "local":
        accumulate(synapse.weight, -rule.cfg.gamma * scale * synapse.correlate(e_out, d_n))
    return d_n
