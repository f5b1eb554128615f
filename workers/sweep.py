"""The top-down target sweep through one block: errors, local updates, displacements below."""

from __future__ import annotations

import torch

from workers.blocks import Block, BlockCache
from workers.layers import Layer
from workers.rules.base import Rule


def accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)


def _add(slot: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if slot is None else slot + value


def sweep_stage(
    blocks: list[Block],
    caches: list[BlockCache],
    rule: Rule,
    *,
    d_out: torch.Tensor | None,
    e_out: torch.Tensor,
    losses: dict[str, torch.Tensor],
) -> torch.Tensor | None:
    """Learn a stage's blocks, top first, from the displacement at its output (None at the
    head, which starts from e_L); return the displacement at the stage input. The layers'
    updates come from one backward over every (output, error) pair the blocks collect."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for block, cache in zip(reversed(blocks), reversed(caches), strict=True):
        d_out = sweep_block(
            block, cache, rule, d_out=d_out, e_out=e_out, losses=losses, pairs=pairs
        )
    if pairs:
        outs, errs = zip(*pairs, strict=True)
        torch.autograd.backward(outs, errs)
    return d_out


def sweep_block(
    block: Block,
    cache: BlockCache,
    rule: Rule,
    *,
    d_out: torch.Tensor | None,
    e_out: torch.Tensor,
    losses: dict[str, torch.Tensor],
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor | None:
    """Learn one block from its output displacement (or e_L for the head); return the
    displacement at the block input (None when the rule sends nothing down from here).

    Updates are batch-summed (the stage divides by the samples at apply). Each layer's update is
    the correlation of its own input with its node's error: the pair (layer output, error) is
    appended to `pairs`, and the caller runs one backward over all pairs (each layer's graph
    starts at its detached input, so nothing crosses layers). Skip synapses and `local` error
    synapses accumulate in .grad directly; `kp` error synapses copy their layer's update at
    apply time; gamma is the error synapses' own learning rate (their optimizer group). Every
    tensor used here is this block's own cache, e_L, or the displacement handed to it.
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
            d_n = _node_displacement(block, n, d[n], cache, rule, e_out)
            e = rule.node_error(cache.h[n], cache.z[n], d_n, block.acts[n], rule.mix(block, n))
        losses[f"{block.name}.node{n}"] = torch.linalg.vector_norm(e.detach()) ** 2 * (
            0.5 / e.shape[0]
        )
        for wire in block.wires_into[n]:
            layer = block.layer(wire.layer)
            mode = layer.feedback_mode
            e_lin = _learn_layer(layer, cache, wire.layer, e, pairs, rule.cfg.carry_bn and mode)
            if mode is None:
                continue
            src = cache.input if wire.src < 0 else cache.z[wire.src]
            carried = layer.carry(e_lin, src)
            if mode == "local":
                assert layer.feedback is not None
                accumulate(layer.feedback, layer.weight_grad(carried, e_lin).neg_())
            if wire.src < 0:
                d_in = _add(d_in, carried)
            else:
                d[wire.src] = _add(d[wire.src], carried)
        if rule.uses_identity():
            for s in block.identity_into[n]:
                if s < 0:
                    d_in = _add(d_in, e)
                else:
                    d[s] = _add(d[s], e)
    return d_in


def _learn_layer(
    layer: Layer,
    cache: BlockCache,
    name: str,
    e: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    through_bn: bool | str | None,
) -> torch.Tensor:
    """Queue the layer's update (the correlation of its input with `e`) and return the error
    its synapse carries down: `e` itself, or, `through_bn`, `e` sent back through the layer's
    own BatchNorm batch Jacobian to W z. That one BatchNorm backward also gives BN's update,
    and the pair queued is then (W z, error at W z)."""
    out, lin = cache.layer_out[name], cache.layer_lin.get(name)
    if not through_bn or lin is None or layer.bn is None:
        if out.requires_grad:  # a frozen layer has nothing to learn
            pairs.append((out, e))
        return e
    bn = layer.bn
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    affine = [p for p in (bn.weight, bn.bias) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(out, [lin, *affine], e)
    for p, g in zip(affine, grads[1:], strict=True):
        accumulate(p, g)
    pairs.append((lin, grads[0]))  # forward weights always learn
    return grads[0]


def _node_displacement(
    block: Block,
    n: int,
    d_adjacent: torch.Tensor | None,
    cache: BlockCache,
    rule: Rule,
    e_out: torch.Tensor,
) -> torch.Tensor:
    mode = rule.skip_mode(block, n)
    if mode is None:
        return torch.zeros_like(cache.z[n]) if d_adjacent is None else d_adjacent
    synapse = block.skip(n)
    d_n = synapse(e_out)
    if mode == "kp":  # direct KP: for the last junction, exactly KP on the head
        accumulate(synapse.weight, synapse.pullback(e_out, cache.z[n]))
    elif mode == "local":
        accumulate(synapse.weight, synapse.pullback(e_out, d_n).neg_())
    return d_n
