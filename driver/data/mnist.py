"""MNIST and Fashion-MNIST from torchvision's raw IDX files: parsing, checks, splits, transforms."""

from __future__ import annotations

import functools
import gzip
import logging
import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.transforms import v2

from driver.data.common import DataError, DatasetSplits, TensorImages

if TYPE_CHECKING:
    from driver.config.data import DataConfig

log = logging.getLogger(__name__)

SOURCES: dict[str, type[MNIST]] = {"fashion_mnist": FashionMNIST, "mnist": MNIST}
FILES = {  # split -> (images, labels), as torchvision names them (the download adds .gz)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 dims / 1 dim
SIDE, CLASSES, PAD = 28, 10, 2
_CORRUPT_FIX = "delete it and re-run with data.download = true to fetch a fresh copy"


def _missing_fix(folder: str) -> str:
    return f"set data.download = true, or point data.root at the folder that holds {folder}/raw"


def raw_folder(name: str, root: str | Path) -> Path:
    """``<root>/<FashionMNIST|MNIST>/raw``: where torchvision keeps (and downloads) the files."""
    return Path(root) / SOURCES[name].__name__ / "raw"


def _find(raw: Path, stem: str) -> Path | None:
    """The extracted file if present (what torchvision reads; no inflating), else the .gz."""
    return next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)


@functools.lru_cache(maxsize=8)
def _decode(path: str, mtime_ns: int, size: int, images: bool) -> np.ndarray | str:
    """One IDX file as a read-only uint8 array (N x 28 x 28, or N labels), or what is wrong.

    Cached on the file's stat, so a second load in one process costs nothing.
    """
    try:
        with open(path, "rb") as f:
            blob = f.read()
        if path.endswith(".gz"):
            blob = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as err:  # unreadable, not gzip, truncated gzip
        return f"cannot read {path} ({type(err).__name__}: {err})"
    want, ndim, kind = (IMAGE_MAGIC, 3, "image") if images else (LABEL_MAGIC, 1, "label")
    header = 4 + 4 * ndim
    if len(blob) < header:
        return f"{path} holds {len(blob)} bytes, too few for the {header}-byte IDX {kind} header"
    magic = int.from_bytes(blob[:4], "big")
    if magic != want:
        hint = "; it is gzip data, so name it .gz" if blob[:2] == b"\x1f\x8b" else ""
        return f"{path} starts with magic number {magic}, not {want} (IDX {kind} file){hint}"
    dims = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if images and dims[1:] != (SIDE, SIDE):
        return f"{path} holds {dims[1]}x{dims[2]} images, not {SIDE}x{SIDE}"
    expected = header + math.prod(dims)
    if len(blob) != expected:
        return (
            f"{path} holds {len(blob)} bytes but its header promises {dims[0]} {kind}s "
            f"({expected} bytes); the file is truncated or padded"
        )
    array = np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)
    if not images and len(array) and int(array.max()) >= CLASSES:
        return f"{path} has label {int(array.max())}, outside 0..{CLASSES - 1}"
    return array


def _root_hint(name: str, root: Path) -> str:
    """A hint when data.root points inside a dataset folder, or holds the other dataset."""
    for inside, above in ((root / "raw", root.parent), (root, root.parent.parent)):
        if _find(inside, FILES["train"][0]):
            return f" (data.root = {root} points inside a dataset folder; try {above})"
    for other in SOURCES:
        if other != name and _find(raw_folder(other, root), FILES["train"][0]):
            return f" (it holds {raw_folder(other, root)}: did you mean data.name = {other}?)"
    return ""


def locate(name: str, root: str | Path) -> dict[str, Path]:
    """The path of each of the four files, or DataError saying which are missing and the fix."""
    raw, folder = raw_folder(name, root), SOURCES[name].__name__
    found = {stem: _find(raw, stem) for pair in FILES.values() for stem in pair}
    missing = [f"{stem}[.gz]" for stem, path in found.items() if path is None]
    if len(missing) == len(found):
        raise DataError(
            f"{name}: no {folder} IDX files under {raw} (looked for {', '.join(missing)})"
            f"{_root_hint(name, Path(root))}; {_missing_fix(folder)}"
        )
    if missing:
        raise DataError(f"{name}: missing {', '.join(missing)} under {raw}; {_missing_fix(folder)}")
    return {stem: path for stem, path in found.items() if path is not None}


