"""A trained model as plain torch, and its files (`reclra export`).

`plain_model` builds an nn.Module of torch layers only (nn.Conv2d, nn.Linear, nn.BatchNorm,
nn.Sequential), in eval mode, whose logits are reclra's own eval-mode forward: the forward
weights and BatchNorm of a run, without its error synapses or auxiliary heads. Its keys are
torchvision's ResNet keys (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0, fc), so an
ImageNet-form ResNet at width 64 loads into torchvision.models.resnet18/34/50/101 (strict);
an MLP's blocks keep their names (dense0.fc0, dense0.bn0, ..., fc).

Export formats: `torchvision` (a torch.save'd state dict, refused unless torchvision's model of
the same name loads it strictly and computes the same logits), `state_dict` (the same file for
any model, loading into `plain_model`'s module) and `safetensors`. Beside the weights goes
`<name>.toml`, the run's resolved config (`reclra eval` and `reclra train --config` read it).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from driver.config import Config, parse_config
from driver.config.docs import toml_value
from driver.run import checkpoint_store, storage
from driver.run.memory import data_shape
from driver.run.storage import Location
from workers.blocks import ACTS, Block
from workers.layers import Conv, Dense, Layer
from workers.models import MODELS, model_plan
from workers.spec import DTYPES, PRECISIONS

FORMATS = ("torchvision", "state_dict", "safetensors")
# torchvision.models builders a reclra ResNet of the same name may load into
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
EXTRA = "reclra."  # key prefix of error synapses and auxiliary heads, exported only when asked


class ExportError(ValueError):
    """A model that cannot be exported as asked: one line naming the problem and the fix."""


# -- the plain module ------------------------------------------------------------------------
Source = tuple[str, str]  # (reclra unit, its tensor key): where a plain key's value comes from


def _map_of(layer: Layer) -> nn.Module:
    """The torch layer computing `layer`'s map W z (+ bias where it has one)."""
    bias = layer.bias is not None
    out_f, in_f = layer.weight.shape[:2]
    if isinstance(layer, Conv):
        k = layer.weight.shape[-1]
        return nn.Conv2d(in_f, out_f, k, stride=layer.stride, padding=layer.padding, bias=bias)
    if isinstance(layer, Dense):  # a PooledHead too: its pooling is the plain net's own
        return nn.Linear(in_f, out_f, bias=bias)
    raise ExportError(f"export: no plain torch layer for {type(layer).__name__}")


