"""Writers of tiny datasets in real on-disk formats: CIFAR-10 python batches, ImageNet folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

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


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 6, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` pickled like the real batches; train images 0.., test 1000...

    The real files are Python 2 pickles whose ``str`` keys and strings load as ``str`` under
    ``encoding="latin1"`` (torchvision's reader); Python 3 ``str`` written with protocol 2 loads
    the same way, and the numpy ``data`` array is pickled exactly as numpy pickles it.
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
    return folder


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
