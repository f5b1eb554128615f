"""Kolen-Pollack (Akrout et al. 2019, "Deep learning without weight transport"): backprop's chain
with each layer's W^T replaced by a learned error synapse E, which takes W's own update and decay.

The chain is FA's (stage-local autograd, exact act' and BatchNorm backward, the boundary gradient
passed between stages); only how E learns differs. E is never differentiated: the Stage hands it
its layer's final update at apply (E.grad = W.grad), in its own optimizer group with learning rate
rule.gamma * lr and a weight decay scaled so that E and W shrink by the same fraction per step.
Then E - gamma * W decays by (1 - lr * weight_decay) every step, whatever the data: E converges
to gamma * W from wherever rule.kp_init starts it (Akrout et al. start it at random).
"""

from __future__ import annotations

from workers.blocks import Block, Wire
from workers.rules.base import register
from workers.rules.fa import FA


@register
class KP(FA):
    """FA whose error synapses learn by Kolen-Pollack; needs weight decay to converge."""

    name = "kp"

    def feedback_mode(self, block: Block, wire: Wire) -> str | None:
        return "kp"
