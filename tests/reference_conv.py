"""Independent reference of rec-LRA / LRA-E on a small convolutional ResNet with BatchNorm,
trained with AdamW (or SGD), in float64.

Like reference_lra.py (the MLP), this file imports nothing from the project and uses no autograd:
convolutions are im2col matrix products (torch.nn.functional.unfold / fold are plain tensor ops),
BatchNorm's forward and batch Jacobian are written out, and so are the optimizers.

Network (``resnet_spec``): a CIFAR-form ResNet. A stem (3x3 conv, stride 1, padding 1), then
basic blocks: node 0 = relu(bn(conv1(x))), node 1 = relu(bn(conv2(node 0)) + s(x)), where s is
the identity, or a 1x1 "shortcut" conv with BatchNorm when the stride or the width changes.
Convs have no bias. The head averages the last node over H x W and maps it to K logits
(weight and bias).

Keys: ``"<block>.<layer>.W"`` (kernel), ``.gamma`` / ``.beta`` (BatchNorm's affine), ``.E`` (error
synapse, W's shape: a transposed conv carrying the layer's error to its source); ``"head.fc.W"``
(K x C), ``"head.fc.b"``, ``"head.fc.E"``; ``"<block>.M"`` (K x C x H x W): the dense skip
synapse from e_L to the block's output node (topology ``skip``). Running statistics:
``"<block>.<layer>.mean"`` / ``.var`` in a separate dict.

One ``step`` takes a list of micro-batches. Each is normalised with its own batch statistics
(BatchNorm in train mode, and each moves the running statistics); its updates are summed over
samples; after the last one every update is divided by the total number of samples, then
re-projected, then the optimizer steps once. This is what a pipeline stage does with K
micro-batches and one apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS_BN, MOMENTUM_BN, EPS_ADAM = 1e-5, 0.1, 1e-8


def out_size(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


# ----------------------------------------------------------------------------- convolution


def conv2d(x, w, stride, pad):
    """Cross-correlation of x (B, C, H, W) with w (O, C, k, k): w as a matrix times x's patches."""
    k = w.shape[-1]
    ho, wo = out_size(x.shape[2], k, stride, pad), out_size(x.shape[3], k, stride, pad)
    cols = F.unfold(x, k, padding=pad, stride=stride)  # (B, C*k*k, ho*wo)
    return (w.reshape(w.shape[0], -1) @ cols).reshape(x.shape[0], w.shape[0], ho, wo)


def conv2d_adjoint(e, w, stride, pad, in_hw):
    """The transpose of conv2d(., w) (a transposed convolution): output-shaped e back to the
    input shape in_hw, summing every patch's share where patches overlap."""
    k = w.shape[-1]
    cols = w.reshape(w.shape[0], -1).T @ e.reshape(e.shape[0], e.shape[1], -1)
    return F.fold(cols, tuple(in_hw), k, padding=pad, stride=stride)


def conv2d_corr(x, e, k, stride, pad):
    """Batch-summed correlation of input x with output error e, shaped like the kernel:
    sum over samples and positions of e (outer) the input patch."""
    cols = F.unfold(x, k, padding=pad, stride=stride)
    g = torch.einsum("bol,bcl->oc", e.reshape(e.shape[0], e.shape[1], -1), cols)
    return g.reshape(e.shape[1], x.shape[1], k, k)


# ----------------------------------------------------------------------------- BatchNorm


def _ch(v):  # per-channel vector -> broadcastable over (B, C, H, W)
    return v[None, :, None, None]


def bn_train(u, gamma, beta):
    """Train-mode BatchNorm: batch mean, biased batch variance. Returns (out, xhat, mean, var)."""
    mean = u.mean(dim=(0, 2, 3))
    var = ((u - _ch(mean)) ** 2).mean(dim=(0, 2, 3))
    xhat = (u - _ch(mean)) / _ch(torch.sqrt(var + EPS_BN))
    return _ch(gamma) * xhat + _ch(beta), xhat, mean, var


