"""Writers of tiny datasets in real on-disk formats: CIFAR-10 batches, MNIST IDX, ImageNet."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10

CIFAR_NAMES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer"]
LABEL_NAMES += ["dog", "frog", "horse", "ship", "truck"]


def marker(g: int) -> tuple[int, int, int]:
    """(channel, row, column) of the one bright pixel of fixture image number ``g``."""
    return g % 3, (5 * g) % 32, (11 * g + 3) % 32


def cifar_images(start: int, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """``n`` images (uint8 N x 3072, row-major C x H x W) numbered from ``start``, with labels.

    Each image is low-contrast noise (values 20..99) with one pixel set to 255 at
    :func:`marker` of its number; its label is ``number % 10``.
    """
    rng = np.random.default_rng(seed)
    data = rng.integers(20, 100, size=(n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        data[i][marker(start + i)] = 255
    return data.reshape(n, 3072), [(start + i) % 10 for i in range(n)]


def write_cifar10(
    root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 8, n_test: int = 6, seed: int = 0
) -> Path:
    """``root/cifar-10-batches-py`` pickled like the real batches; train images 0.., test 1000...

    The real files are Python 2 pickles whose ``str`` keys and strings load as ``str`` under
    ``encoding="latin1"`` (torchvision's reader); Python 3 ``str`` written with protocol 2 loads
    the same way, and the numpy ``data`` array is pickled exactly as numpy pickles it. The files'
    md5s become the ones torchvision checks, for the calling test (:func:`seal_cifar10`).
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(name, i * per_batch, per_batch) for i, name in enumerate(CIFAR_NAMES)]
    for name, start, n in [*batches, ("test_batch", 1000, n_test)]:
        data, labels = cifar_images(start, n, seed + start)
        entry = {
            "batch_label": f"fixture {name}",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{start + i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {"num_cases_per_batch": per_batch, "label_names": LABEL_NAMES, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    seal_cifar10(monkeypatch, folder)
    return folder


def seal_cifar10(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make the md5s of ``folder``'s files the published ones, for the calling test only.

    torchvision's CIFAR10 refuses any file whose md5 is not the real CIFAR-10 file's, which a
    tiny fixture cannot match. It keeps those md5s in the public class attributes
    ``train_list``, ``test_list`` and ``meta`` (the ones its own CIFAR100 overrides); they are
    set to the fixture files' md5s, and torchvision's check then runs unchanged: any later
    change to a file (a truncation, a rewrite) fails it until the test seals the folder again.
    """

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n in CIFAR_NAMES])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    meta = {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])}
    monkeypatch.setattr(CIFAR10, "meta", meta)


MNIST_FILES = {  # torchvision's names: split -> (images, labels)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_TEST_START = 1000  # test images are numbered from here


def mnist_marker(g: int) -> tuple[int, int]:
    """(row, column) of the one bright pixel of MNIST fixture image number ``g``."""
    return (5 * g) % 28, (11 * g + 3) % 28


def mnist_label(g: int) -> int:
    """The label of MNIST fixture image ``g``: class 9 is about four times as common as the rest,
    so that a class-balanced subset differs from a plain one."""
    return min(g % 13, 9)


def mnist_images(start: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 28x28 images from number ``start`` (noise 20..99, 255 at the marker), labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(20, 100, size=(n, 28, 28), dtype=np.uint8)
    for i in range(n):
        images[i][mnist_marker(start + i)] = 255
    return images, np.array([mnist_label(start + i) for i in range(n)], dtype=np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8, 1 or 3 dims) as an IDX file: magic 0x0800 + ndim, big-endian dims, data."""
    magic = 0x0800 + array.ndim  # 2049 for labels, 2051 for images
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()


def write_idx_mnist(
    root: Path, folder_name: str, n_train: int, n_test: int, gz: bool = True, seed: int = 0
) -> Path:
    """``root/<folder_name>/raw`` with the four IDX files, gzipped (as downloaded) or extracted.

    Train images are numbered 0.., test images MNIST_TEST_START..; see :func:`mnist_images`.
    """
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, start, n in (("train", 0, n_train), ("test", MNIST_TEST_START, n_test)):
        images, labels = mnist_images(start, n, seed + start)
        for name, array in zip(MNIST_FILES[split], (images, labels), strict=True):
            blob = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
            else:
                (raw / name).write_bytes(blob)
    return raw


IMAGENET_COLOURS = {"n01440764": (230, 20, 20), "n01443537": (20, 230, 20)}
IMAGENET_COLOURS["n01484850"] = (20, 20, 230)


def write_imagenet(root: Path, per_class: int = 4, n_val: int = 2) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG``: solid-colour images of odd sizes, one colour a class.

    The left third of each image is darker, so that flips and crops of different regions differ.
    """
    for split, n in (("train", per_class), ("val", n_val)):
        for c, (wnid, colour) in enumerate(IMAGENET_COLOURS.items()):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = 37 + 4 * i + c, 45 - 2 * i
                pixels = np.zeros((h, w, 3), dtype=np.uint8)
                pixels[:, :] = colour
                pixels[:, : w // 3] //= 2
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=95)
    return root


def one_line_error(exc: Any, *parts: str) -> str:
    """The message of a raised DataError (`exc`: pytest's ExceptionInfo), checked to be one
    line holding every one of `parts`."""
    msg = str(exc.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg
