"""Tests of fashion_mnist / mnist (driver/data/mnist.py) and data.train_size: real IDX files."""

from __future__ import annotations

import gzip
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.mnist
from fixtures_data import (
    MNIST_FILES,
    MNIST_TEST_START,
    mnist_images,
    mnist_label,
    mnist_marker,
    one_line_error,
    write_cifar10,
    write_idx_mnist,
)
from torch.utils.data import Dataset

from driver.config.data import DataConfig
from driver.data import mnist as datasets_mnist
from driver.data.common import DataError, DatasetSplits
from driver.data.load import load_dataset
from driver.data.split import balanced_subset

FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
N_TRAIN, N_TEST, VAL = 60, 20, 10  # the fixture: 50 train + the last 10 of the train file as val
REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data"


def write(root: Path, name: str = "fashion_mnist", gz: bool = True, seed: int = 0) -> Path:
    return write_idx_mnist(root, FOLDERS[name], N_TRAIN, N_TEST, gz=gz, seed=seed)


def load(root: Path, name: str = "fashion_mnist", **kw: Any) -> DatasetSplits:
    return load_dataset(DataConfig(name=name, root=str(root), **{"val_size": VAL, **kw}))


def stack(ds: Any) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def labels(ds: Any) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


def expected(g: int, seed: int = 0) -> torch.Tensor:
    """The uint8 28x28 image that write_idx_mnist stored as image number ``g``."""
    start, n = (MNIST_TEST_START, N_TEST) if g >= MNIST_TEST_START else (0, N_TRAIN)
    return torch.from_numpy(mnist_images(start, n, seed + start)[0][g - start])


def unnormalise(ds: Dataset, x: torch.Tensor) -> torch.Tensor:
    norm = ds.transform  # type: ignore[attr-defined]
    return (x * norm.std + norm.mean) * 255


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"name": "digits", "train_size": 10}, "data.train_size"),
        ({"name": "imagenet", "train_size": 10}, "data.train_size"),
        ({"name": "synthetic", "train_size": 10}, "data.train_size"),
        ({"name": "mnist", "train_size": -1}, "data.train_size"),
        ({"name": "mnist", "train_size": True}, "data.train_size"),
        ({"name": "fashion_mnist", "whiten": True}, "data.whiten"),
        ({"name": "digits", "download": True}, "data.download"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}: "):
        DataConfig(**kw)


def test_config_accepts_the_new_names_and_keys() -> None:
    for name in ("fashion_mnist", "mnist", "cifar10"):
        cfg = DataConfig(name=name, augment=True, download=True, train_size=100)
        assert cfg.train_size == 100
    assert DataConfig().train_size == 0 and DataConfig(name="mnist").download is False


# ----------------------------------------------------------------------------- pixels and splits


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_pixels_labels_and_splits_round_trip(tmp_path: Path, name: str) -> None:
    write(tmp_path, name)
    s = load(tmp_path, name)
    assert (len(s.train), len(s.val), len(s.test)) == (N_TRAIN - VAL, VAL, N_TEST)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    first = {"train": 0, "val": N_TRAIN - VAL, "test": MNIST_TEST_START}  # val: the LAST of train
    for split, start in first.items():
        ds = getattr(s, split)
        for i in range(len(ds)):
            x, y = ds[i]
            g = start + i
            assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
            assert isinstance(y, int) and y == mnist_label(g)
            pixels = unnormalise(s.train, x)[0]
            assert torch.allclose(pixels, expected(g).float(), atol=1e-3)
            assert pixels[mnist_marker(g)] > 254 and pixels.max() == pixels[mnist_marker(g)]
    # Standardised with the statistics of the train split alone: not val's, not the whole file's.
    train = stack(s.train)
    assert abs(train.mean().item()) < 1e-5 and abs(train.std().item() - 1) < 1e-3
    assert abs(stack(s.val).mean().item()) > 1e-3
    raw = np.stack([expected(g).numpy() for g in range(N_TRAIN - VAL)]) / 255.0
    assert s.train.transform.mean == pytest.approx(raw.mean(), abs=1e-9)  # type: ignore[attr-defined]
    assert s.train.transform.std == pytest.approx(raw.std(), abs=1e-9)  # type: ignore[attr-defined]


