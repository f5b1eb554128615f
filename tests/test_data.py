"""Tests of driver/data/load.py: real loaders fed tiny fixtures in the real on-disk formats."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar
from fixtures_data import (
    IMAGENET_COLOURS,
    cifar_images,
    marker,
    one_line_error,
    seal_cifar10,
    write_cifar10,
    write_imagenet,
)
from sklearn.datasets import load_digits
from sklearn.neighbors import NearestCentroid
from torch.utils.data import Dataset

from driver.config.data import DataConfig
from driver.data.common import DataError, DatasetSplits
from driver.data.load import load_dataset, make_loader

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
PER_BATCH, N_TEST, VAL = 8, 6, 8  # the CIFAR fixture: 40 train images (32 train + 8 val), 6 test


def cifar(root: Path, **kw: object) -> DatasetSplits:
    return load_dataset(DataConfig(name="cifar10", root=str(root), val_size=VAL, **kw))


def expected_cifar(g: int) -> torch.Tensor:
    """The uint8 3x32x32 image that write_cifar10 stored as image number ``g``."""
    start, n = (1000, N_TEST) if g >= 1000 else (g // PER_BATCH * PER_BATCH, PER_BATCH)
    data, _ = cifar_images(start, n, start)
    return torch.from_numpy(data[g - start].reshape(3, 32, 32))


def stack(ds: Dataset) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"name": "svhn"}, "data.name"),
        ({"val_size": -1}, "data.val_size"),
        ({"image_size": 0}, "data.image_size"),
        ({"synthetic_size": 2}, "data.synthetic_size"),
        ({"synthetic_shape": (3, 32)}, "data.synthetic_shape"),
        ({"synthetic_shape": (3, 0, 32)}, "data.synthetic_shape"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"seed": True}, "data.seed"),
        ({"augment": "yes"}, "data.augment"),
        ({"root": ""}, "data.root"),
        ({"name": "digits", "whiten": True}, "data.whiten"),
        ({"name": "synthetic", "augment": True}, "data.augment"),
        ({"name": "imagenet", "download": True}, "data.download"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}: "):
        DataConfig(**kw)


def test_config_names_the_choices_and_is_frozen_keyword_only() -> None:
    with pytest.raises(
        ValueError, match=r"digits.*cifar10.*fashion_mnist.*mnist.*imagenet.*synthetic"
    ):
        DataConfig(name="svhn")
    cfg = DataConfig(name="synthetic", synthetic_shape=[1, 8, 8])  # as TOML delivers it
    assert cfg.synthetic_shape == (1, 8, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        DataConfig("digits")  # type: ignore[misc]
    assert DataConfig().download is False


# ---------------------------------------------------------------------------------------- digits


def test_digits_fixed_stratified_disjoint_split_standardised_on_train() -> None:
    s = load_dataset(DataConfig(name="digits", seed=7))
    assert (len(s.train), len(s.val), len(s.test)) == (1197, 300, 300)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    x, y = s.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    xs = {k: stack(getattr(s, k)) for k in ("train", "val", "test")}
    ys = {k: torch.tensor([getattr(s, k)[i][1] for i in range(len(xs[k]))]) for k in xs}
    assert abs(xs["train"].mean().item()) < 1e-5 and abs(xs["train"].std().item() - 1) < 1e-4
    assert abs(xs["val"].mean().item()) > 1e-4  # the statistics come from train alone
    for k in ("val", "test"):  # stratified: each class 30 +- 1 of 300
        assert ys[k].bincount(minlength=10).sub(30).abs().max() <= 1
    # The standardisation is one affine map of the 17 pixel levels 0..16: undo it, then the
    # three splits together must be exactly sklearn's 1,797 images, each once.
    allx = torch.cat(list(xs.values())).flatten(1)
    levels = torch.unique(allx)
    assert len(levels) == 17
    raw = torch.searchsorted(levels, allx).numpy()
    digits = load_digits()
    ref = digits.data.astype(np.int64)
    order = np.lexsort(raw.T[::-1]), np.lexsort(ref.T[::-1])
    np.testing.assert_array_equal(raw[order[0]], ref[order[1]])
    np.testing.assert_array_equal(
        torch.cat(list(ys.values())).numpy()[order[0]], digits.target[order[1]]
    )
    again = load_dataset(DataConfig(name="digits", seed=0))  # the split ignores cfg.seed
    assert torch.equal(stack(again.val), xs["val"])


# ------------------------------------------------------------------------------------- synthetic


def test_synthetic_sizes_seeding_and_learnable_but_not_trivial() -> None:
    small = DataConfig(name="synthetic", synthetic_size=64, synthetic_shape=(1, 8, 8), seed=3)
    s = load_dataset(small)
    assert (len(s.train), len(s.val), len(s.test)) == (64, 16, 16)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert s.train[0][0].shape == (1, 8, 8) and s.train[0][0].dtype == torch.float32
    assert torch.equal(stack(load_dataset(small).train), stack(s.train))
    other = load_dataset(dataclasses.replace(small, seed=4))
    assert not torch.allclose(stack(other.train), stack(s.train))

    s = load_dataset(DataConfig(name="synthetic"))
    assert s.input_shape == (3, 32, 32) and len(s.train) == 512
    xtr, ytr = stack(s.train).flatten(1).numpy(), [s.train[i][1] for i in range(512)]
    xte, yte = stack(s.test).flatten(1).numpy(), [s.test[i][1] for i in range(128)]
    assert set(ytr) == set(range(10))
    acc = NearestCentroid().fit(xtr, ytr).score(xte, yte)
    assert 0.4 < acc < 0.98, acc


# ---------------------------------------------------------------------------------------- loader


class Numbers(Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1), i


def order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_loader_order_depends_only_on_seed_and_epoch() -> None:
    ds = Numbers()
    torch.manual_seed(1)
    a = order(make_loader(ds, 4, shuffle=True, seed=5, epoch=2))
    torch.manual_seed(2)  # the global RNG must not matter
    assert order(make_loader(ds, 4, shuffle=True, seed=5, epoch=2)) == a
    assert sorted(a) == list(range(20)) and a != list(range(20))
    assert order(make_loader(ds, 4, shuffle=True, seed=5, epoch=3)) != a
    assert order(make_loader(ds, 4, shuffle=True, seed=6, epoch=2)) != a
    assert order(make_loader(ds, 4, shuffle=False, seed=5, epoch=2)) == list(range(20))
    batches = list(make_loader(ds, 6, shuffle=True, seed=0, drop_last=True))
    assert [len(y) for _, y in batches] == [6, 6, 6]
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, shuffle=True, seed=0)


# --------------------------------------------------------------------------------------- cifar10


def test_cifar_pixels_labels_and_splits_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar10(tmp_path, monkeypatch, PER_BATCH, N_TEST)
    s = cifar(tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (32, 8, 6)  # val = the LAST 8 of train
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    for ds, first in ((s.train, 0), (s.val, 32), (s.test, 1000)):
        for i in range(len(ds)):
            x, y = ds[i]
            g = first + i
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
            assert isinstance(y, int) and y == g % 10
            pixels = (x * CIFAR_STD + CIFAR_MEAN) * 255
            assert torch.allclose(pixels, expected_cifar(g).float(), atol=1e-3)
            assert pixels[marker(g)] > 254 and pixels.max() == pixels[marker(g)]


def crops_and_flips(img: torch.Tensor) -> list[torch.Tensor]:
    padded = F.pad(img, (4, 4, 4, 4))
    crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    return crops + [c.flip(-1) for c in crops]


def test_cifar_augment_crops_and_flips_train_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar10(tmp_path, monkeypatch, PER_BATCH, N_TEST)
    plain, aug = cifar(tmp_path), cifar(tmp_path, augment=True)
    torch.manual_seed(0)
    draws = [aug.train[3][0] for _ in range(48)]
    assert any(not torch.equal(d, plain.train[3][0]) for d in draws)
    candidates = torch.stack(
        [(c.float() / 255 - CIFAR_MEAN) / CIFAR_STD for c in crops_and_flips(expected_cifar(3))]
    )
    seen = set()
    for d in draws:  # every draw is one of the 162 pad-4 crops of the image, maybe flipped
        assert d.shape == (3, 32, 32)
        dist = (candidates - d).flatten(1).abs().max(dim=1).values
        assert dist.min() < 1e-5
        k = int(dist.argmin())
        seen.add((k // 81, (k % 81) // 9 - 4, k % 9 - 4))  # (flipped, row shift, column shift)
    assert {f for f, _, _ in seen} == {0, 1}
    assert max(max(abs(r), abs(c)) for _, r, c in seen) == 4  # the full padding of 4 is used
    for split in ("val", "test"):
        for i in (0, 1):
            assert torch.equal(getattr(aug, split)[i][0], getattr(plain, split)[i][0])
            assert torch.equal(getattr(aug, split)[i][0], getattr(aug, split)[i][0])


def rewrite_batch(folder: Path, name: str, rows: slice, seed: int) -> None:
    with open(folder / name, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = entry["data"].copy()
    data[rows] = np.random.default_rng(seed).integers(0, 256, data[rows].shape, dtype=np.uint8)
    entry["data"] = data
    with open(folder / name, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def test_cifar_zca_whitens_train_and_is_fitted_on_train_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_cifar10(tmp_path / "a", monkeypatch, PER_BATCH, N_TEST)
    a = cifar(tmp_path / "a", whiten=True)
    train = stack(a.train).flatten(1).double()
    n = len(train)
    # With 32 images in 3,072 dims the covariance has rank 31; on that span it must be the
    # identity (eigenvalues lam / (lam + eps) ~ 1), and the train mean must be zero.
    assert train.mean(0).abs().max() < 1e-4
    eig = torch.linalg.eigvalsh(train @ train.T / n).sort().values
    assert eig[0] < 1e-4 and eig[1:].min() > 0.98 and eig.max() < 1.0 + 1e-4
    plain = stack(cifar(tmp_path / "a").train).flatten(1).double()
    assert torch.linalg.eigvalsh(plain @ plain.T / n).max() > 10  # so the check can fail

    # Changing the held-out val images and the test batch leaves whitened train unchanged ...
    write_cifar10(tmp_path / "b", monkeypatch, PER_BATCH, N_TEST)
    rewrite_batch(tmp_path / "b" / folder.name, "data_batch_5", slice(-VAL, None), seed=1)
    rewrite_batch(tmp_path / "b" / folder.name, "test_batch", slice(None), seed=2)
    seal_cifar10(monkeypatch, tmp_path / "b" / folder.name)  # the rewritten files are "published"
    b = cifar(tmp_path / "b", whiten=True)
    assert torch.allclose(stack(b.train), stack(a.train), atol=1e-5)
    assert not torch.allclose(stack(b.val), stack(a.val), atol=1e-2)
    # ... while changing one train image moves every whitened train image.
    write_cifar10(tmp_path / "c", monkeypatch, PER_BATCH, N_TEST)
    rewrite_batch(tmp_path / "c" / folder.name, "data_batch_1", slice(0, 1), seed=3)
    seal_cifar10(monkeypatch, tmp_path / "c" / folder.name)
    c = cifar(tmp_path / "c", whiten=True)
    assert not torch.allclose(stack(c.train)[1:], stack(a.train)[1:], atol=1e-2)


def test_cifar_errors_say_where_and_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DataError) as exc:
        cifar(tmp_path)
    one_line_error(
        exc, str(folder), "data_batch_1..5, test_batch", "data.download = true", "data.root"
    )

    write_cifar10(tmp_path, monkeypatch, PER_BATCH, N_TEST)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as exc:
        cifar(tmp_path)
    one_line_error(exc, "data_batch_3", str(folder), "data.download = true")

    write_cifar10(tmp_path, monkeypatch, PER_BATCH, N_TEST)
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as exc:
        cifar(tmp_path)
    one_line_error(exc, str(folder / "data_batch_2"), "md5", "data.download = true")

    # a sound pickle of the wrong shape, and a well-formed batch with other pixels: torchvision's
    # md5 check refuses both, and the message names the file, the layout and the fix
    write_cifar10(tmp_path, monkeypatch, PER_BATCH, N_TEST)
    entry = {"data": np.zeros((4, 1024), np.uint8), "labels": [0] * 4}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError) as exc:
        cifar(tmp_path)
    one_line_error(exc, str(folder / "test_batch"), "md5", "data_batch_1..5, test_batch")
    write_cifar10(tmp_path, monkeypatch, PER_BATCH, N_TEST)
    rewrite_batch(folder, "data_batch_4", slice(0, 1), seed=5)
    with pytest.raises(DataError) as exc:
        cifar(tmp_path)
    one_line_error(exc, str(folder / "data_batch_4"), "md5", "data.download = true")

    write_cifar10(tmp_path, monkeypatch, PER_BATCH, N_TEST)
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), val_size=40))
    one_line_error(exc, "data.val_size", "40")


def test_cifar_downloads_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_download(url: str, root: str, **kw: object) -> None:
        calls.append(url)
        write_cifar10(Path(root), monkeypatch, PER_BATCH, N_TEST)

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    with pytest.raises(DataError):
        cifar(tmp_path)  # download defaults to False
    assert calls == []
    s = cifar(tmp_path, download=True)
    assert calls == [torchvision.datasets.cifar.CIFAR10.url]
    assert (len(s.train), len(s.test)) == (32, 6)
    cifar(tmp_path, download=True)  # already there and sound: no second download
    assert len(calls) == 1


# -------------------------------------------------------------------------------------- imagenet


def imagenet(root: Path, **kw: object) -> DatasetSplits:
    return load_dataset(DataConfig(name="imagenet", root=str(root), image_size=32, **kw))


def test_imagenet_splits_shapes_labels_and_colours(tmp_path: Path) -> None:
    write_imagenet(tmp_path, per_class=4, n_val=2)
    s = imagenet(tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 6)  # 1 of 4 per class held out
    assert s.input_shape == (3, 32, 32) and s.num_classes == 3
    assert set(s.train.indices).isdisjoint(s.val.indices)
    assert sorted(s.train.indices + s.val.indices) == list(range(12))
    assert imagenet(tmp_path).val.indices == s.val.indices  # deterministic hold-out
    colours = list(IMAGENET_COLOURS.values())
    for ds in (s.train, s.val, s.test):
        labels = []
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and type(x) is torch.Tensor
            rgb = (x * IMAGENET_STD + IMAGENET_MEAN)[
                :, 16, 20
            ] * 255  # right of centre: full colour
            assert torch.allclose(rgb, torch.tensor(colours[y], dtype=torch.float32), atol=12)
            labels.append(y)
        assert sorted(set(labels)) == [0, 1, 2]


def test_imagenet_augment_changes_train_items_only(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    s = imagenet(tmp_path, augment=True)
    torch.manual_seed(0)
    draws = [s.train[0][0] for _ in range(6)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.allclose(d, draws[0]) for d in draws[1:])
    plain = imagenet(tmp_path)
    for split in ("val", "test"):
        ds = getattr(s, split)
        assert torch.equal(ds[0][0], ds[0][0])
        assert torch.equal(ds[0][0], getattr(plain, split)[0][0])


def test_imagenet_errors_say_where_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        imagenet(tmp_path)
    one_line_error(exc, str(tmp_path / "train"), "data.root")

    write_imagenet(tmp_path)
    empty = tmp_path / "train" / "n09999999"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as exc:
        imagenet(tmp_path)
    one_line_error(exc, str(empty), "no images")
    empty.joinpath("notes.txt").unlink()
    empty.rmdir()

    wnid = next(iter(IMAGENET_COLOURS))
    (tmp_path / "val" / wnid).rename(tmp_path / "val_moved")
    with pytest.raises(DataError) as exc:
        imagenet(tmp_path)
    one_line_error(exc, str(tmp_path / "val"), wnid)

    for d in (tmp_path / "val").iterdir():
        for f in d.iterdir():
            f.rename(tmp_path / "val" / f.name)  # flat val folder, as ImageNet ships it
        d.rmdir()
    with pytest.raises(DataError) as exc:
        imagenet(tmp_path)
    one_line_error(exc, str(tmp_path / "val"), "no class folders", "data.root")
