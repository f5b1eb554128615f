"""A units state (weights, buffers and optimizer moments, as Stage.state_dict()["units"] and
LocalRunner.state_dict()["units"] give it) flattened to name -> tensor, for comparisons."""

from __future__ import annotations

import torch


def flat_units(units: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for uname, entry in units.items():
        for k, v in entry["tensors"].items():
            out[f"{uname}/{k}"] = v
        for pname, st in entry["optim"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    out[f"{uname}/optim/{pname}/{k}"] = v
    return out
