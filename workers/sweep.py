"""The top-down target sweep through one block: errors, local updates, displacements below."""

from __future__ import annotations

import torch

from workers.blocks import Block, BlockCache
from workers.layers import Layer
from workers.rules.base import Rule


def accumulate(param: torch.Tensor, grad: torch.Tensor, *, owned: bool = False) -> None:
    """Add `grad` to param.grad; `owned`: nobody else holds `grad`, so it may become .grad.
    A bf16 update (train.precision) is accumulated in the parameter's own dtype (float32)."""
    if grad.dtype != param.dtype:
        grad, owned = grad.to(param.dtype), True
    if param.grad is None:
        param.grad = grad.detach() if owned else grad.detach().clone()
    else:
        param.grad.add_(grad)


def _stat(e: torch.Tensor) -> torch.Tensor:
    """`e` as a statistic is taken: in float32 at least (a bf16 error's norm is summed in it)."""
    return e.detach().to(torch.promote_types(e.dtype, torch.float32))


def _add(slot: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if slot is None else slot + value


@torch.no_grad()
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
    head, which starts from e_L); return the displacement at the stage input. Nothing here
    builds a graph: each layer's backward is an explicit kernel on its own cache."""
    for block, cache in zip(reversed(blocks), reversed(caches), strict=True):
        d_out = sweep_block(block, cache, rule, d_out=d_out, e_out=e_out, losses=losses)
    return d_out


def sweep_block(
    block: Block,
    cache: BlockCache,
    rule: Rule,
    *,
    d_out: torch.Tensor | None,
    e_out: torch.Tensor,
    losses: dict[str, torch.Tensor],
) -> torch.Tensor | None:
    """Learn one block from its output displacement (or e_L for the head); return the
    displacement at the block input (None when the rule sends nothing down from here).

    Updates are batch-summed (the stage divides by the samples at apply). Each layer's update is
    the correlation of its own input with its node's error (after its own BatchNorm's batch
    Jacobian, where it has one), taken with the same kernel call that carries the error down
    through its error synapse (Layer.update_and_carry). Skip synapses and `local` error
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
            e = _node_error(rule, cache.h[n], cache.z[n], d_n, block.acts[n], rule.mix(block, n))
        losses[f"{block.name}.node{n}"] = torch.linalg.vector_norm(_stat(e)) ** 2 * (
            0.5 / e.shape[0]
        )
        for wire in block.wires_into[n]:
            layer = block.layer(wire.layer)
            mode = layer.feedback_mode
            src = cache.input if wire.src < 0 else cache.z[wire.src]
            carried, e_lin = _learn_layer(
                layer, cache, wire.layer, src, e, carry=mode is not None, carry_bn=rule.cfg.carry_bn
            )
            if carried is None:
                continue
            if mode == "local":
                assert layer.feedback is not None
                accumulate(layer.feedback, layer.weight_grad(carried, e_lin).neg_(), owned=True)
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


def _node_error(
    rule: Rule, h: torch.Tensor, z: torch.Tensor, d: torch.Tensor, act: str, mix: float
) -> torch.Tensor:
    """rule.node_error; with 16-bit activations (train.precision = "bf16") computed in float32
    from them and stored back in their dtype. In bf16 the target's finite difference would
    cancel: beta * d is far below h's last bit (8 bits of mantissa), so h - beta * d rounds to
    h and e = (z - y) / beta to zero. From the bf16 h, z and d in float32 it is exact."""
    if h.dtype.itemsize >= 4:
        return rule.node_error(h, z, d, act, mix)
    wide = torch.float32
    return rule.node_error(h.to(wide), z.to(wide), d.to(wide), act, mix).to(h.dtype)


def _learn_layer(
    layer: Layer,
    cache: BlockCache,
    name: str,
    src: torch.Tensor,
    e: torch.Tensor,
    *,
    carry: bool,
    carry_bn: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Accumulate the layer's update from its input `src` and its node's error `e`; return the
    error its synapse carries down (None unless `carry`) and the error it carried. With BatchNorm,
    `e` first goes back through the layer's own batch Jacobian to W z (that one BN backward
    also gives BN's affine updates); the carried error is then that one, or, without
    `carry_bn`, `e` itself."""
    e_lin = e
    saved = cache.bn_saved.get(name)
    if saved is not None:
        bn = layer.bn
        assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
        e_lin, g_scale, g_shift = layer.post_backward(saved, e)
        for p, g in ((bn.weight, g_scale), (bn.bias, g_shift)):
            if g is not None and p is not None:
                accumulate(p, g, owned=True)
    elif layer.bias is not None and layer.bias.requires_grad:
        accumulate(layer.bias, layer.bias_grad(e), owned=True)
    through = e_lin if (carry_bn or saved is None) else None
    feedback = layer.feedback if carry and through is not None else None
    grad, carried = layer.update_and_carry(src, e_lin, feedback)
    if layer.weight.requires_grad:  # a frozen layer has nothing to learn
        accumulate(layer.weight, grad, owned=True)
    if carry and carried is None:  # E carries the post-BatchNorm error (carry_bn off)
        carried = layer.carry(e, src)
    return carried, e if through is None else through


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
