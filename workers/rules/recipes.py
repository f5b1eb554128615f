"""Each rule's own recipe: the rule and optimizer settings it trains with unless a config says
otherwise. Chosen per rule on Fashion-MNIST validation data (ResNet-8, 20,000 training images,
4 epochs: docs/results.md); the dataclass defaults of RuleConfig and OptimConfig are rec-LRA's
recipe, and a test keeps the two the same.

A rule may have presets: named variants, each with a recipe of its own, one key away
(`rule.preset`). A variant's label is the rule's name, plus `_<preset>` for any preset but the
rule's first (default) one: `rec_lra` (the `mirror` preset) and `rec_lra_paper`. Labels name runs,
their folders and the rows of every table, and `train.compare` takes them."""

from __future__ import annotations

from typing import Any

_PLAIN = {  # what a torch user would do: no input noise, no update re-projection, no mirror
    "input_noise": 0.0,
    "mirror_angle": 0.0,
    "reproject": 0.0,
    "head_init": "kaiming",
    "carry_bn": False,
    "rescale_error": False,
    "kp_init": "kaiming",
}

# the presets of each rule that has any; the first is the rule's default
PRESETS: dict[str, tuple[str, ...]] = {"rec_lra": ("mirror", "paper", "decoupled")}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # the `mirror` preset: errors follow the forward skips, carried through each layer's own
    # BatchNorm Jacobian and divided by beta; KP synapses, set by the weight mirror (about 10
    # degrees from W) before the first step. In the limit: Kolen-Pollack backprop
    "rec_lra": {
        "rule": {
            "topology": "mirror",
            "input_noise": 0.0,
            "reproject": 0.0,
            "head_init": "kaiming",
            "carry_bn": True,
            "rescale_error": True,
            "kp_init": "zeros",
            "mirror_angle": 10.0,
        },
        "optim": {"lr": 3e-3, "weight_decay": 1.0},
    },
    # the paper's reading (ALGORITHM.md, [reported]): junctions fed from e_L through skip error
    # synapses, the L1/L2 error mix, input noise, re-projection, Gaussian forward and error
    # weights, beta ~ 0.12 and gamma ~ 0.15, e = z - y with no BatchNorm Jacobian in the carry.
    # Chosen on validation (bench.ablation, docs/algorithm.md): the Gaussians at Kaiming scale
    # (read as unit variance they learned at most 0.48 on the short budget, against 0.68), c
    # (re-projection, not recovered) and the weight decay
    "rec_lra_paper": {
        "rule": {
            "topology": "skip",
            "mix_skip": 0.19,
            "mix_adjacent": 0.24,
            "input_noise": 0.1,
            "reproject": 1.0,
            "init": "kaiming",
            "init_std": 1.0,
            "feedback_init": "kaiming",
            "kp_init": "kaiming",
            "head_init": "kaiming",
            "beta": 0.12,
            "gamma": 0.15,
            "carry_bn": False,
            "rescale_error": False,
            "mirror_angle": 0.0,
        },
        "optim": {"lr": 1e-2, "weight_decay": 1e-4},
    },
    # the parent algorithm as published: e = z - y, KP synapses from a random start
    "lra_e": {
        "rule": {**_PLAIN, "input_noise": 0.1, "reproject": 1.0},
        "optim": {"lr": 1e-2, "weight_decay": 1e-4},
    },
    "backprop": {"rule": dict(_PLAIN), "optim": {"lr": 3e-3, "weight_decay": 1.0}},
    "fa": {"rule": dict(_PLAIN), "optim": {"lr": 1e-2, "weight_decay": 1e-4}},
    "dfa": {"rule": dict(_PLAIN), "optim": {"lr": 1e-2, "weight_decay": 1e-4}},
    # kp and sign: not yet tuned here; the benchmark chooses their lr on validation data.
    # KP needs weight decay to converge (E - gamma*W shrinks by it; the decay of E is matched)
    # (Akrout et al.'s start: E from rule.kp_init at random, no weight mirror)
    "kp": {"rule": dict(_PLAIN), "optim": {"lr": 3e-3, "weight_decay": 1.0}},
    "sign": {"rule": dict(_PLAIN), "optim": {"lr": 3e-3, "weight_decay": 1.0}},  # backprop's
}


# decoupled stages (docs/algorithm.md#decoupled-stages): the `mirror` recipe inside each stage,
# whose top learns from an auxiliary head of its own on the labels (the head chosen on
# validation). With one stage it is `mirror`
RECIPES["rec_lra_decoupled"] = {
    "rule": {
        **RECIPES["rec_lra"]["rule"],
        "topology": "decoupled",
        "aux_head": "conv2",
        "aux_recon": 0.0,
    },
    "optim": dict(RECIPES["rec_lra"]["optim"]),
}


# What each variant computes, in a line: shown in `reclra train`'s table, `reclra report` and the
# benchmark tables, so that a variant that reduces to a known method says so where users read it.
COMPUTES: dict[str, str] = {
    "rec_lra": (
        "rec-LRA targets with a mirror error path and KP synapses set by a weight mirror: in "
        "the limit Kolen-Pollack backprop (finite-difference act', each layer's own BatchNorm "
        "Jacobian)"
    ),
    "rec_lra_paper": (
        "rec-LRA as ALGORITHM.md reads the paper: junctions fed from e_L through skip "
        "synapses, L1/L2 errors, input noise, re-projection"
    ),
    "rec_lra_decoupled": (
        "rec-LRA with decoupled stages: each stage's top learns from an auxiliary head of its "
        "own on the labels, mirror path inside a stage, nothing sent down (decoupled greedy "
        "learning with rec-LRA in place of backprop); with one stage, rec_lra"
    ),
    "lra_e": "LRA-E (AAAI 2019): targets along the adjacent path, e = z - y, KP synapses",
    "backprop": "backpropagation (stage-local autograd, the gradient passed between stages)",
    "kp": "Kolen-Pollack (Akrout et al. 2019): backprop's chain through learned E, exact act'",
    "sign": "sign symmetry: backprop's chain through rms(W) sign(W) (a one-bit transport)",
    "fa": "feedback alignment: backprop's chain through fixed random E",
    "dfa": "direct feedback alignment: e_L sent to every layer through fixed random maps",
}


def computes(variant: str) -> str:
    """One line on what the variant computes ("" for an unknown one)."""
    return COMPUTES.get(variant, "")


def label(name: str, preset: str = "") -> str:
    """The variant's label: `name`, or `name_preset` for a preset other than the default."""
    return name if not preset or preset == PRESETS.get(name, ("",))[0] else f"{name}_{preset}"


def split_label(variant: str) -> tuple[str, str]:
    """(rule name, preset) of a label; preset "" for a rule's default."""
    for name, presets in PRESETS.items():
        for preset in presets[1:]:
            if variant == f"{name}_{preset}":
                return name, preset
    return variant, ""


def variants(rules: list[str]) -> list[str]:
    """Every label of the given rules: each rule, then its non-default presets."""
    return [label(r, p) for r in rules for p in ("", *PRESETS.get(r, ())[1:])]


def recipe(variant: str, section: str) -> dict[str, Any]:
    """The recipe's keys for one config section ("rule" or "optim") of a rule or a variant's
    label; {} for an unknown one."""
    return dict(RECIPES.get(variant, {}).get(section, {}))
