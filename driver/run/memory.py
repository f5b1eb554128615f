"""A run's memory, estimated from its config before anything is built (the service refuses a
run whose estimate exceeds its budget: "Memory estimate" in docs/service.md).

Nothing is allocated: the model's blocks are built on torch's `meta` device (shapes, no
storage) and everything else is counted from shapes. Per process (one for a run in this
process; the driver and each stage on Ray) the estimate is what stays resident (the process
baseline, the dataset, weights, error synapses, optimizer state) plus the largest of the
phases that come and go (a training step: gradients, the activations kept for the learn, the
learn's own tensors, kernel workspace, the batch; an evaluation batch; a checkpoint's copies
and serialization; the weight mirror's noise; loading the data). What each phase holds is
read off the code that runs it: Block.forward_local and the autograd graph (what a stage
caches), workers/optim.py (moments), driver/run/checkpointing.py (state copy, bytes buffer),
driver/data (what each dataset keeps in memory). bench/memory.py measures the estimate
against peak RSS.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from driver.config import Config
from driver.config.data import DataConfig
from driver.data.load import DIGITS_HELD, SYNTHETIC_CLASSES
from driver.pipeline.partition import best_partition
from driver.pipeline.plan import window
from driver.pipeline.schedule import warmup
from workers.allocator import MMAP_THRESHOLD
from workers.aux_heads import aux_blocks
from workers.blocks import Block
from workers.layers import Conv, Layer, PooledHead
from workers.mirror import CHUNK
from workers.models import model_plan
from workers.rules import Rule, make_rule, rule_chained, rule_decoupled
from workers.synapses import SkipSynapse

MIB, GIB = 1 << 20, 1 << 30
DTYPE_BYTES = {"float32": 4, "float64": 8}

# Peak RSS of the smallest run (ResNet-8 of width 2 on 1x8x8 synthetic images, batch 4: its
# tensors are a few KiB), 729 MiB measured, rounded up: python, torch and the run's modules
# imported, the torch.optim import of building an optimizer (torch._dynamo, sympy) and the
# kernels' code and thread pools of a first step. Measured with torch 2.14 (+cu130 wheel) on
# Linux x86-64, Python 3.11 (bench/memory.py, as VmHWM: getrusage's ru_maxrss, used before,
# carries the forking parent's peak into the child and had read 991 MiB); about half of it
# is shared libraries mapped in (RssFile).
BASELINE_BYTES = 760 * MIB
# what loading each dataset imports on top (measured alike): scikit-learn for digits,
# torchvision's transforms for the files read from data.root
IMPORT_BYTES = {"digits": 105 * MIB, "synthetic": 0}
TORCHVISION_BYTES = 190 * MIB
# not measured here (no Ray run in the benchmark): a Ray stage's worker process, and the
# raylet, GCS and object store a run started on a local Ray
RAY_WORKER_BYTES = BASELINE_BYTES + 100 * MIB
RAY_SYSTEM_BYTES = 512 * MIB
# a file of an ImageFolder index (path string, tuple, class) and the images a class holds
# when the folder is not counted (ImageNet-1k: 1,281,167 train, 50,000 val, 1,000 classes)
IMAGENET_ENTRY_BYTES = 300
IMAGENET_PER_CLASS = 1_332
IMAGENET_CLASSES = 1000
EVAL_BATCH = 256  # evaluation batches: max(train.batch_size, this) (driver/run/run_log.py)


# the parts, in the order describe() lists them
ORDER = (
    "baseline",
    "data",
    "weights",
    "error synapses",
    "optimizer",
    "gradients",
    "activations",
    "learn",
    "workspace",
    "batch",
    "evaluation",
    "weight mirror",
    "checkpoint",
    "loading data",
    "kept by malloc",
    "ray",
)


@dataclass(frozen=True)
class ProcessMemory:
    """One process's memory: what stays `resident` the whole run, and `phases` that come and
    go (each a dict of parts on top of the resident ones; the largest counts). Parts named in
    `on_gpu` live on the GPU (cuda runs) and are not in the host total."""

    name: str
    resident: dict[str, int]
    phases: dict[str, dict[str, int]]
    on_gpu: frozenset[str] = frozenset()

    @property
    def peak_phase(self) -> str:
        """The phase at which the process holds the most host memory."""
        return max(self.phases, key=lambda p: self._host(self.phases[p]), default="")

    @property
    def parts(self) -> dict[str, int]:
        """Resident parts and those of the peak phase, by name (host and GPU)."""
        out = dict(self.resident)
        for name, size in self.phases.get(self.peak_phase, {}).items():
            out[name] = out.get(name, 0) + size
        return out

    @property
    def total(self) -> int:
        """Peak host bytes."""
        return self._host(self.parts)

    @property
    def gpu(self) -> int:
        """Peak GPU bytes (0 on CPU): the resident GPU parts plus the largest phase's."""
        resident = sum(v for k, v in self.resident.items() if k in self.on_gpu)
        phase = max(
            (sum(v for k, v in p.items() if k in self.on_gpu) for p in self.phases.values()),
            default=0,
        )
        return resident + phase

    def _host(self, parts: dict[str, int]) -> int:
        return sum(v for k, v in parts.items() if k not in self.on_gpu)


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak memory of a whole run: every process at its own peak (the driver and,
    on Ray, each stage), plus Ray's own processes when the run uses Ray."""

    processes: tuple[ProcessMemory, ...]
    k: int  # stages
    dtype: str
    device: str
    shared: dict[str, int] = field(default_factory=dict)  # Ray's system processes

    @property
    def total(self) -> int:
        """Peak host bytes of the whole run (all processes)."""
        return sum(p.total for p in self.processes) + sum(self.shared.values())

    @property
    def gpu(self) -> int:
        """Peak GPU bytes of the whole run (0 on CPU)."""
        return sum(p.gpu for p in self.processes)

    @property
    def parts(self) -> dict[str, int]:
        """Named parts of the total, summed over the processes (host and GPU)."""
        out: dict[str, int] = {}
        for p in self.processes:
            for name, size in p.parts.items():
                out[name] = out.get(name, 0) + size
        for name, size in self.shared.items():
            out[name] = out.get(name, 0) + size
        order = {name: i for i, name in enumerate(ORDER)}
        return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))

    @property
    def stages(self) -> tuple[ProcessMemory, ...]:
        """The stage processes (Ray), stage order; () for a run in one process."""
        return tuple(p for p in self.processes if p.name.startswith("stage"))

    def describe(self) -> str:
        """One line: the total and its parts in GiB, the phase each process peaks in, and per
        stage on Ray."""
        small = self.total // 100  # parts under 1% of the total are summed as `other`
        shown = {name: size for name, size in self.parts.items() if size > small}
        other = sum(self.parts.values()) - sum(shown.values())
        parts = ", ".join(f"{name} {_gib(size)}" for name, size in shown.items())
        if other >= MIB:
            parts += f", other {_gib(other)}"
        peaks = sorted({p.peak_phase for p in self.processes if p.peak_phase})
        line = f"{self.line()}: {parts} (peak: {', '.join(peaks)})"
        if self.stages:
            each = ", ".join(_gib(p.total) for p in self.stages)
            line += f"; per stage {each} GiB, driver {_gib(self.processes[0].total)} GiB"
        if self.gpu:
            line += f"; on the GPU: {_gib(self.gpu)} GiB"
        return line

    def line(self) -> str:
        """The total alone: `~3.2 GiB (K = 1, float32)`."""
        return f"~{self.total / GIB:.1f} GiB (K = {self.k}, {self.dtype})"


