"""Layers: a forward map W (dense, conv, pooled head), optional BatchNorm, error synapse E."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def init_weight_(w: torch.Tensor, scheme: str, std: float, gen: torch.Generator) -> None:
    """Fill `w` (out, in, ...) in place; `gen` makes each layer's draw independent of others."""
    fan_in = w[0].numel()
    with torch.no_grad():
        if scheme == "zeros":  # a KP synapse then holds exactly what its layer has learned
            w.zero_()
        elif scheme == "gaussian":
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * std)
        elif scheme == "kaiming":
            w.copy_(
                torch.randn(w.shape, generator=gen, dtype=w.dtype) * std * math.sqrt(2.0 / fan_in)
            )
        elif scheme == "xavier":
            fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
            bound = std * math.sqrt(6.0 / (fan_in + fan_out))
            w.copy_(torch.rand(w.shape, generator=gen, dtype=w.dtype) * 2 * bound - bound)
        elif scheme == "orthogonal":
            flat = torch.randn(w.shape[0], fan_in, generator=gen, dtype=w.dtype)
            q, r = torch.linalg.qr(flat.T if flat.shape[0] < flat.shape[1] else flat)
            q = q * torch.sign(torch.diagonal(r))
            q = q.T if flat.shape[0] < flat.shape[1] else q
            w.copy_((q * std).reshape(w.shape))
        else:  # validated by RuleConfig; kept for direct callers
            raise ValueError(f"unknown init scheme {scheme!r}")


def compute_dtype(e: torch.Tensor) -> torch.dtype:
    """The dtype an error kernel computes in: autocast's (train.precision = "bf16") where it is
    on for `e`'s device, else `e`'s own. Explicit kernels (a conv's backward, a transpose run by
    autograd's backward, outside autocast) cast their float32 weights to it, as autocast casts
    them for the forward maps; master weights and error synapses are never changed."""
    kind = e.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return e.dtype


def as_dtype(dtype: torch.dtype, *ts: torch.Tensor) -> list[torch.Tensor]:
    """`ts` in `dtype` (the same tensors, no copy, where they are in it already)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in ts]


@dataclass
class BatchNormSaved:
    """What a BatchNorm layer's backward needs of one forward: its input W z and batch stats."""

    lin: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    training: bool


