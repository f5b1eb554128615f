"""The [data] section: which dataset, where it lives, and how it is split and augmented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from driver.config.choices import check_choices
from workers.bounds import Limits, check_bounds

HELD_OUT = ("cifar10", "fashion_mnist", "mnist")  # val = the last data.val_size of the train file


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: Literal["digits", "cifar10", "fashion_mnist", "mnist", "imagenet", "synthetic"] = "digits"
    """The dataset: scikit-learn's digits (bundled), or one read from data.root."""
    root: str = "data"
    """Holds cifar-10-batches-py, FashionMNIST/raw, MNIST/raw or an imagenet folder."""
    download: bool = False
    """cifar10, (fashion_)mnist: download when asked (never by default)."""
    val_size: int = 5000
    """cifar10, (fashion_)mnist: the last images of the train file, held out for validation."""
    train_size: int = 0
    """cifar10, (fashion_)mnist: a class-balanced seeded subset of train (0: all)."""
    augment: bool = False
    """Random crop and flip (mnist: no flip), train split only; not digits or synthetic."""
    whiten: bool = False
    """cifar10: global contrast normalisation and ZCA whitening, fitted on the train split."""
    image_size: int = 224
    """imagenet: the train and eval crop size."""
    synthetic_size: int = 512
    """synthetic: train samples (val and test get a quarter each)."""
    synthetic_shape: tuple[int, int, int] = (3, 32, 32)
    """synthetic: the images' (C, H, W)."""
    num_workers: int = 0
    """DataLoader worker processes (beside the driver, or in the decoder with decode = "ray")."""
    decode: Literal["driver", "ray"] = "driver"
    """Where train batches are read, decoded and transformed. driver: a DataLoader in the driver
    process. ray: a Ray actor (with num_workers DataLoader workers of its own) on a node with
    decode_cpus free CPUs, data.root readable there; decoded batches come back to the driver.
    Both give the same batches; needs a run on Ray (pipeline.stages > 1)."""
    decode_cpus: float = 1.0
    """decode = "ray": the CPUs the decoder actor reserves."""
    decode_timeout_s: float = 300.0
    """decode = "ray": the longest wait for one decoded batch (placing the decoder included)."""
    seed: int = 0
    """Seeds the train subset and the split."""

    # each numeric key's closed range (workers/bounds.py); synthetic_shape: each of C, H, W
    LIMITS: ClassVar[Limits] = {
        "val_size": (0, 10**7),
        "train_size": (0, 10**7),
        "image_size": (8, 2048),
        "synthetic_size": (4, 10**7),
        "synthetic_shape": (1, 2048),
        "num_workers": (0, 256),
        "decode_cpus": (0.0, 1024.0),
        "decode_timeout_s": (1.0, 86_400.0),
        "seed": (0, 2**32 - 1),
    }

    def __post_init__(self) -> None:
        check_choices("data", self)
        for key in ("download", "augment", "whiten"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"data.{key}: must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"data.root: must be a non-empty path, got {self.root!r}")
        minimum = {"val_size": 0, "train_size": 0, "image_size": 8, "synthetic_size": 4}
        minimum |= {"num_workers": 0, "seed": 0}
        for key, low in minimum.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{key}: must be an integer >= {low}, got {value!r}")
        for key in ("decode_cpus", "decode_timeout_s"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"data.{key}: must be a number, got {value!r}")
        shape = self.synthetic_shape
        if (
            not isinstance(shape, tuple | list)
            or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        ):
            raise ValueError(
                f"data.synthetic_shape: must be 3 positive integers (C, H, W), got {shape!r}"
            )
        object.__setattr__(self, "synthetic_shape", tuple(shape))  # TOML gives a list
        only = {
            "download": HELD_OUT,
            "train_size": HELD_OUT,
            "whiten": ("cifar10",),
            "augment": (*HELD_OUT, "imagenet"),
        }
        for key, names in only.items():
            if getattr(self, key) and self.name not in names:
                raise ValueError(
                    f"data.{key}: only applies to {', '.join(names)}, not {self.name!r}"
                )
        check_bounds("data", self, self.LIMITS)