def bn_backward(g, xhat, gamma, var):
    """The batch Jacobian of train-mode BatchNorm applied to g = dL/d(out): dL/du, the batch
    statistics depending on u too: gamma / sqrt(var + eps) (g - mean(g) - xhat mean(g xhat))."""
    g_mean = g.mean(dim=(0, 2, 3))
    gx_mean = (g * xhat).mean(dim=(0, 2, 3))
    return _ch(gamma / torch.sqrt(var + EPS_BN)) * (g - _ch(g_mean) - xhat * _ch(gx_mean))


def running_update(stats, key, mean, var, n):
    """Running statistics (momentum 0.1); the variance is the unbiased one, n / (n - 1) var."""
    m = MOMENTUM_BN
    stats[key + ".mean"] = (1 - m) * stats[key + ".mean"] + m * mean
    stats[key + ".var"] = (1 - m) * stats[key + ".var"] + m * var * (n / (n - 1))


# ----------------------------------------------------------------------------- the network


def resnet_spec(c_in, width, layout=(1, 1, 1)):
    """[(block, {layer: (c_in, c_out, k, stride, pad)}, identity)] bottom-up, and the width
    the head sees. Stage s has width * 2**s channels; its first block has stride 2 (s > 0)."""
    blocks = [("stem", {"conv": (c_in, width, 3, 1, 1)}, False)]
    c = width
    for s, n_blocks in enumerate(layout):
        c_out = width * 2**s
        for b in range(n_blocks):
            st = 2 if (s > 0 and b == 0) else 1
            layers = {"conv1": (c, c_out, 3, st, 1), "conv2": (c_out, c_out, 3, 1, 1)}
            projection = st != 1 or c != c_out
            if projection:
                layers["shortcut"] = (c, c_out, 1, st, 0)
            blocks.append((f"layer{s + 1}.{b}", layers, not projection))
            c = c_out
    return blocks, c


def node_shapes(spec, in_shape):
    """{block: (C, H, W) of its output node}."""
    (blocks, _), (_, h, w), out = spec, in_shape, {}
    for name, layers, _ in blocks:
        _, c, k, st, p = layers["conv" if name == "stem" else "conv1"]
        h, w = out_size(h, k, st, p), out_size(w, k, st, p)
        out[name] = (c, h, w)
    return out


def has_feedback(block, layer, topology):
    """Whether the layer has an error synapse E (block "head": the head's)."""
    if block == "stem":
        return False  # it would carry an error to the data
    if topology == "skip":
        return layer == "conv2"  # junctions (block outputs) are fed from e_L instead
    return not (topology == "adjacent" and layer == "shortcut")


def init_params(spec, in_shape, num_classes, seed):
    """Gaussian draws from torch.Generator(seed), every synapse random (none starts at zero),
    BatchNorm's affine away from (1, 0) so that a mix-up shows. Returns (params, stats)."""
    gen = torch.Generator().manual_seed(seed)

    def gauss(*shape, std):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    params, stats = {}, {}
    for name, layers, _ in spec[0]:
        for lname, (ci, co, k, _, _) in layers.items():
            key = f"{name}.{lname}"
            params[key + ".W"] = gauss(co, ci, k, k, std=math.sqrt(2.0 / (ci * k * k)))
            params[key + ".E"] = gauss(co, ci, k, k, std=math.sqrt(2.0 / (ci * k * k)))
            params[key + ".gamma"] = 1.0 + gauss(co, std=0.2)
            params[key + ".beta"] = gauss(co, std=0.2)
            stats[key + ".mean"] = torch.zeros(co, dtype=torch.float64)
            stats[key + ".var"] = torch.ones(co, dtype=torch.float64)
    for name, shape in node_shapes(spec, in_shape).items():
        params[name + ".M"] = gauss(num_classes, *shape, std=1.0 / math.sqrt(num_classes))
    c = spec[1]
    params["head.fc.W"] = gauss(num_classes, c, std=1.0 / math.sqrt(c))
    params["head.fc.b"] = gauss(num_classes, std=0.2)
    params["head.fc.E"] = gauss(num_classes, c, std=1.0 / math.sqrt(c))
    return params, stats