def read_idx(name: str, root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (uint8 N x 28 x 28, uint8 N)}``, read in place; DataError names file and fix."""
    found = locate(name, root)
    out = {}
    for split, (image_stem, label_stem) in FILES.items():
        pair = []
        for stem, images in ((image_stem, True), (label_stem, False)):
            stat = found[stem].stat()
            array = _decode(str(found[stem]), stat.st_mtime_ns, stat.st_size, images)
            if isinstance(array, str):
                raise DataError(f"{name}: {array}; {_CORRUPT_FIX}")
            pair.append(array)
        if len(pair[0]) != len(pair[1]):
            raise DataError(
                f"{name}: {found[image_stem]} holds {len(pair[0])} images but "
                f"{found[label_stem]} holds {len(pair[1])} labels; delete both and re-run "
                "with data.download = true to fetch fresh copies"
            )
        out[split] = (pair[0], pair[1])
    return out


def _download(name: str, root: str) -> None:
    """torchvision's downloader into ``root`` (it skips files already there and sound)."""
    source = SOURCES[name]
    try:
        source(root, train=True, download=True)
    except Exception as err:  # network or disk, or torchvision's reader on a damaged file
        try:
            locate(name, root)  # all there: read_idx will say which one is damaged
        except DataError:
            raise DataError(
                f"{name}: download of {source.__name__} into {raw_folder(name, root)} failed "
                f"({type(err).__name__}: {err}); check the network, or "
                f"point data.root at the folder that holds {source.__name__}/raw"
            ) from err


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the pixels in [0, 1], exact, in bounded memory."""
    flat = images.reshape(-1)
    total = squares = 0
    for i in range(0, len(flat), 1 << 22):
        chunk = flat[i : i + (1 << 22)].astype(np.int64)
        total += int(chunk.sum())
        squares += int((chunk * chunk).sum())
    n = max(len(flat), 1)
    mean = total / n
    return mean / 255.0, math.sqrt(max(squares / n - mean * mean, 0.0)) / 255.0


class Normalise:
    """uint8 1x28x28 image -> float32 in [0, 1] -> standardised with the train statistics."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = mean, max(std, 1e-8)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img.float() / 255.0 - self.mean) / self.std


def load_mnist(cfg: DataConfig) -> DatasetSplits:
    """Train: the train file less its last ``val_size`` images (val); test: the t10k files.

    A ``train_size`` keeps a class-balanced, seeded subset of the training images (0: all);
    pixels are standardised with the mean and std of the training images kept.
    """
    from driver.data.split import split_train

    try:
        files = read_idx(cfg.name, cfg.root)
    except DataError:
        if not cfg.download:
            raise
        _download(cfg.name, cfg.root)
        files = read_idx(cfg.name, cfg.root)
    (x, y), (x_test, y_test) = files["train"], files["test"]
    n_train, keep = split_train(y, cfg, str(locate(cfg.name, cfg.root)[FILES["train"][0]]))
    train = np.arange(n_train) if keep is None else keep
    parts = {
        "train": (x[train], y[train]),  # fancy indexing copies: the cached arrays stay unshared
        "val": (x[n_train:].copy(), y[n_train:].copy()),
        "test": (x_test.copy(), y_test.copy()),
    }
    norm = Normalise(*pixel_stats(parts["train"][0]))
    out = {
        split: TensorImages(torch.from_numpy(a).unsqueeze(1), torch.from_numpy(b).long(), norm)
        for split, (a, b) in parts.items()
    }
    if cfg.augment:
        crop: list[v2.Transform] = [v2.RandomCrop(SIDE, padding=PAD)]
        flip = [v2.RandomHorizontalFlip()] if cfg.name == "fashion_mnist" else []  # not digits
        out["train"].transform = v2.Compose([*crop, *flip, norm])
    log.info(
        "%s: train %d, val %d, test %d; train pixel mean %.4f std %.4f",
        cfg.name, len(out["train"]), len(out["val"]), len(out["test"]), norm.mean, norm.std,
    )  # fmt: skip
    return DatasetSplits(**out, input_shape=(1, SIDE, SIDE), num_classes=CLASSES)
