"""Stage state keyed by layer name: weights, synapses, BN buffers and optimizer state per unit;
and one runner state merged from its stages' states."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers.spec import StageStateError

Units = dict[str, nn.Module]  # a stage's learnable units by model-wide name


def stage_state(units: Units, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """{unit name: {"tensors": {...}, "optim": {param: state}}} for every unit of a stage.

    Units are named model-wide ("layer2.0.conv1", "layer2.0.skip1", "head.fc"), so a checkpoint
    written by K stages loads into any other partition of the same model.
    """
    out: dict[str, dict[str, Any]] = {}
    opt_state = optimizer.state
    for name, unit in units.items():
        tensors = {k: v.detach().cpu().clone() for k, v in unit.state_dict().items()}
        optim = {
            pname: {
                k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                for k, v in opt_state[p].items()
            }
            for pname, p in unit.named_parameters()
            if p in opt_state
        }
        out[name] = {"tensors": tensors, "optim": optim}
    return out


def load_stage_state(
    units: Units,
    optimizer: torch.optim.Optimizer,
    state: dict[str, dict[str, Any]],
    *,
    strict: bool = True,
    cut_free: bool = False,
) -> list[str]:
    """Load a stage's `units` (and their `optimizer` state) from `state`, which may hold other
    stages' units too.

    `cut_free`: the rule gives a stage's bottom layer no error synapse (nothing is sent below a
    stage), so which layers have one depends on where the model was cut. An error synapse the
    checkpoint lacks is left as it is here (its unit's other tensors load), one this stage
    lacks is ignored. Returns the units whose error synapse was left.

    Everything is checked before anything is loaded: a refused state leaves the stage as it was.
    """
    missing = [n for n in units if n not in state]
    if missing and strict:
        raise StageStateError(
            f"checkpoint lacks {len(missing)} layer(s) this stage owns, e.g. {missing[0]!r}: "
            "it was written for a different model or rule"
        )
    for name, unit in units.items():
        if name not in state:
            continue
        own, theirs = unit.state_dict(), state[name]["tensors"]
        for key in sorted(set(own) | set(theirs)):
            if cut_free and key == "feedback":
                continue
            if key not in theirs or key not in own:
                where = "the checkpoint lacks" if key not in theirs else "this model has no"
                raise StageStateError(
                    f"layer {name!r}: {where} tensor {key!r}; the checkpoint was written for a "
                    "different model or rule (compare model.*, rule.name, rule.topology)"
                )
            if own[key].shape != theirs[key].shape:
                raise StageStateError(
                    f"layer {name!r}: tensor {key!r} has shape {tuple(theirs[key].shape)} in the "
                    f"checkpoint but {tuple(own[key].shape)} in this model"
                )
    left: list[str] = []
    for name, unit in units.items():
        if name not in state:
            continue
        entry = state[name]
        tensors = dict(entry["tensors"])
        if cut_free:
            has = "feedback" in unit.state_dict()
            if has and "feedback" not in tensors:
                tensors["feedback"] = unit.state_dict()["feedback"]
                left.append(name)
            elif not has:
                tensors.pop("feedback", None)
        unit.load_state_dict(tensors)
        for pname, p in unit.named_parameters():
            if pname in entry["optim"]:
                optimizer.state[p] = {
                    k: (
                        v.to(p.device, p.dtype) if torch.is_tensor(v) and v.shape == p.shape else v
                    )  # moments follow the parameter; scalars such as `step` stay
                    for k, v in entry["optim"][pname].items()
                }
    return left


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One runner state from its stages' states (Stage.state_dict, stage 0 first): every
    unit, and stage 0's step, progress and noise RNG (the input noise is drawn there)."""
    units: dict[str, Any] = {}
    for st in states:
        units.update(st["units"])
    first = states[0]
    return {**{k: v for k, v in first.items() if k != "units"}, "units": units}


def unit_buffers(units: Units) -> dict[str, dict[str, torch.Tensor]]:
    """Every unit's persistent buffers (BN running statistics): the state a forward changes."""
    out = {}
    for name, unit in units.items():
        keep = unit.state_dict(keep_vars=True).keys()
        out[name] = {k: b.detach().cpu().clone() for k, b in unit.named_buffers() if k in keep}
    return out


def with_buffers(state: dict[str, dict[str, Any]], buffers: dict[str, dict[str, Any]]) -> None:
    """Put `buffers` (unit_buffers, taken earlier) into a stage_state `state`, in place."""
    for name, bufs in buffers.items():
        state[name]["tensors"].update(bufs)
