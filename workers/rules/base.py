"""The learning-rule interface, its config, the error signal between stages, the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

import torch

from workers.bounds import Limits, check_bounds
from workers.rules.recipes import PRESETS, label

if TYPE_CHECKING:
    from workers.blocks import Block, Wire

Topology = Literal["skip", "mirror", "adjacent", "stage", "decoupled"]
AuxHead = Literal["linear", "pointwise", "conv", "conv2"]
SynapseUpdate = Literal["kp", "local", "fixed"]
Init = Literal["gaussian", "kaiming", "xavier", "orthogonal", "zeros"]
TOPOLOGIES = get_args(Topology)
FEEDBACK_UPDATES = SKIP_UPDATES = get_args(SynapseUpdate)
INITS = get_args(Init)
AUX_HEADS = get_args(AuxHead)


@dataclass(frozen=True, kw_only=True)
class RuleConfig:
    """How layers learn. Every [choice] of ALGORITHM.md is a key here, with its default."""

    name: str = "rec_lra"
    """The learning rule: rec_lra, lra_e, backprop, kp, sign, fa or dfa (workers/rules)."""
    preset: str = ""
    """A named variant with a recipe of its own (rec_lra: "mirror", the default, or "paper",
    the paper's reading); "" is the rule's default."""
    topology: Topology = "mirror"
    """rec_lra's error path: mirror (follows the forward skips), adjacent, skip (junctions fed
    from e_L through skip synapses: stages learn in parallel), stage (mirror inside a stage),
    decoupled (mirror inside a stage, whose top learns from an auxiliary head of its own on the
    labels: nothing crosses a stage boundary backwards; the `decoupled` preset)."""
    feedback_update: SynapseUpdate = "kp"
    """How adjacent error synapses learn: kp (take W's update), local, fixed."""
    skip_update: SynapseUpdate = "kp"
    """How skip error synapses (from e_L) learn: kp, local, fixed."""
    skip_grid: int = 4
    """A skip synapse maps K classes to a C x g x g grid, upsampled to C x H x W (0: dense)."""
    beta: float = 0.1
    """The target's step: y = act(h - beta * d)."""
    gamma: float = 1.0
    """The error synapses' learning rate, as a multiple of optim.lr."""
    mix_skip: float = 1.0
    """a in e = a(z - y) + (1 - a) sign(z - y) at skip-fed junctions (the paper: 0.19)."""
    mix_adjacent: float = 1.0
    """a in e = a(z - y) + (1 - a) sign(z - y) elsewhere (the paper: 0.24)."""
    reproject: float = 0.0
    """Rescale every update to norm at most this ("Gaussian ball"; 0: off)."""
    input_noise: float = 0.0
    """Standard deviation of Gaussian noise added to the input in training."""
    init: Init = "kaiming"
    """Forward weights' initialisation."""
    init_std: float = 1.0
    """Scales every initialisation."""
    feedback_init: Init = "kaiming"
    """Where fixed and `local` error synapses start."""
    kp_init: Init = "zeros"
    """Where KP synapses start (from zero, E holds exactly what its layer has learned)."""
    head_init: Init = "kaiming"
    """The head's forward weight (and, with "zeros" under KP, its synapse: then E = W)."""
    carry_bn: bool = True
    """Send each layer's error back through its own BatchNorm's batch Jacobian before its
    error synapse (off: E carries the post-BatchNorm error, the fully local variant)."""
    rescale_error: bool = True
    """Divide hidden errors by beta, e = (z - y) / beta ~ act'(h) d, so they keep their scale
    down a chain (off: e = z - y)."""
    mirror_angle: float = 10.0
    """Weight mirror: at its first forward each stage sets every learning error synapse to an
    estimate of W from its own layer's response to noise, this many degrees from W (0: off)."""
    mirror_every: int = 0
    """Weight mirror: move E toward a fresh estimate every N optimizer steps (0: never)."""
    mirror_rate: float = 0.5
    """Weight mirror: how far each interleaved estimate moves E (1: all the way)."""
    aux_head: AuxHead = "conv2"
    """decoupled: the auxiliary head on each stage's output below the top. linear: pooled
    features to the classes; pointwise: 1x1 conv (2C), BN, act, pool, linear; conv: 3x3 conv
    (2C, stride 2 while the map is 8 or more wide), BN, act, pool, linear (InfoPro's head without
    its hidden dense layer); conv2: conv then a second 3x3 conv at the same width (chosen on
    validation: docs/algorithm.md#decoupled-stages)."""
    aux_recon: float = 0.0
    """decoupled: weight of an information-preserving term (after InfoPro): a 3x3 conv decoder
    on the stage's output reconstructs the network's input, average-pooled to the output's
    size, and its error joins the head's at the stage's top (0: off)."""

    # each numeric key's closed range (workers/bounds.py); mirror_angle < 45 and
    # mirror_rate > 0 are checked below. skip_grid: a grid finer than the largest image is moot.
    LIMITS: ClassVar[Limits] = {
        "skip_grid": (0, 1024),
        "beta": (0.0, 100.0),
        "gamma": (0.0, 100.0),
        "mix_skip": (0.0, 1.0),
        "mix_adjacent": (0.0, 1.0),
        "reproject": (0.0, 10000.0),
        "input_noise": (0.0, 100.0),
        "init_std": (0.0, 100.0),
        "mirror_angle": (0.0, 45.0),
        "mirror_every": (0, 10**12),
        "mirror_rate": (0.0, 1.0),
        "aux_recon": (0.0, 100.0),
    }

    @property
    def label(self) -> str:
        """The variant's name in tables and run folders: rec_lra, rec_lra_paper, backprop..."""
        return label(self.name, self.preset)

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(
                f"rule.name: unknown rule {self.name!r}; choose one of {sorted(RULES)}"
            )
        presets = PRESETS.get(self.name, ())
        if self.preset and self.preset not in presets:
            have = f"one of {list(presets)}" if presets else "none"
            raise ValueError(
                f"rule.preset: {self.name} has no preset {self.preset!r} (presets: {have}); "
                "drop the key or pick one"
            )
        for key, value, allowed in (
            ("topology", self.topology, TOPOLOGIES),
            ("feedback_update", self.feedback_update, FEEDBACK_UPDATES),
            ("skip_update", self.skip_update, SKIP_UPDATES),
            ("init", self.init, INITS),
            ("feedback_init", self.feedback_init, INITS),
            ("head_init", self.head_init, INITS),
            ("kp_init", self.kp_init, INITS),
            ("aux_head", self.aux_head, AUX_HEADS),
        ):
            if value not in allowed:
                raise ValueError(f"rule.{key}: {value!r} is not one of {list(allowed)}")
        if self.init == "zeros":
            raise ValueError(
                "rule.init: forward weights cannot start at zero; "
                "use kaiming, gaussian, xavier or orthogonal"
            )
        for key in ("carry_bn", "rescale_error"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"rule.{key}: must be true or false, got {getattr(self, key)!r}")
        if self.feedback_init == "zeros":
            raise ValueError(
                "rule.feedback_init: a fixed or `local` synapse that starts at zero never "
                "carries an error; use kaiming (rule.kp_init sets where KP synapses start)"
            )
        for key in ("mix_skip", "mix_adjacent"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"rule.{key}: must lie in [0, 1], got {getattr(self, key)}")
        for key in ("beta", "gamma", "input_noise", "init_std", "aux_recon"):
            if getattr(self, key) < 0:
                raise ValueError(f"rule.{key}: must be >= 0, got {getattr(self, key)}")
        if self.reproject < 0:
            raise ValueError(f"rule.reproject: must be >= 0 (0 turns it off), got {self.reproject}")
        if not 0.0 <= self.mirror_angle < 45.0:
            raise ValueError(
                f"rule.mirror_angle: must lie in [0, 45) degrees (0 turns the weight mirror "
                f"off), got {self.mirror_angle}"
            )
        if self.mirror_every < 0:
            raise ValueError(f"rule.mirror_every: must be >= 0 (0: never), got {self.mirror_every}")
        if self.mirror_every and not self.mirror_angle:
            raise ValueError("rule.mirror_every: needs rule.mirror_angle > 0 (how much noise)")
        if not 0.0 < self.mirror_rate <= 1.0:
            raise ValueError(f"rule.mirror_rate: must lie in (0, 1], got {self.mirror_rate}")
        if self.skip_grid < 0:
            raise ValueError(f"rule.skip_grid: must be >= 0 (0 means dense), got {self.skip_grid}")
        check_bounds("rule", self, self.LIMITS)


@dataclass
class ErrorSignal:
    """What one stage hands the stage below after learning a micro-batch.

    `labels` goes to the last stage; `output_error` (e_L, B x K) is broadcast to every stage;
    `boundary` is the signal at the stage's input: a displacement for target rules, a gradient
    for autograd rules. Only what the rule needs is filled in. `true_grad` travels only while
    diagnostics probe a micro-batch, and never reaches a learning rule.
    """

    labels: torch.Tensor | None = None
    output_error: torch.Tensor | None = None
    boundary: torch.Tensor | None = None
    true_grad: torch.Tensor | None = None  # diagnostics only: backprop's gradient at the boundary


class Rule:
    """A learning rule. Subclasses live one per module in workers/rules and register by name.

    A rule decides which error synapses exist and how they learn, where each node's learning
    signal comes from, and how a node turns its displacement into an error.
    """

    name: ClassVar[str] = ""
    autograd: ClassVar[bool] = False  # True: stage-local autograd with a boundary gradient

    def __init__(self, cfg: RuleConfig) -> None:
        self.cfg = cfg
        # the top block of the stage this rule instance serves, when a stage above it exists
        # (set by the Stage; the `stage` topology feeds that block's output from e_L)
        self.stage_top: str | None = None

    @classmethod
    def is_decoupled(cls, cfg: RuleConfig) -> bool:
        """Whether every stage below the top learns from an auxiliary head of its own on the
        labels (and so needs the labels, and sends nothing down)."""
        return False

    @classmethod
    def is_chained(cls, cfg: RuleConfig) -> bool:
        """Whether a stage's learn needs the boundary from the stage above (False: every stage
        learns from the output error alone). A class method: the config answers it, so the
        pipeline need not build a rule to know how signals flow."""
        return True

    def feedback_mode(self, block: Block, wire: Wire) -> str | None:
        """How the layer's error synapse E learns ("kp", "local", "fixed"); None: no synapse."""
        return None

    def skip_mode(self, block: Block, node: int) -> str | None:
        """How the node's skip synapse from e_L learns ("kp", "local", "fixed"); None: none."""
        return None

    def uses_identity(self) -> bool:
        """Whether identity shortcuts carry errors back (the `mirror` topology)."""
        return False

    def mix(self, block: Block, node: int) -> float:
        """a in e = a(z - y) + (1 - a) sign(z - y)."""
        return 1.0

    def node_error(
        self, h: torch.Tensor, z: torch.Tensor, d: torch.Tensor, act: str, mix: float
    ) -> torch.Tensor:
        """The node's error unit: target y = act(h - beta d), e = a(z - y) + (1 - a) sign(z - y)."""
        y = torch.sub(h, d, alpha=self.cfg.beta)  # one new tensor, then in place
        if act == "relu":
            y.clamp_min_(0.0)
        elif act == "tanh":
            y.tanh_()
        diff = torch.sub(z, y, out=y)
        if self.cfg.rescale_error and self.cfg.beta > 0:
            diff.mul_(1.0 / self.cfg.beta)
        if mix >= 1.0:
            return diff
        return torch.sign(diff).mul_(1.0 - mix).add_(diff, alpha=mix)


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    RULES[cls.name] = cls
    return cls


def make_rule(cfg: RuleConfig) -> Rule:
    return RULES[cfg.name](cfg)


def rule_chained(cfg: RuleConfig) -> bool:
    """Rule.is_chained of the rule `cfg` names, without building it."""
    return RULES[cfg.name].is_chained(cfg)


def rule_decoupled(cfg: RuleConfig) -> bool:
    """Rule.is_decoupled of the rule `cfg` names, without building it."""
    return RULES[cfg.name].is_decoupled(cfg)