def test_gzipped_and_extracted_files_read_alike_extracted_preferred(tmp_path: Path) -> None:
    write(tmp_path / "gz", gz=True)
    write(tmp_path / "plain", gz=False)
    a, b = load(tmp_path / "gz"), load(tmp_path / "plain")
    for split in ("train", "val", "test"):
        assert torch.equal(stack(getattr(a, split)), stack(getattr(b, split)))
        assert labels(getattr(a, split)) == labels(getattr(b, split))
    write(tmp_path / "both", gz=True)
    write(tmp_path / "both", gz=False, seed=5)  # as torchvision leaves it: .gz and extracted
    c = load(tmp_path / "both")
    assert torch.allclose(unnormalise(c.test, c.test[0][0])[0], expected(1000, 5).float(), 1e-3)


def test_second_load_is_served_from_the_cache_until_a_file_changes(tmp_path: Path) -> None:
    raw = write(tmp_path)
    load(tmp_path)
    before = datasets_mnist._decode.cache_info()
    load(tmp_path)
    after = datasets_mnist._decode.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (4, 0)
    test_images = raw / f"{MNIST_FILES['test'][0]}.gz"
    images, _ = mnist_images(MNIST_TEST_START, N_TEST, seed=7)
    header = struct.pack(">4I", 2051, N_TEST, 28, 28)
    test_images.write_bytes(gzip.compress(header + images.tobytes()))
    os.utime(test_images, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime for sure
    s = load(tmp_path)
    new = torch.from_numpy(images[0]).float()
    assert torch.allclose(unnormalise(s.test, s.test[0][0])[0], new, atol=1e-3)


# ------------------------------------------------------------------------------------ train_size


def water_filled(counts: np.ndarray, kept: np.ndarray) -> bool:
    """No class is left short (kept < count) while another keeps two or more items more."""
    short = kept[kept < counts]
    return len(short) == 0 or bool(kept.max() <= short.min() + 1)


def test_balanced_subset_spreads_evenly_and_fills_from_larger_classes() -> None:
    y = np.array([0] * 2 + [1] * 20 + [2] * 20 + [3] * 7 + [4] * 20)
    for size in (0, 1, 5, 10, 33, 50, 68, len(y)):
        keep = balanced_subset(y, size, seed=3)
        assert len(keep) == size and np.all(np.diff(keep) > 0)
        kept = np.bincount(y[keep], minlength=5)
        assert water_filled(np.bincount(y), kept), (size, kept)
        assert np.array_equal(keep, balanced_subset(y, size, seed=3))
    kept = np.bincount(y[balanced_subset(y, 50, 0)])  # 2 and 7 (all), then 41 over three
    assert kept[0] == 2 and kept[3] == 7 and sorted(kept[[1, 2, 4]].tolist()) == [13, 14, 14]
    assert not np.array_equal(balanced_subset(y, 33, 0), balanced_subset(y, 33, 1))
    with pytest.raises(ValueError):
        balanced_subset(y, len(y) + 1, 0)


def pixels(s: DatasetSplits, split: str) -> torch.Tensor:
    """A split's images with the train split's standardisation undone (cifar10: as given)."""
    x = stack(getattr(s, split))
    return unnormalise(s.train, x) if s.input_shape[0] == 1 else x


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_train_size_keeps_a_balanced_seeded_subset_of_train_only(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "cifar10":
        # 60 train images, labels g % 10
        write_cifar10(tmp_path, monkeypatch, per_batch=12, n_test=6)
    else:
        write(tmp_path)  # 60 train images; class 9 is 4x as common as each other class
    full = load(tmp_path, name)
    x_full, y_full = pixels(full, "train"), np.array(labels(full.train))

    def picked(s: DatasetSplits) -> list[int]:
        """Where each kept training image sits among the N_TRAIN - VAL of the full split."""
        x = pixels(s, "train")
        at = [int((x_full - xi).flatten(1).abs().amax(1).argmin()) for xi in x]
        assert (x_full[at] - x).abs().max() < 1e-3  # every kept image is one of them, unchanged
        assert np.array_equal(y_full[at], labels(s.train))
        return at

    s = load(tmp_path, name, train_size=23, seed=1)
    assert len(s.train) == 23 and len(s.val) == VAL
    for split in ("val", "test"):  # untouched by train_size
        assert torch.allclose(pixels(s, split), pixels(full, split), atol=1e-3)
    at = picked(s)
    assert at == sorted(set(at))  # distinct, in file order
    kept = np.bincount(labels(s.train), minlength=10)
    assert water_filled(np.bincount(y_full, minlength=10), kept) and kept.max() <= 3
    if name == "fashion_mnist":  # standardised with the statistics of the 23 images kept
        assert abs(stack(s.train).mean().item()) < 1e-5
    assert picked(load(tmp_path, name, train_size=23, seed=1)) == at
    assert picked(load(tmp_path, name, train_size=23, seed=2)) != at
    assert len(load(tmp_path, name, train_size=N_TRAIN - VAL).train) == N_TRAIN - VAL
    with pytest.raises(DataError) as exc:
        load(tmp_path, name, train_size=N_TRAIN - VAL + 1)
    one_line_error(exc, "data.train_size", str(N_TRAIN - VAL + 1), str(N_TRAIN - VAL))


def test_val_size_larger_than_the_train_file_is_one_line(tmp_path: Path) -> None:
    write(tmp_path)
    with pytest.raises(DataError) as exc:
        load(tmp_path, val_size=N_TRAIN)
    one_line_error(exc, "data.val_size", str(N_TRAIN), "train-images-idx3-ubyte.gz")


# ------------------------------------------------------------------------------------- augment


def crops(img: torch.Tensor) -> list[torch.Tensor]:
    """All 25 pad-2 crops of a 28x28 image, then the same flipped."""
    padded = F.pad(img, (2, 2, 2, 2))
    out = [padded[i : i + 28, j : j + 28] for i in range(5) for j in range(5)]
    return out + [c.flip(-1) for c in out]


@pytest.mark.parametrize(("name", "flips"), [("fashion_mnist", {0, 1}), ("mnist", {0})])
def test_augment_crops_train_only_and_never_flips_digits(
    tmp_path: Path, name: str, flips: set[int]
) -> None:
    write(tmp_path, name)
    plain, aug = load(tmp_path, name), load(tmp_path, name, augment=True)
    torch.manual_seed(0)
    draws = [unnormalise(plain.train, aug.train[3][0])[0] for _ in range(64)]
    assert all(d.shape == (28, 28) for d in draws)
    candidates = torch.stack([c.float() for c in crops(expected(3))])
    seen = set()
    for d in draws:  # each draw is one of the crops, maybe flipped (the image is asymmetric)
        dist = (candidates - d).flatten(1).abs().amax(1)
        assert dist.min() < 1e-3
        k = int(dist.argmin())
        seen.add((k // 25, (k % 25) // 5 - 2, k % 5 - 2))  # (flipped, row shift, column shift)
    assert {f for f, _, _ in seen} == flips
    assert max(max(abs(r), abs(c)) for _, r, c in seen) == 2  # the full padding of 2 is used
    assert len(seen) > 5
    for split in ("val", "test"):
        for i in (0, 1):
            assert torch.equal(getattr(aug, split)[i][0], getattr(plain, split)[i][0])


# -------------------------------------------------------------------------------------- errors


def rewrite(path: Path, change: Callable[[bytes], bytes]) -> None:
    """Apply ``change`` to the IDX content of ``path``, gzipped or not."""
    gz = path.suffix == ".gz"
    blob = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    blob = change(blob)
    path.write_bytes(gzip.compress(blob, mtime=0) if gz else blob)


def drop_last_label(blob: bytes) -> bytes:
    (n,) = struct.unpack(">I", blob[4:8])
    return blob[:4] + struct.pack(">I", n - 1) + blob[8:-1]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-300])


def bad_magic(path: Path) -> None:
    rewrite(path, lambda b: b"\0\0\x08\x04" + b[4:])  # 2052: four dimensions


def label_ten(path: Path) -> None:
    rewrite(path, lambda b: b[:-1] + b"\x0a")


def not_28x28(path: Path) -> None:
    rewrite(path, lambda b: b[:8] + struct.pack(">2I", 56, 14) + b[16:])  # same byte count


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {  # file, damage, in the message
    "missing": ("t10k-labels-idx1-ubyte", Path.unlink, "missing"),
    "truncated": ("train-images-idx3-ubyte", truncate, ""),
    "bad magic": ("t10k-images-idx3-ubyte", bad_magic, "2051"),
    "count mismatch": ("train-labels-idx1-ubyte", lambda p: rewrite(p, drop_last_label), "labels"),
    "label out of range": ("t10k-labels-idx1-ubyte", label_ten, "outside 0..9"),
    "not 28x28": ("t10k-images-idx3-ubyte", not_28x28, "56x14"),
}


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "extracted"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_files_give_one_line_naming_the_file(tmp_path: Path, kind: str, gz: bool) -> None:
    raw = write(tmp_path, gz=gz)
    stem, damage, detail = DAMAGE[kind]
    path = raw / (f"{stem}.gz" if gz else stem)
    damage(path)
    with pytest.raises(DataError) as exc:
        load(tmp_path)
    if kind == "missing":
        one_line_error(exc, f"{stem}[.gz]", str(raw), "data.download = true", "FashionMNIST/raw")
    else:
        one_line_error(exc, str(path), detail, "data.download = true")
    if kind == "count mismatch":
        one_line_error(exc, str(raw / path.name.replace("labels-idx1", "images-idx3")))


def test_missing_folder_says_where_it_looked_and_spots_a_root_one_level_too_deep(
    tmp_path: Path,
) -> None:
    with pytest.raises(DataError) as exc:
        load(tmp_path, "mnist")
    one_line_error(
        exc, str(tmp_path / "MNIST" / "raw"), "train-images-idx3-ubyte[.gz]",
        "data.download = true", "data.root", "MNIST/raw",
    )  # fmt: skip
    write(tmp_path, "fashion_mnist")
    for root in (tmp_path / "FashionMNIST", tmp_path / "FashionMNIST" / "raw"):
        with pytest.raises(DataError) as exc:
            load(root)
        one_line_error(exc, f"try {tmp_path}")
    with pytest.raises(DataError) as exc:
        load(tmp_path, "mnist")
    one_line_error(exc, "data.name = fashion_mnist")


# ------------------------------------------------------------------------------------ download


def test_downloads_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_download(url: str, download_root: str, filename: str, **kw: object) -> None:
        calls.append(url)
        write_idx_mnist(Path(download_root).parents[1], "MNIST", N_TRAIN, N_TEST, gz=False)

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fake_download)
    with pytest.raises(DataError):
        load(tmp_path, "mnist")  # download defaults to False
    assert calls == []
    s = load(tmp_path, "mnist", download=True)
    mirror = torchvision.datasets.mnist.MNIST.mirrors[0]
    assert calls == [mirror + f for f, _ in torchvision.datasets.mnist.MNIST.resources]
    assert (len(s.train), len(s.val), len(s.test)) == (N_TRAIN - VAL, VAL, N_TEST)
    assert s.train[0][1] == mnist_label(0)
    load(tmp_path, "mnist", download=True)  # already there and sound: no second download
    assert len(calls) == 4

    # A sound gzipped folder (the shared, read-only layout) is read in place: no download, and
    # nothing written next to the files (torchvision alone would extract them there).
    raw = write(tmp_path / "ro", "fashion_mnist", gz=True)
    listing = sorted(os.listdir(raw))
    load(tmp_path / "ro", download=True)
    assert len(calls) == 4 and sorted(os.listdir(raw)) == listing


def test_a_failed_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, **kw: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as exc:
        load(tmp_path, download=True)
    one_line_error(exc, "download of FashionMNIST", str(tmp_path), "check the network")


# ----------------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (REAL_DATA / "FashionMNIST" / "raw").is_dir(),
    reason=f"the real Fashion-MNIST is not at {REAL_DATA}/FashionMNIST/raw",
)
def test_real_fashion_mnist_read_in_place() -> None:
    raw = REAL_DATA / "FashionMNIST" / "raw"
    listing = sorted(os.listdir(raw))
    files = datasets_mnist.read_idx("fashion_mnist", REAL_DATA)
    (x, y), (x_test, y_test) = files["train"], files["test"]
    assert x.shape == (60_000, 28, 28) and x_test.shape == (10_000, 28, 28)
    assert np.array_equal(np.bincount(y), [6000] * 10)
    assert np.array_equal(np.bincount(y_test), [1000] * 10)
    mean, std = datasets_mnist.pixel_stats(x)
    assert mean == pytest.approx(0.2860, abs=1e-3) and std == pytest.approx(0.3530, abs=2e-3)
    s = load_dataset(DataConfig(name="fashion_mnist", root=str(REAL_DATA), train_size=1000))
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 5000, 10_000)
    assert np.array_equal(np.bincount(labels(s.train)), [100] * 10)
    assert s.train[0][0].shape == (1, 28, 28) and s.num_classes == 10
    assert sorted(os.listdir(raw)) == listing  # read in place: nothing written next to the files
