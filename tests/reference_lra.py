"""Independent reference implementation of LRA-E and rec-LRA for a plain MLP, in float64.

This file deliberately imports nothing from the project (workers, driver, cluster) and uses no
autograd: every quantity is an explicit tensor formula, so the real implementation can be checked
against it. See /work/shared/ALGORITHM.md for the algorithm itself.

Model
-----
Input width D0, ``depth`` hidden layers of width H, grouped into blocks of ``gap`` consecutive
hidden layers (depth % gap == 0), then a linear head H -> K.

* Hidden layer i is 0-based and counted bottom-up (i = 0 .. depth-1); its block is i // gap.
* A block's last layer (i % gap == gap - 1) is its *junction*.
* With ``residual=True`` a block whose input width is H (every block except block 0 when D0 != H)
  adds its block input to the pre-activation of its junction (an identity skip over ``gap``
  layers).

Parameter names (the keys of the params dict)
---------------------------------------------
=============  ===========  =================================================================
key            shape        meaning
=============  ===========  =================================================================
``W{i}``       (H, in_i)    forward weight of hidden layer i (in_0 = D0, otherwise H)
``b{i}``       (H,)         forward bias of hidden layer i
``E{i}``       (H, in_i)    error synapse of hidden layer i, same shape as ``W{i}``; it carries
                            layer i's error down to layer i's input: d = e_i @ E{i}
``Whead``      (K, H)       head weight
``bhead``      (K,)         head bias
``Ehead``      (K, H)       head error synapse: d_last = e_L @ Ehead
``M{k}``       (K, H)       skip error synapse of block k (k = 0 .. depth//gap - 1): carries the
                            output error to that block's junction, d = e_L @ M{k}
=============  ===========  =================================================================

``E0`` never carries an error to a hidden node (it would reach the input x), so it is never used
and never updated. In the ``skip`` topology ``Ehead`` and the error synapse of each block's first
layer (``E{k*gap}``) are unused too. ``M{k}`` is only used in the ``skip`` topology. Unused
synapses are never updated.

Public functions
----------------
``init_params``, ``forward``, ``compute_errors`` (targets and errors of one sweep, for tests),
``gradients`` (the update tensors after re-projection) and ``step`` (one plain SGD step).
"""

from __future__ import annotations

import math

import torch

RULES = ("rec_lra", "lra_e")
TOPOLOGIES = ("adjacent", "mirror", "skip")
FEEDBACK_UPDATES = ("kp", "local", "fixed")
SKIP_UPDATES = ("kp", "local", "fixed")


# ----------------------------------------------------------------------------- helpers


def activation(name: str):
    if name == "relu":
        return torch.relu
    if name == "tanh":
        return torch.tanh
    raise ValueError(f"unknown activation {name!r}")


def check_shape(depth: int, gap: int) -> None:
    if depth < 1 or gap < 1 or depth % gap != 0:
        raise ValueError(f"depth={depth} must be a positive multiple of gap={gap}")


def is_junction(i: int, gap: int) -> bool:
    """True when hidden layer i is the last layer of its block."""
    return i % gap == gap - 1


def junction_of_block(k: int, gap: int) -> int:
    """Index of the junction (last hidden layer) of block k."""
    return (k + 1) * gap - 1


def block_has_skip(k: int, params: dict[str, torch.Tensor], residual: bool) -> bool:
    """True when block k has an identity skip: residual on and block input width equals H."""
    if not residual:
        return False
    if k > 0:
        return True
    hidden_width = params["W0"].shape[0]
    input_width = params["W0"].shape[1]
    return input_width == hidden_width


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(y.shape[0], num_classes, dtype=dtype)
    out[torch.arange(y.shape[0]), y] = 1.0
    return out