def _apply(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """A map as reclra's layer computes it: the bare W z, then the bias added (the same ops,
    so the same logits under autocast too)."""
    if isinstance(m, nn.Conv2d):
        h = F.conv2d(z, m.weight, None, m.stride, m.padding)
    else:
        assert isinstance(m, nn.Linear)
        h = z.flatten(1) @ m.weight.T
    if m.bias is not None:
        h = h + m.bias.view(1, -1, *([1] * (h.dim() - 2)))
    return h


def _bn_of(layer: Layer) -> nn.Module | None:
    bn = layer.bn
    if bn is None:
        return None
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    kind = nn.BatchNorm2d if isinstance(bn, nn.BatchNorm2d) else nn.BatchNorm1d
    return kind(bn.num_features, eps=bn.eps, momentum=bn.momentum)


def _names(layer: str) -> tuple[str, str]:
    """(path of a block layer's map, path of its BatchNorm) in the block's plain module:
    torchvision's names (convN + bnN, the projection shortcut as downsample.0 + downsample.1),
    an MLP's fcN + bnN."""
    if layer == "shortcut":
        return "downsample.0", "downsample.1"
    m = re.fullmatch(r"(conv|fc)(\d+)", layer)
    if m is None:
        raise ExportError(f"export: no plain name for a block layer named {layer!r}")
    return layer, f"bn{m.group(2)}"


def _add(owner: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at the dotted `path` under `owner` (downsample.0: a Sequential)."""
    head, _, last = path.rpartition(".")
    if not head:
        owner.add_module(last, module)
        return
    if not hasattr(owner, head):
        owner.add_module(head, nn.Sequential())
    getattr(owner, head).append(module)


def _sources(prefix: str, unit: str, path: str, module: nn.Module, within: str) -> dict:
    return {f"{prefix}{path}.{k}": (unit, f"{within}{k}") for k in module.state_dict()}


class PlainBlock(nn.Module):
    """One block as torch layers: each node sums its layers' outputs (map, then BatchNorm) and
    identity shortcuts, then takes its activation; an ImageNet stem max-pools its output."""

    def __init__(self, block: Block, prefix: str) -> None:
        super().__init__()
        self.acts = list(block.acts)
        self.out_pool = block.out_pool
        self.identity_into = [list(s) for s in block.identity_into]
        self.sources: dict[str, Source] = {}
        maps: dict[str, tuple[nn.Module, nn.Module | None]] = {}
        for lname, layer in block.layer_items():
            map_path, bn_path = _names(lname)
            lin, bn = _map_of(layer), _bn_of(layer)
            unit = f"{block.name}.{lname}"
            _add(self, map_path, lin)
            self.sources |= _sources(prefix, unit, map_path, lin, "")
            if bn is not None:
                _add(self, bn_path, bn)
                self.sources |= _sources(prefix, unit, bn_path, bn, "bn.")
            maps[lname] = (lin, bn)
        # plain references (registered above): (map, BatchNorm, source node) into each node
        self._into = [[(*maps[w.layer], w.src) for w in ws] for ws in block.wires_into]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs: list[torch.Tensor] = []
        for n, act in enumerate(self.acts):
            h: torch.Tensor | None = None
            for lin, bn, src in self._into[n]:
                z = x if src < 0 else zs[src]
                out = _apply(lin, z)
                out = out if bn is None else bn(out)
                h = out if h is None else h + out
            for s in self.identity_into[n]:
                h = h + (x if s < 0 else zs[s])  # type: ignore[operator]
            assert h is not None
            zs.append(ACTS[act](h))
        return F.max_pool2d(zs[-1], 3, stride=2, padding=1) if self.out_pool else zs[-1]


class PlainNet(nn.Module):
    """A reclra model's forward as torch layers: the stem's conv1 + bn1 (and max-pool) at the
    top level, every residual or dense block in order (layerS.B in nn.Sequential layerS, as
    torchvision has them; an MLP's denseB), and the head: global average pooling, then fc."""

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.sources: dict[str, Source] = {}
        self._body: list[PlainBlock] = []
        # the stem's (map, BatchNorm, activation, max-pool) and the head's map, registered
        # under torchvision's names (conv1, bn1, fc); no stem in an MLP
        self._stem: tuple[nn.Module, nn.Module | None, str, bool] | None = None
        self._head: tuple[nn.Module] | None = None
        # train.precision's autocast dtype (None: float32): reclra evaluates a bf16 run with
        # its input in bf16 and its layers under autocast, and hands out float32 logits
        self.precision: torch.dtype | None = None
        for block in blocks:
            if block.name == "stem" or block.head:
                self._top_level(block)
                continue
            group, _, index = block.name.rpartition(".")
            plain = PlainBlock(block, f"{block.name}.")
            if group:
                if not hasattr(self, group):
                    self.add_module(group, nn.Sequential())
                getattr(self, group).append(plain)
            else:
                self.add_module(block.name, plain)
            self._body.append(plain)
            self.sources |= plain.sources

    def _top_level(self, block: Block) -> None:
        """The stem's and the head's single layer, at torchvision's top-level names."""
        (lname, layer), *rest = block.layer_items()
        if rest or len(block.wires) != 1:
            raise ExportError(f"export: block {block.name!r} has {len(block.wires)} layers, not 1")
        unit = f"{block.name}.{lname}"
        map_path, bn_path = ("fc", "") if block.head else ("conv1", "bn1")
        lin, bn = _map_of(layer), _bn_of(layer)
        self.add_module(map_path, lin)
        self.sources |= _sources("", unit, map_path, lin, "")
        if bn is not None:
            self.add_module(bn_path, bn)
            self.sources |= _sources("", unit, bn_path, bn, "bn.")
        if block.head:
            self._head = (lin,)
        else:
            self._stem = (lin, bn, block.acts[0], block.out_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            raise ExportError("export: the model has no head block")
        if self.precision is None:
            return self._forward(x)
        with torch.autocast(x.device.type, dtype=self.precision):
            logits = self._forward(x.to(self.precision))
        weight = self._head[0].weight
        assert isinstance(weight, torch.Tensor)
        return logits.to(weight.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self._head is not None
        if self._stem is not None:
            conv, bn, act, pool = self._stem
            x = _apply(conv, x)
            x = ACTS[act](x if bn is None else bn(x))
            if pool:
                x = F.max_pool2d(x, 3, stride=2, padding=1)
        for block in self._body:
            x = block(x)
        return _apply(self._head[0], x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1))


def build_plain(cfg: Config, num_classes: int) -> PlainNet:
    """The plain module of `cfg.model` on `cfg.data`'s inputs, with `num_classes` outputs,
    in train.dtype and under train.precision; its weights are still to be loaded."""
    input_shape, _ = data_shape(cfg.data)
    blocks = [make() for _, make in model_plan(cfg.model, input_shape, num_classes)]
    net = PlainNet(blocks).to(DTYPES[cfg.train.dtype])
    net.precision = PRECISIONS[cfg.train.precision]
    return net


def _units(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The units of a checkpoint (checkpoint_store.load) or of a runner's state_dict()."""
    if "runner" in state:
        state = state["runner"]
    if "units" not in state:
        raise ExportError(
            "export: the state holds no model units; pass a checkpoint (checkpoint_store.load) "
            "or a runner's state_dict()"
        )
    return state["units"]  # type: ignore[no-any-return]


def plain_model(cfg: Config, state: dict[str, Any]) -> PlainNet:
    """The trained model of `state` (a checkpoint as checkpoint_store.load returns it, or a
    runner's state_dict()) as a plain torch module in eval mode: its logits are reclra's
    eval-mode forward of the same weights. `cfg` is the run's config (model, data, dtype)."""
    units = _units(state)
    head = units.get("head.fc", {}).get("tensors", {}).get("weight")
    if head is None:
        raise ExportError("export: the state has no head.fc layer; it is not a reclra model")
    net = build_plain(cfg, int(head.shape[0]))
    weights = {}
    for key, (unit, tensor) in net.sources.items():
        found = units.get(unit, {}).get("tensors", {})
        if tensor not in found:
            raise ExportError(
                f"export: the checkpoint lacks {unit}.{tensor}; it was written for another "
                "model (compare model.* with the run's config)"
            )
        weights[key] = found[tensor]
    load_weights(net, weights)
    return net.eval()


def load_weights(net: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict) with a mismatch said in one line (the first problem, the fix)."""
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ExportError(
            f"export: the weights do not fit the model the config describes ({detail[:300]}); "
            "pass the config the model was trained with (model.*, data.name)"
        ) from None


# -- what a run saved: its checkpoint ---------------------------------------------------------
def load_run(path: str | Path) -> tuple[dict[str, Any], Location]:
    """(checkpoint, where it was found) of a checkpoint file, a run's checkpoint directory (its
    newest good checkpoint) or a run folder (train.out_dir/<rule>: its checkpoints/)."""
    where = storage.location(path)
    if storage.kind(where) == "dir" and not checkpoint_store.checkpoints(where):
        inner = storage.join(where, "checkpoints")
        if not checkpoint_store.checkpoints(inner):
            raise ExportError(
                f"export: {where} holds no checkpoints (ckpt-*.pt, here or in checkpoints/); "
                "pass a checkpoint file, a run's checkpoints directory or its run folder "
                "(train.out_dir/<rule>)"
            )
        where = inner
    return checkpoint_store.load(where), where


def config_toml(config: dict[str, dict[str, Any]]) -> str:
    """A resolved config (config_to_dict, as a checkpoint or metrics.json holds it) as TOML
    that reads back as the same config."""
    lines: list[str] = []
    for section, values in config.items():
        lines += ["", f"[{section}]"] if lines else [f"[{section}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


# -- the files --------------------------------------------------------------------------------
def torchvision_mismatch(cfg: Config) -> list[str]:
    """How `cfg.model` differs from torchvision's model of the same name (empty: it does not)."""
    m, (channels, _, _), why = cfg.model, data_shape(cfg.data)[0], []
    if m.name not in TORCHVISION:
        built = ", ".join(n for n in TORCHVISION if n in MODELS)
        why.append(f'model.name = "{m.name}" (torchvision builds {built})')
    if m.form != "imagenet":
        why.append(
            'model.form = "cifar" (a 3x3 stride-1 stem without max-pool; torchvision has the '
            "7x7 stride-2 stem and the max-pool)"
        )
    if m.width != 64:
        why.append(f"model.width = {m.width} (torchvision's is 64)")
    if not m.batchnorm:
        why.append("model.batchnorm = false (torchvision has BatchNorm after every conv)")
    if m.act != "relu":
        why.append(f'model.act = "{m.act}" (torchvision uses relu)')
    if channels != 3:
        why.append(f"{channels}-channel inputs ({cfg.data.name}; torchvision's stem takes 3)")
    return why


def check_torchvision(cfg: Config, net: PlainNet) -> None:
    """Refuse the torchvision format unless torchvision.models.<name> loads `net`'s weights
    with strict=True and computes the same logits (both in float32: a bf16 run's weights are
    float32, and autocast is the user's choice again)."""
    why = torchvision_mismatch(cfg)
    fix = "use --format state_dict (it loads into driver.run.export.plain_model's module)"
    if why:
        raise ExportError(
            f"export: --format torchvision needs torchvision's own architecture; this model "
            f"differs: {'; '.join(why)}; {fix}"
        )
    import torchvision

    weights = net.state_dict()
    theirs = getattr(torchvision.models, cfg.model.name)(num_classes=weights["fc.weight"].shape[0])
    theirs = theirs.to(weights["fc.weight"].dtype).eval()
    try:
        theirs.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ExportError(
            f"export: torchvision's {cfg.model.name} refuses the weights ({first}); {fix}"
        ) from None
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    probe = probe.to(weights["fc.weight"].dtype)
    precision, net.precision = net.precision, None
    try:
        with torch.no_grad():
            ours, tv = net(probe), theirs(probe)
    finally:
        net.precision = precision
    if not torch.allclose(ours, tv, rtol=1e-4, atol=1e-5):
        gap = float((ours - tv).abs().max())
        raise ExportError(
            f"export: torchvision's {cfg.model.name} loads the weights but computes other logits "
            f"(max difference {gap:.3g}); {fix}"
        )


def export_tensors(
    cfg: Config,
    state: dict[str, Any],
    fmt: str,
    *,
    with_synapses: bool = False,
    with_aux_heads: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors `fmt` writes: the plain module's state dict; with `with_synapses` also every
    error synapse (a layer's feedback E, skip synapses) and with `with_aux_heads` every
    auxiliary head, each under "reclra.<unit>.<tensor>" (load the rest with strict=True)."""
    if fmt not in FORMATS:
        raise ExportError(f"export: unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "torchvision" and (with_synapses or with_aux_heads):
        raise ExportError(
            "export: torchvision's model has no place for error synapses or auxiliary heads; "
            "use --format state_dict or safetensors with --with-synapses / --with-aux-heads"
        )
    net = plain_model(cfg, state)
    if fmt == "torchvision":
        check_torchvision(cfg, net)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    used = set(net.sources.values())
    for unit, entry in sorted(_units(state).items()):
        aux = unit.startswith("aux.")
        if (with_aux_heads and aux) or (with_synapses and not aux):
            for key, value in entry["tensors"].items():
                if (unit, key) not in used:
                    tensors[f"{EXTRA}{unit}.{key}"] = value.detach().contiguous()
    return tensors


def default_out(found: Location, fmt: str) -> Location:
    """Where an export goes by default: model.pt (model.safetensors) in the run folder, the
    folder above a run's checkpoints directory (else beside the checkpoint)."""
    folder = found if storage.kind(found) == "dir" else _parent(found)
    if storage.name(folder) == "checkpoints":
        folder = _parent(folder)
    return storage.join(folder, "model.safetensors" if fmt == "safetensors" else "model.pt")


def _parent(where: Location) -> Location:
    return where.parent if isinstance(where, Path) else where.rsplit("/", 1)[0]


def sidecar(weights: Location) -> Location:
    """The config file beside an export: model.pt -> model.toml."""
    text = str(weights)
    stem = text.rsplit(".", 1)[0] if "." in storage.name(weights) else text
    return storage.location(stem + ".toml")


def encode(tensors: dict[str, torch.Tensor], fmt: str) -> bytes:
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata={"format": "pt"})  # type: ignore[no-any-return]
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def export(
    path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    with_synapses: bool = False,
    with_aux_heads: bool = False,
) -> tuple[Location, Location]:
    """`reclra export`: the model of a checkpoint, checkpoint directory or run folder written
    as `fmt` at `out` (default: default_out), its recorded config beside it (sidecar).
    Returns (weights, config file)."""
    if fmt not in FORMATS:
        raise ExportError(f"export: unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    state, found = load_run(path)
    recorded = config_toml(state["config"])
    cfg = recorded_config(recorded)
    tensors = export_tensors(
        cfg, state, fmt, with_synapses=with_synapses, with_aux_heads=with_aux_heads
    )
    target = storage.location(out) if out is not None else default_out(found, fmt)
    storage.write_bytes(target, encode(tensors, fmt))
    beside = sidecar(target)
    storage.write_bytes(beside, recorded.encode())
    return target, beside


def recorded_config(text: str, overrides: list[str] | None = None) -> Config:
    """The Config of a run's recorded config (config_toml), with `overrides` (--set) on top."""
    return parse_config(text, overrides, source="the run's recorded config")