def forward(params, stats, spec, x):
    """Train-mode forward of one micro-batch. Returns (per-block caches, pooled, logits);
    `stats` (running statistics) is updated in place."""
    caches, z = [], x
    for name, layers, identity in spec[0]:
        cache = {"input": z, "layer": {}}

        def conv_bn(lname, src, name=name, layers=layers, cache=cache):
            key = f"{name}.{lname}"
            _, _, _, st, p = layers[lname]
            u = conv2d(src, params[key + ".W"], st, p)
            out, xhat, mean, var = bn_train(u, params[key + ".gamma"], params[key + ".beta"])
            running_update(stats, key, mean, var, u.numel() // u.shape[1])
            cache["layer"][lname] = {"src": src, "xhat": xhat, "var": var}
            return out

        if name == "stem":
            h = [conv_bn("conv", z)]
        else:
            h0 = conv_bn("conv1", z)
            skip = z if identity else conv_bn("shortcut", z)
            h = [h0, conv_bn("conv2", torch.relu(h0)) + skip]
        cache["h"], cache["z"] = h, [torch.relu(t) for t in h]
        z = cache["z"][-1]
        caches.append(cache)
    pooled = z.mean(dim=(2, 3))
    return caches, pooled, pooled @ params["head.fc.W"].T + params["head.fc.b"]


# ----------------------------------------------------------------------------- one sweep


def node_error(h, z, d, *, beta, mix, rescale_error):
    """Target y = relu(h - beta d); e = a (z - y) + (1 - a) sign(z - y), with (z - y) / beta
    in place of z - y under rescale_error."""
    diff = z - torch.relu(h - beta * d)
    if rescale_error and beta > 0:
        diff = diff / beta
    return diff if mix >= 1.0 else mix * diff + (1.0 - mix) * torch.sign(diff)


def _add(upd, key, value):
    upd[key] = value if key not in upd else upd[key] + value


def sweep(params, spec, caches, pooled, logits, y, s):
    """Batch-summed local updates of one micro-batch (settings `s`, see ``step``)."""
    p = torch.softmax(logits, dim=1)  # plain tensor op: exp / sum
    e_l = p - F.one_hot(y, logits.shape[1]).to(p.dtype)
    upd = {"head.fc.W": e_l.T @ pooled, "head.fc.b": e_l.sum(0)}
    topo, fb = s["topology"], s["feedback_update"]
    err = {"beta": s["beta"], "rescale_error": s["rescale_error"]}
    d = None
    if has_feedback("head", "fc", topo):
        hh, ww = caches[-1]["z"][-1].shape[2:]
        v = e_l @ params["head.fc.E"]  # the transpose of the pooled head: spread over H x W
        d = (v / (hh * ww))[:, :, None, None].expand(*v.shape, hh, ww)
        if fb == "local":
            upd["head.fc.E"] = -(e_l.T @ d.mean(dim=(2, 3)))

    def learn_layer(name, lname, lspec, c, e):
        """The layer's local updates for its node's error e; returns what its error synapse
        carries to its source (None without a synapse)."""
        key, lc = f"{name}.{lname}", c["layer"][lname]
        _, _, k, st, pad = lspec
        g_u = bn_backward(e, lc["xhat"], params[key + ".gamma"], lc["var"])  # error at W z
        _add(upd, key + ".W", conv2d_corr(lc["src"], g_u, k, st, pad))
        _add(upd, key + ".gamma", (e * lc["xhat"]).sum(dim=(0, 2, 3)))
        _add(upd, key + ".beta", e.sum(dim=(0, 2, 3)))
        if not has_feedback(name, lname, topo):
            return None
        e_c = g_u if s["carry_bn"] else e
        carried = conv2d_adjoint(e_c, params[key + ".E"], st, pad, lc["src"].shape[2:])
        if fb == "local":
            _add(upd, key + ".E", -conv2d_corr(carried, e_c, k, st, pad))
        return carried

    for (name, layers, identity), c in zip(reversed(spec[0]), reversed(caches), strict=True):
        h, z = c["h"], c["z"]
        mix_out = s["mix"]
        if topo == "skip":  # the output node is fed from e_L by the block's skip synapse
            m = params[name + ".M"]
            d = torch.einsum("bk,kchw->bchw", e_l, m)
            mix_out = s["mix_skip"]
            if s["skip_update"] == "kp":
                upd[name + ".M"] = torch.einsum("bk,bchw->kchw", e_l, z[-1])
            elif s["skip_update"] == "local":
                upd[name + ".M"] = -torch.einsum("bk,bchw->kchw", e_l, d)
        d = torch.zeros_like(z[-1]) if d is None else d
        e_top = node_error(h[-1], z[-1], d, mix=mix_out, **err)
        if name == "stem":
            learn_layer(name, "conv", layers["conv"], c, e_top)
            break
        sent = [learn_layer(name, "shortcut", layers["shortcut"], c, e_top)] if not identity else []
        if identity and topo == "mirror":
            sent.append(e_top)  # the identity shortcut's error path
        d0 = learn_layer(name, "conv2", layers["conv2"], c, e_top)
        d0 = torch.zeros_like(z[0]) if d0 is None else d0
        e0 = node_error(h[0], z[0], d0, mix=s["mix"], **err)
        sent.append(learn_layer(name, "conv1", layers["conv1"], c, e0))
        sent = [t for t in sent if t is not None]
        d = sum(sent[1:], sent[0]) if sent else None
    return upd


# ----------------------------------------------------------------------------- one step


def _reproject(g, c):
    norm = torch.linalg.vector_norm(g)
    return g * (c / norm) if c and c > 0 and norm > c else g


def step(params, stats, opt, micro_batches, *, spec, **s):
    """One optimizer step over `micro_batches` [(x, y)]; returns (params, stats, opt) anew.

    Settings: topology (mirror, adjacent, skip), feedback_update and skip_update (kp, local,
    fixed), beta, gamma, mix and mix_skip (a of the adjacent / skip-fed error units), carry_bn,
    rescale_error, reproject (radius c, 0 off), optimizer (adamw, sgd), lr, weight_decay,
    betas (AdamW), momentum (SGD).

    KP: E's update is a copy of W's. gamma is the error synapses' (E, M) learning-rate factor,
    applied by the optimizer, so after re-projection; their weight decay is weight_decay / gamma
    so that they shrink by the same fraction per step as W. Forward matrices and kernels decay;
    1-d parameters (BatchNorm's affine, the head's bias) do not.
    """
    stats = {k: v.clone() for k, v in stats.items()}
    total, n = {}, 0
    for x, y in micro_batches:
        caches, pooled, logits = forward(params, stats, spec, x)
        for key, value in sweep(params, spec, caches, pooled, logits, y, s).items():
            _add(total, key, value)
        n += x.shape[0]
    grads = {k: v / n for k, v in total.items()}
    if s["feedback_update"] == "kp":  # E's update is W's (gamma comes with E's rate)
        for key in [k for k in grads if k.endswith(".W")]:
            layer = key[: -len(".W")]
            if has_feedback(*layer.rsplit(".", 1), s["topology"]):
                grads[layer + ".E"] = grads[key]
    grads = {k: _reproject(g, s["reproject"]) for k, g in grads.items()}
    new, new_opt = dict(params), {}
    for key, g in grads.items():
        synapse = key.endswith((".E", ".M"))
        rate = s["gamma"] if synapse else 1.0
        lr = s["lr"] * rate
        if synapse:
            wd = s["weight_decay"] / rate if rate > 0 else 0.0
        else:
            wd = s["weight_decay"] if g.dim() > 1 else 0.0
        state = opt.get(key, {"t": 0})
        p, t = params[key], state["t"] + 1
        if s["optimizer"] == "adamw":
            b1, b2 = s["betas"]
            p = p * (1.0 - lr * wd)  # decoupled weight decay, then the Adam step
            m = b1 * state.get("m", torch.zeros_like(g)) + (1 - b1) * g
            v = b2 * state.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
            denom = torch.sqrt(v) / math.sqrt(1 - b2**t) + EPS_ADAM
            new[key] = p - (lr / (1 - b1**t)) * m / denom
            new_opt[key] = {"t": t, "m": m, "v": v}
        else:  # SGD, momentum, weight decay added to the gradient (torch's convention)
            g = g + wd * p
            buf = g if t == 1 else s["momentum"] * state["buf"] + g
            new[key] = p - lr * buf
            new_opt[key] = {"t": t, "buf": buf}
    return new, stats, {**opt, **new_opt}