def softmax(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(dim=1, keepdim=True).values
    expo = torch.exp(shifted)
    return expo / expo.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- model


def init_params(
    D0: int, H: int, depth: int, K: int, gap: int, seed: int, dtype=torch.float64
) -> dict[str, torch.Tensor]:
    """Gaussian init from torch.Generator(seed).

    W: std 1/sqrt(fan_in) with fan_in = in. E and M: std 1/sqrt(rows), the fan-in of the map
    e -> e @ E. Biases: std 0.1 (non-zero, so a bias mix-up in a comparison shows).
    """
    check_shape(depth, gap)
    gen = torch.Generator().manual_seed(seed)

    def gauss(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * std

    params: dict[str, torch.Tensor] = {}
    for i in range(depth):
        fan_in = D0 if i == 0 else H
        params[f"W{i}"] = gauss(H, fan_in, std=1.0 / math.sqrt(fan_in))
        params[f"b{i}"] = gauss(H, std=0.1)
        params[f"E{i}"] = gauss(H, fan_in, std=1.0 / math.sqrt(H))
    params["Whead"] = gauss(K, H, std=1.0 / math.sqrt(H))
    params["bhead"] = gauss(K, std=0.1)
    params["Ehead"] = gauss(K, H, std=1.0 / math.sqrt(K))
    for k in range(depth // gap):
        params[f"M{k}"] = gauss(K, H, std=1.0 / math.sqrt(K))
    return params


def forward(params, x, *, depth, gap, act, residual):
    """Returns ([(h_i, z_i) for each hidden layer i], logits). h includes the identity skip."""
    check_shape(depth, gap)
    phi = activation(act)
    layers = []
    z = x
    block_input = x
    for i in range(depth):
        if i % gap == 0:
            block_input = z
        h = z @ params[f"W{i}"].T + params[f"b{i}"]
        if is_junction(i, gap) and block_has_skip(i // gap, params, residual):
            h = h + block_input
        z = phi(h)
        layers.append((h, z))
    logits = z @ params["Whead"].T + params["bhead"]
    return layers, logits


# ----------------------------------------------------------------------------- one sweep


def compute_errors(
    params,
    x,
    y,
    *,
    depth,
    gap,
    act,
    residual,
    rule,
    topology,
    beta,
    mix_skip,
    mix_adjacent,
    rescale_error=False,
):
    """The forward pass plus one top-down sweep of targets and errors.

    Returns a dict with
      layers:  [(h_i, z_i)] per hidden layer
      logits, p, e_out:  head logits, softmax and output error e_L = p - onehot(y)
      disp:    [d_i] displacement of each hidden layer
      target:  [y_i] target of each hidden layer
      err:     [e_i] error of each hidden layer
      used:    {synapse key: (source error, displacement that synapse produced)} for every
               synapse the topology used ("E{i}", "Ehead", "M{k}")

    With ``rescale_error`` the L2 part of each hidden error is divided by beta:
    e_i = a (z_i - y_i) / beta + (1 - a) sign(z_i - y_i).
    """
    check_shape(depth, gap)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}")
    if rule == "lra_e" and topology != "adjacent":
        raise ValueError("rule lra_e needs topology 'adjacent'")
    phi = activation(act)

    layers, logits = forward(params, x, depth=depth, gap=gap, act=act, residual=residual)
    p = softmax(logits)
    e_out = p - one_hot(y, logits.shape[1], logits.dtype)

    disp: list = [None] * depth
    target: list = [None] * depth
    err: list = [None] * depth
    used: dict = {}

    for i in reversed(range(depth)):
        h, z = layers[i]
        fed_by_skip_synapse = topology == "skip" and is_junction(i, gap)

        if fed_by_skip_synapse:
            key = f"M{i // gap}"
            d = e_out @ params[key]
            used[key] = (e_out, d)
        else:
            # adjacent path: the next layer up (the head for the last hidden layer)
            if i == depth - 1:
                key, e_above = "Ehead", e_out
            else:
                key, e_above = f"E{i + 1}", err[i + 1]
            d = e_above @ params[key]
            used[key] = (e_above, d)
            if topology == "mirror" and is_junction(i, gap):
                # this node is the input of block k+1; its identity skip feeds that junction
                k_next = i // gap + 1
                if k_next < depth // gap and block_has_skip(k_next, params, residual):
                    d = d + err[junction_of_block(k_next, gap)]

        if rule == "lra_e":
            a = 1.0
        elif fed_by_skip_synapse:
            a = mix_skip
        else:
            a = mix_adjacent

        y_i = phi(h - beta * d)
        diff = z - y_i
        if rescale_error:
            diff = diff / beta
        disp[i] = d
        target[i] = y_i
        err[i] = a * diff + (1.0 - a) * torch.sign(diff)

    return {
        "layers": layers,
        "logits": logits,
        "p": p,
        "e_out": e_out,
        "disp": disp,
        "target": target,
        "err": err,
        "used": used,
    }


# ----------------------------------------------------------------------------- updates


def reproject_tensor(g: torch.Tensor, c) -> torch.Tensor:
    """Rescale g to Frobenius norm c when its norm exceeds c. c None or <= 0: unchanged."""
    if c is None or c <= 0:
        return g
    norm = torch.linalg.norm(g)
    if norm > c:
        return g * (c / norm)
    return g


def gradients(
    params,
    x,
    y,
    *,
    depth,
    gap,
    act,
    residual,
    rule,
    topology,
    beta,
    gamma,
    mix_skip,
    mix_adjacent,
    feedback_update,
    skip_update,
    reproject,
    rescale_error=False,
):
    """The update tensors ("gradients", to be descended), each re-projected separately.

    Only parameters that receive an update appear in the returned dict. gamma is not applied
    here: it is the error synapses' own learning rate, applied by ``step`` after re-projection.
    """
    if feedback_update not in FEEDBACK_UPDATES:
        raise ValueError(f"unknown feedback_update {feedback_update!r}")
    if skip_update not in SKIP_UPDATES:
        raise ValueError(f"unknown skip_update {skip_update!r}")
    info = compute_errors(
        params,
        x,
        y,
        depth=depth,
        gap=gap,
        act=act,
        residual=residual,
        rule=rule,
        topology=topology,
        beta=beta,
        mix_skip=mix_skip,
        mix_adjacent=mix_adjacent,
        rescale_error=rescale_error,
    )
    batch = x.shape[0]
    layers = info["layers"]
    err = info["err"]
    e_out = info["e_out"]
    layer_inputs = [x] + [z for _, z in layers[:-1]]

    grads: dict[str, torch.Tensor] = {}
    for i in range(depth):
        grads[f"W{i}"] = err[i].T @ layer_inputs[i] / batch
        grads[f"b{i}"] = err[i].sum(0) / batch
    z_last = layers[-1][1]
    grads["Whead"] = e_out.T @ z_last / batch
    grads["bhead"] = e_out.sum(0) / batch

    for key, (e_src, d) in info["used"].items():
        if key.startswith("E"):
            weight_key = "W" + key[1:]  # E3 -> W3, Ehead -> Whead
            if feedback_update == "kp":
                grads[key] = grads[weight_key]
            elif feedback_update == "local":
                grads[key] = -(e_src.T @ d) / batch
        else:  # skip synapse M{k}
            z_junction = layers[junction_of_block(int(key[1:]), gap)][1]
            if skip_update == "kp":  # direct KP: M moves like a readout of the junction would
                grads[key] = (e_out.T @ z_junction) / batch
            elif skip_update == "local":
                grads[key] = -(e_out.T @ d) / batch

    return {key: reproject_tensor(g, reproject) for key, g in grads.items()}


def step(params, x, y, *, lr, **settings):
    """One plain SGD step: param -= lr * G, and E/M -= gamma * lr * G (gamma is the error
    synapses' learning-rate factor). Returns new params; the input dict is untouched.

    `settings` are gradients()'s keyword arguments (reproject: the ball radius c; None or 0
    turns re-projection off).
    """
    grads = gradients(params, x, y, **settings)
    new_params = {}
    for key, value in params.items():
        if key in grads:
            rate = lr * settings["gamma"] if key[0] in "EM" else lr
            new_params[key] = value - rate * grads[key]
        else:
            new_params[key] = value.clone()
    return new_params