class Layer(nn.Module, ABC):
    """One learnable map from a source node to a target node.

    `weight` (W) and `feedback` (E, same shape as W, present only when the rule uses it) are
    plain parameters; BatchNorm, when on, is part of the forward map and learns with it.
    """

    kind = ""

    def __init__(self, weight_shape: tuple[int, ...], *, batchnorm: bool, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias and not batchnorm else None
        self.bn = self._make_bn(weight_shape[0]) if batchnorm else None
        self.feedback: nn.Parameter | None = None
        self.feedback_mode: str | None = None  # how E learns: "kp", "local", "fixed"

    def _make_bn(self, channels: int) -> nn.Module:
        return nn.BatchNorm1d(channels)

    def add_feedback(self, trainable: bool) -> None:
        self.feedback = nn.Parameter(torch.empty_like(self.weight), requires_grad=trainable)

    @abstractmethod
    def linear(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The bare map W z (no bias, no BN): the part FA swaps its backward for."""

    @abstractmethod
    def transpose(self, e: torch.Tensor, weight: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """The adjoint of `linear` for `weight`, shaped like the source activation `src` (whose
        values are not used)."""

    @abstractmethod
    def weight_grad(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The local correlation of input z with output error e (summed over the batch)."""

    def update_and_carry(
        self, z: torch.Tensor, e: torch.Tensor, feedback: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight_grad(z, e), `e` carried down through `feedback` or None when none is given):
        the layer's Hebbian update and its error synapse's output, in one kernel call where
        the layer has one for both (a convolution's backward computes the input error and the
        weight correlation together; neither reads W)."""
        carried = None if feedback is None else self.transpose(e, feedback, z)
        return self.weight_grad(z, e), carried

    def bias_grad(self, e: torch.Tensor) -> torch.Tensor:
        """The bias's update: the output error summed over the batch (and positions)."""
        return e.sum(dim=[d for d in range(e.dim()) if d != 1])

    def post(self, h: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            h = h + self.bias.view(1, -1, *([1] * (h.dim() - 2)))
        if self.bn is not None:
            h = self.bn(h)
        return h

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.post(self.linear(z, self.weight))

    def post_local(self, lin: torch.Tensor) -> tuple[torch.Tensor, BatchNormSaved | None]:
        """post(lin) with no graph, and what BatchNorm's own backward needs later (None without
        BatchNorm): the kernels nn.BatchNorm runs, with the same running-statistics update."""
        bn = self.bn
        if bn is None:
            return self.post(lin), None
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        training = bn.training or bn.running_mean is None
        running = (
            (bn.running_mean, bn.running_var)
            if not bn.training or bn.track_running_stats
            else (None, None)
        )
        out, mean, invstd = torch.native_batch_norm(
            lin, bn.weight, bn.bias, running[0], running[1], training, factor, bn.eps
        )
        return out, BatchNormSaved(lin, mean, invstd, training)

    def post_backward(
        self, saved: BatchNormSaved, e: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`e` at BatchNorm's output sent back through its batch Jacobian to W z, and the
        updates of its scale and shift (None where they do not learn)."""
        bn = self.bn
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        learns = [p is not None and p.requires_grad for p in (bn.weight, bn.bias)]
        (e,) = as_dtype(saved.lin.dtype, e)  # bf16: the kernel takes float32 scale and stats
        # (a compiled bf16 forward hands back its batch statistics in bf16)
        stat = torch.promote_types(saved.lin.dtype, torch.float32)
        mean, invstd = as_dtype(stat, saved.mean, saved.invstd)
        g_lin, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            e,
            saved.lin,
            bn.weight,
            bn.running_mean,
            bn.running_var,
            mean,
            invstd,
            saved.training,
            bn.eps,
            [True, *learns],
        )
        return g_lin, g_w, g_b

    def carry(self, e: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """The error synapse: E applied to the target node's error, shaped like the source."""
        assert self.feedback is not None, "layer has no error synapse under this rule"
        return self.transpose(e, self.feedback, src)


class Dense(Layer):
    kind = "dense"

    def __init__(self, d_in: int, d_out: int, *, batchnorm: bool = False) -> None:
        super().__init__((d_out, d_in), batchnorm=batchnorm, bias=True)

    def linear(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return z.flatten(1) @ weight.T

    def transpose(self, e: torch.Tensor, weight: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        e, weight = as_dtype(compute_dtype(e), e, weight)
        return (e @ weight).reshape(src.shape)

    def weight_grad(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        e, z = as_dtype(compute_dtype(e), e, z)
        return e.T @ z.flatten(1)


class Conv(Layer):
    kind = "conv"

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int = 0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__((c_out, c_in, kernel, kernel), batchnorm=batchnorm, bias=True)
        self.stride, self.padding = stride, padding

    def _make_bn(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels)

    def linear(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, weight, stride=self.stride, padding=self.padding)

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        k = self.weight.shape[-1]
        return tuple((s + 2 * self.padding - k) // self.stride + 1 for s in (h, w))  # type: ignore[return-value]

    def transpose(self, e: torch.Tensor, weight: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        # A transposed conv sized to the source (output_padding implied), computed by the
        # input-gradient kernel backprop itself uses. Handing it a real tensor of the source's
        # shape and layout matters: conv_transpose2d and conv2d_input (an expanded dummy input)
        # take CPU paths up to 2x slower.
        return self._backward(e, src, weight, carry=True, update=False)[0]

    def weight_grad(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.update_and_carry(z, e, None)[0]

    def update_and_carry(
        self, z: torch.Tensor, e: torch.Tensor, feedback: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # backprop's own kernel, handed E where backprop would hand W: the input error comes
        # out through E, and the weight correlation (of z with e) does not depend on either
        weight = self.weight if feedback is None else feedback
        carried, grad = self._backward(e, z, weight, carry=feedback is not None, update=True)
        return grad, carried

    def _backward(
        self, e: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, *, carry: bool, update: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv's backward kernel: (e through `weight` to z's shape, the correlation of z
        with e), each only where asked (the other slot is then undefined). Not an autocast op:
        its operands are cast to the compute dtype here."""
        e, z, weight = as_dtype(compute_dtype(e), e, z, weight)
        carried, grad, _ = torch.ops.aten.convolution_backward(
            e,
            z,
            weight,
            None,
            [self.stride] * 2,
            [self.padding] * 2,
            [1, 1],
            False,
            [0, 0],
            1,
            [carry, update, False],
        )
        return carried, grad


class PooledHead(Dense):
    """Global average pooling then a dense map to the K classes: the output layer."""

    kind = "head"

    def linear(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.pool(z) @ weight.T

    @staticmethod
    def pool(z: torch.Tensor) -> torch.Tensor:
        return z.mean(dim=(2, 3)) if z.dim() == 4 else z.flatten(1)

    def transpose(self, e: torch.Tensor, weight: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        e, weight = as_dtype(compute_dtype(e), e, weight)
        d = e @ weight
        if src.dim() == 4:  # the transpose of average pooling: spread evenly over H x W
            b, c, h, w = src.shape
            return (d / (h * w))[:, :, None, None].expand(b, c, h, w).contiguous()
        return d.reshape(src.shape)

    def weight_grad(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        e, z = as_dtype(compute_dtype(e), e, z)
        return e.T @ self.pool(z)
