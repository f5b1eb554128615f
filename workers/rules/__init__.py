"""Learning rules, one module each; importing this package registers them all."""

from workers.rules import backprop, dfa, fa, kp, lra_e, rec_lra, sign  # noqa: F401
from workers.rules.base import (
    RULES,
    ErrorSignal,
    Rule,
    RuleConfig,
    make_rule,
    rule_chained,
    rule_decoupled,
)

__all__ = [
    "RULES",
    "ErrorSignal",
    "Rule",
    "RuleConfig",
    "make_rule",
    "rule_chained",
    "rule_decoupled",
]
