"""The training budgets the accuracy benchmarks share: network, data size, epochs and batch.

    default  ResNet-8 w16, 20,000 Fashion-MNIST training images, 4 epochs, batch 64
    short    ResNet-8 w16,  5,000 Fashion-MNIST training images, 2 epochs, batch 64
    depth    ResNet-18 w32, 10,000 Fashion-MNIST training images, 3 epochs, batch 64

Every budget validates on the same 5,000 held-out training images (data.val_size) and tests on
the test split; `digits` is scikit-learn's digits at its own size (1,197 training images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Budget:
    model: str
    width: int
    train_size: int  # 0: the dataset's own (digits)
    epochs: int
    batch: int

    def sets(self, data: str, root: str | None = None) -> list[str]:
        """The --set overrides that make a config train this budget on `data`."""
        out = [f"data.name={json.dumps(data)}", f"model.name={json.dumps(self.model)}"]
        out += [f"model.width={self.width}", f"train.epochs={self.epochs}"]
        out += [f"train.batch_size={self.batch}"]
        if data != "digits":
            out += [f"data.root={json.dumps(root or str(SHARED))}"]
            out += [f"data.train_size={self.train_size}"]
        return out


BUDGETS = {
    "default": Budget("resnet8", 16, 20_000, 4, 64),
    "short": Budget("resnet8", 16, 5_000, 2, 64),
    "depth": Budget("resnet18", 32, 10_000, 3, 64),
    "digits": Budget("resnet8", 16, 0, 10, 32),
}