def _gib(n: int) -> str:
    v = n / GIB
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


# -- what the data is -----------------------------------------------------------------------


def data_shape(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """(input shape C x H x W, classes) of the dataset, from the config alone (imagenet: its
    class folders under data.root/train, counted when there; else ImageNet-1k's 1,000)."""
    if cfg.name == "digits":
        return (1, 8, 8), 10
    if cfg.name == "synthetic":
        c, h, w = cfg.synthetic_shape
        return (c, h, w), SYNTHETIC_CLASSES
    if cfg.name in ("mnist", "fashion_mnist"):
        return (1, 28, 28), 10
    if cfg.name == "cifar10":
        return (3, 32, 32), 10
    return (3, cfg.image_size, cfg.image_size), _imagenet_classes(cfg)


def _imagenet_classes(cfg: DataConfig) -> int:
    try:
        with os.scandir(Path(cfg.root) / "train") as it:
            n = sum(1 for e in it if e.is_dir())
    except OSError:
        return IMAGENET_CLASSES
    return n or IMAGENET_CLASSES


def split_sizes(cfg: DataConfig) -> tuple[int, int, int]:
    """Samples in (train, val, test)."""
    if cfg.name == "digits":
        return 1797 - 2 * DIGITS_HELD, DIGITS_HELD, DIGITS_HELD
    if cfg.name == "synthetic":
        n = cfg.synthetic_size
        return n, n // 4, n // 4
    if cfg.name in ("mnist", "fashion_mnist", "cifar10"):
        total, test = (60_000, 10_000) if cfg.name != "cifar10" else (50_000, 10_000)
        train = max(total - cfg.val_size, 1)
        return (cfg.train_size or train), cfg.val_size, test
    classes = _imagenet_classes(cfg)
    train = classes * IMAGENET_PER_CLASS
    return train - train // 50, train // 50, classes * 50


def _data(cfg: DataConfig) -> tuple[int, list[int], int]:
    """(bytes the dataset keeps in memory, the tensors loading it makes and frees, the imports
    on top of the baseline)."""
    per = _numel(data_shape(cfg)[0])
    train, val, test = split_sizes(cfg)
    n = train + val + test
    imports = IMPORT_BYTES.get(cfg.name, TORCHVISION_BYTES)
    if cfg.name == "digits":  # float32 images; sklearn's float64 arrays while loading
        return n * (per * 4 + 8), [1797 * per * 8] * 2, imports
    if cfg.name == "synthetic":  # float32; a split's class means and noise before their sum
        return n * (per * 4 + 8), [train * per * 4] * 2, imports
    if cfg.name in ("mnist", "fashion_mnist"):
        # uint8: the decoded files stay cached (driver/data/mnist.py) beside the split copies;
        # the pixel statistics read them in int64 chunks
        return 70_000 * (per + 1) + n * (per + 8), [8 << 22] * 2, imports
    if cfg.name == "cifar10":
        raw = 60_000 * (per + 8)  # uint8, the splits are views of it
        if cfg.whiten:  # float32 whitened copies; the ZCA fit in float64
            return raw + n * per * 4, [train * per * 8, train * per * 4, train * per * 4], imports
        return raw, [50_000 * per] * 2, imports  # torchvision's stacked batches while reading
    files = n + val  # the ImageFolder indices: train (with val inside) and test
    return files * IMAGENET_ENTRY_BYTES, [], imports


# -- what the model is ----------------------------------------------------------------------


def model_blocks(cfg: Config) -> int:
    """The model's block count (what pipeline.stages cuts between)."""
    shape, classes = data_shape(cfg.data)
    return len(model_plan(cfg.model, shape, classes))


@dataclass
class _Stage:
    """What one stage owns, counted in elements (per sample where it scales with the batch)."""

    weights: int = 0  # forward parameters and BN buffers
    feedback: int = 0  # error synapses: E per layer, skip synapses (and their upsampling)
    trainable: int = 0  # parameters in the optimizer
    grads: int = 0  # .grad buffers
    cache: list[int] = field(default_factory=list)  # per sample: each float tensor a forward
    # keeps for its learn (elements)
    cache_index: list[int] = field(default_factory=list)  # per sample: int64 max-pool indices
    biggest: int = 0  # per sample: the largest activation (elements)
    eval: int = 0  # per sample: an eval forward at its peak (elements)
    workspace: int = 0  # per sample: the largest kernel workspace (im2col, oneDNN)
    mirror: list[int] = field(default_factory=list)  # bytes: the weight mirror's largest layer
    autograd: bool = False  # the rule learns by autograd (backprop, fa, kp, sign)
    input: int = 0  # per sample: the stage's input
    output: int = 0  # per sample: the stage's output


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _equip(block: Block, rule: Rule, classes: int, bottom: bool) -> None:
    """workers/assemble.equip without initialising anything: the error synapses the rule asks
    for, on the meta device."""
    grid = rule.cfg.skip_grid
    with torch.device("meta"):
        for wire in block.wires:
            layer = block.layer(wire.layer)
            mode = rule.feedback_mode(block, wire)
            if wire.src < 0 and bottom:
                mode = None
            layer.feedback_mode = mode
            if mode is not None:  # Layer.add_feedback's E, without empty_like's first-call cost
                e = torch.empty(layer.weight.shape, device="meta")
                layer.feedback = nn.Parameter(e, requires_grad=mode != "fixed")
        for n, node in enumerate(block.node_shapes):
            mode = rule.skip_mode(block, n)
            if mode is not None:
                syn = SkipSynapse(classes, node, grid)
                syn.weight.requires_grad_(mode != "fixed")
                block.skips[str(n)] = syn


def _count(cfg: Config, blocks: list[Block], first: bool, dtype_bytes: int) -> _Stage:
    """Count a stage's blocks (trunk, then any auxiliary ones), equipped on the meta device."""
    autograd = make_rule(cfg.rule).autograd
    st = _Stage(autograd=autograd)
    for block in blocks:
        synapses = [ly.feedback for _, ly in block.layer_items() if ly.feedback is not None]
        synapses += [s.weight for s in _skips(block)]
        ids = {id(p) for p in synapses}
        forward = sum(p.numel() for p in block.parameters() if id(p) not in ids)
        st.weights += forward + sum(
            b.numel() for name, b in block.named_buffers() if not name.endswith(".up")
        )
        st.trainable += forward
        st.grads += forward
        for _, layer in block.layer_items():
            if layer.feedback is None:
                continue
            st.feedback += layer.feedback.numel()
            if layer.feedback_mode in ("kp", "local"):
                st.trainable += layer.feedback.numel()
            if layer.feedback_mode == "local":  # a KP synapse shares its layer's .grad
                st.grads += layer.feedback.numel()
        for syn in _skips(block):
            st.feedback += syn.weight.numel() + (syn.up.numel() if syn.up is not None else 0)
            if syn.weight.requires_grad:
                st.trainable += syn.weight.numel()
                st.grads += syn.weight.numel()
        _activations(block, st, autograd, dtype_bytes)
    st.input = _numel(blocks[0].in_shape)
    trunk = [b for b in blocks if not b.name.startswith("aux.")]
    st.output = _numel(trunk[-1].out_shape)
    if not first or dtype_bytes != 4 or cfg.rule.input_noise > 0:
        st.cache.append(st.input)  # a cast, noisy or received input: a tensor of its own
    return st


def _skips(block: Block) -> list[SkipSynapse]:
    return [s for s in block.skips.values() if isinstance(s, SkipSynapse)]


def _activations(block: Block, st: _Stage, autograd: bool, dtype_bytes: int) -> None:
    """Per-sample elements a training forward keeps of the block (Block.forward_local's
    BlockCache; for autograd rules, what the graph saves), its learn's and an eval forward's
    peaks, and the largest kernel workspace."""
    nodes = [_numel(s) for s in block.node_shapes]
    for n, size in enumerate(nodes):
        bn = sum(1 for w in block.wires_into[n] if block.layer(w.layer).bn is not None)
        kept_z = block.acts[n] != "identity"
        # autograd: BN saves W z, the activation its output; local: h and z (one tensor under
        # the identity) and each BN layer's W z
        st.cache += [size] * (bn + kept_z + (0 if autograd else 1))
    if block.head and len(block.in_shape) == 3:
        st.cache.append(block.in_shape[0])  # the pooled features
    if block.out_pool:
        st.cache.append(_numel(block.out_shape))
        st.cache_index.append(_numel(block.out_shape))
    st.biggest = max([st.biggest, *nodes, _numel(block.in_shape)])
    # eval: the block's input, every node, and a layer's W z and BN output in flight
    st.eval = max(st.eval, _numel(block.in_shape) + sum(nodes) + 2 * max(nodes))
    for wire in block.wires:
        layer = block.layer(wire.layer)
        src = block.in_shape if wire.src < 0 else block.node_shapes[wire.src]
        out = block.node_shapes[wire.tgt]
        st.workspace = max(st.workspace, _workspace(layer, src, out, dtype_bytes))
        if layer.feedback is not None and layer.feedback_mode in ("kp", "local"):
            sizes = _mirror_sizes(layer, src, out, dtype_bytes)
            if sum(sizes) > sum(st.mirror):
                st.mirror = sizes


def _cost(block: Block) -> int:
    """Multiply-adds per sample of the block's layers (what the balanced cut weighs)."""
    total = 0
    for wire in block.wires:
        out = block.node_shapes[wire.tgt]
        total += block.layer(wire.layer).weight.numel() * (_numel(out[1:]) if len(out) == 3 else 1)
    return total


def _workspace(layer: Layer, src: tuple[int, ...], out: tuple[int, ...], dtype_bytes: int) -> int:
    """Per-sample elements of a conv kernel's scratch: float64 convolutions run torch's own
    im2col kernel (a C_in k^2 x H_out W_out column matrix per sample, for the whole batch);
    float32 ones run oneDNN, whose scratch measured about twice the larger of input and
    output."""
    if not isinstance(layer, Conv) or len(src) != 3:
        return 0
    if dtype_bytes == 8:
        k = layer.weight.shape[-1]
        return src[0] * k * k * _numel(out[1:])
    return 2 * max(_numel(src), _numel(out))


def _mirror_sizes(
    layer: Layer, src: tuple[int, ...], out: tuple[int, ...], dtype_bytes: int
) -> list[int]:
    """Bytes of the tensors of one weight-mirror estimate (workers/mirror.py): a chunk of noise,
    the layer's response to it, its kernel's workspace, and the estimate, its sum and the
    update (weight-sized)."""
    pooled = isinstance(layer, PooledHead) and len(src) == 3
    shape = (src[0],) if pooled else src
    per_chunk = max(1, CHUNK // _numel(shape))
    ws = _workspace(layer, src, out, dtype_bytes)
    chunk = [per_chunk * n * dtype_bytes for n in (_numel(shape), _numel(out), ws) if n]
    return chunk + [layer.weight.numel() * dtype_bytes] * 3


def _stages(cfg: Config, k: int) -> list[_Stage]:
    """Each stage counted, cut at pipeline.boundaries or where the blocks' multiply-adds
    balance (the run profiles the blocks instead, so its cut may differ by a block)."""
    shape, classes = data_shape(cfg.data)
    dtype_bytes = DTYPE_BYTES[cfg.train.dtype]
    with torch.device("meta"):
        plan = [make() for _, make in model_plan(cfg.model, shape, classes)]
    n = len(plan)
    k = min(k, n)
    if k == 1:
        bounds: tuple[int, ...] = (0, n)
    elif len(cfg.pipeline.boundaries) == k - 1:
        bounds = (0, *cfg.pipeline.boundaries, n)
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(
                f"pipeline.boundaries: {list(cfg.pipeline.boundaries)} must rise strictly "
                f"between 0 and the model's {n} blocks"
            )
    else:
        bounds = best_partition([float(_cost(b)) for b in plan], k)
    chained = rule_chained(cfg.rule)
    decoupled = rule_decoupled(cfg.rule)
    out = []
    for a, b in itertools.pairwise(bounds):
        rule = make_rule(cfg.rule)
        rule.stage_top = plan[b - 1].name if b < n else None
        blocks = plan[a:b]
        for i, block in enumerate(blocks, start=a):
            _equip(block, rule, classes, bottom=i == 0 or (i == a and not chained))
        if decoupled and b < n:  # the stage's auxiliary head (and decoder)
            top = blocks[-1]
            with torch.device("meta"):
                aux = aux_blocks(top, blocks[0].in_shape, classes, cfg.rule, cfg.model)
            for block in [*aux.head, *aux.recon]:
                _equip(block, rule, classes, bottom=False)
            blocks = [*blocks, *aux.head, *aux.recon]
        out.append(_count(cfg, blocks, a == 0, dtype_bytes))
    return out


# -- the estimate ---------------------------------------------------------------------------

# A training step's own tensors beyond what the forward cached, in units of the micro-batch's
# largest activation: the displacements, errors, BN backward and carried errors of the learn,
# and, where those tensors come from malloc's heap (under its 32 MiB mmap threshold), the heap
# they fragment over the first steps. Fitted on ResNet-8 and ResNet-18 at 32x32
# (bench/memory.py and its notes): under the threshold the peak above the cache measured 19-26
# units for the local rules and 13-23 for autograd (float64's im2col workspace included, which
# _workspace counts apart); over it, 10-12 and 9-11 (workspace included). Rounded up.
LEARN_UNITS = {  # (under the threshold, over it)
    "local": (20, 11),
    "autograd": (13, 9),
}
Phase = dict[str, list[int]]  # part -> the bytes of each of its tensors


def estimate_memory(cfg: Config, *, stages: int | None = None) -> MemoryEstimate:
    """The run's estimated peak memory, without allocating the model. `stages`: the stage
    count to assume where pipeline.stages is "auto" (default 1, one process)."""
    pc, tc = cfg.pipeline, cfg.train
    k = stages if stages is not None else (pc.stages if isinstance(pc.stages, int) else 1)
    counted = _stages(cfg, k)
    k = len(counted)
    db = DTYPE_BYTES[tc.dtype]
    device = tc.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    train_n, val_n, test_n = split_sizes(cfg.data)
    per_input = _numel(data_shape(cfg.data)[0])
    batch = min(tc.batch_size, train_n)
    micro = math.ceil(batch / pc.micro_batches)
    evalb = min(max(tc.batch_size, EVAL_BATCH), max(val_n, test_n, 1))
    data, loading, imports = _data(cfg.data)
    # the training batch as collated (float32), and what loader workers have prefetched
    batches = [batch * per_input * 4] * (1 + 2 * cfg.data.num_workers)
    eval_batch = [evalb * per_input * 4] + ([evalb * per_input * db] if db != 4 else [])
    ray = pc.backend == "ray" or (pc.backend == "auto" and k > 1)
    decoupled = rule_decoupled(cfg.rule)
    w = window(pc, k)
    stream = pc.micro_batches if pc.schedule == "sync" else 1 << 30

    def cached(s: int) -> int:
        """Micro-batches stage s holds between its forwards and their learns, at most."""
        if k == 1 or s == k - 1 or decoupled:
            return 1
        return warmup(s, w, stream) if ray else min(w, pc.micro_batches)

    states = [_state_bytes(cfg, st, db) for st in counted]
    initial = [db * (st.weights + st.feedback) for st in counted]  # the checkpoint at start
    resident: list[dict[str, int]] = []
    steps: list[Phase] = []
    evals: list[Phase] = []
    for s, st in enumerate(counted):
        resident.append(
            {
                "weights": db * st.weights,
                "error synapses": db * st.feedback,
                "optimizer": db * st.trainable * _moments(cfg),
            }
        )
        acts = [micro * db * n for n in st.cache] + [micro * 8 * n for n in st.cache_index]
        acts *= cached(s)
        if tc.diagnose_every > 0:  # the probe's own autograd forward and gradient sums
            acts += [micro * db * n for n in st.cache] + [db * st.weights]
        unit = micro * db * st.biggest
        units = LEARN_UNITS["autograd" if st.autograd else "local"][unit >= MMAP_THRESHOLD]
        steps.append(
            {
                "gradients": [db * st.grads],
                "activations": acts,
                "learn": [unit] * units,
                "workspace": [micro * db * st.workspace],
            }
        )
        evals.append(
            {
                "evaluation": [evalb * db * st.biggest] * _units(st.eval, st.biggest)
                + [evalb * db * st.workspace]
            }
        )
    mirrors = [st.mirror if cfg.rule.mirror_angle > 0 else [] for st in counted]
    gpu = frozenset(GPU_PARTS if device == "cuda" else ())
    base = {"baseline": BASELINE_BYTES + imports, "data": data}
    if not ray:  # one process: the driver's part and every stage's, run one after the other
        own = dict(base)
        step: Phase = {"batch": batches + ([micro * per_input * db] if db != 4 else [])}
        step.update(_in_flight(cfg, sum(states)))
        for res, part in zip(resident, steps, strict=True):
            _add(own, res)
            for name in ("gradients", "activations"):  # every stage holds its own
                step[name] = step.get(name, []) + part[name]
        for name in ("learn", "workspace"):  # one stage learns at a time
            step[name] = max((p[name] for p in steps), key=sum)
        mirror = max(mirrors, key=sum)
        phases = [
            ("loading data", {"loading data": loading}),
            ("weight mirror", {"weight mirror": mirror, **_at_start(cfg, sum(initial))}),
            ("training step", step),
            ("evaluation", {"batch": eval_batch, **max(evals, key=lambda p: sum(p["evaluation"]))}),
            ("checkpoint", _checkpoint(sum(states))),
        ]
        run = _process("run", own, phases, gpu)
        return MemoryEstimate((run,), k, tc.dtype, device)
    driver = _process(
        "driver",
        base,
        [
            ("loading data", {"loading data": loading}),
            ("checkpoint at start", _at_start(cfg, sum(initial))),
            ("training step", {"batch": batches, **_in_flight(cfg, sum(states))}),
            ("evaluation", {"batch": eval_batch}),
            ("checkpoint", _checkpoint(sum(states))),  # the stages' states, gathered
        ],
    )
    procs = [driver]
    for s, st in enumerate(counted):
        moving = micro * db * (st.input + st.output)  # a micro-batch's input and output sent
        step = {**steps[s], "batch": [moving] * cached(s)}
        phases = [
            ("weight mirror", {"weight mirror": mirrors[s]}),
            ("training step", step),
            ("evaluation", {**evals[s], "batch": [evalb * db * (st.input + st.output)]}),
            ("checkpoint", {"checkpoint": [states[s]]}),  # its state copied for the driver
        ]
        own = {"baseline": RAY_WORKER_BYTES, **resident[s]}
        procs.append(_process(f"stage {s}", own, phases, gpu))
    shared = {"ray": RAY_SYSTEM_BYTES} if not cfg.cluster.address else {}
    return MemoryEstimate(tuple(procs), k, tc.dtype, device, shared)


GPU_PARTS = (  # on a cuda run, what lives on the GPU
    "weights",
    "error synapses",
    "optimizer",
    "gradients",
    "activations",
    "learn",
    "workspace",
    "evaluation",
    "weight mirror",
)
KEPT = "kept by malloc"  # freed memory the allocator holds for reuse (workers/allocator.py)


def _process(
    name: str,
    resident: dict[str, int],
    phases: list[tuple[str, Phase]],
    gpu: frozenset[str] = frozenset(),
) -> ProcessMemory:
    """A process whose `phases` come one after the other. Tensors under malloc's mmap threshold
    (32 MiB: workers/allocator.py) come from its heap, which keeps what they freed: a phase
    reuses what earlier ones left there, and holds at least that much. Larger ones are mapped
    and returned to the kernel when freed."""
    kept, out = 0, {}
    for phase, parts in phases:
        small = sum(n for sizes in parts.values() for n in sizes if n < MMAP_THRESHOLD)
        flat = {part: sum(sizes) for part, sizes in parts.items() if sum(sizes)}
        if kept > small:
            flat[KEPT] = kept - small
        if flat:
            out[phase] = flat
        kept = max(kept, small)
    return ProcessMemory(name, resident, out, gpu)


def _units(n: int, unit: int) -> int:
    return max(1, math.ceil(n / max(unit, 1)))


def _add(into: dict[str, int], parts: dict[str, int]) -> None:
    for name, size in parts.items():
        into[name] = into.get(name, 0) + size


def _moments(cfg: Config) -> int:
    """Optimizer tensors per parameter: AdamW's two moments, SGD's momentum buffer."""
    if cfg.optim.name == "adamw":
        return 2
    return 1 if cfg.optim.momentum > 0 else 0


def _state_bytes(cfg: Config, st: _Stage, db: int) -> int:
    """A stage's checkpoint state: weights, synapses, BN buffers and optimizer moments."""
    return db * (st.weights + st.feedback + st.trainable * _moments(cfg))


def _checkpoint(state: int) -> Phase:
    """A checkpoint being written: the state's copy (tensor by tensor), the serialized bytes
    and their copy (driver/run/checkpoint_store.py: BytesIO, getvalue)."""
    return {"checkpoint": [state, state, state]} if state else {}


def _at_start(cfg: Config, initial: int) -> Phase:
    """The checkpoint at the start (weights and synapses: no optimizer state yet), written in
    the background as training begins, when restarts need one."""
    return _checkpoint(initial) if cfg.train.max_restarts else {}


def _in_flight(cfg: Config, state: int) -> Phase:
    """A checkpoint every train.checkpoint_every steps, written while training goes on."""
    return _checkpoint(state) if cfg.train.checkpoint_every else {}
