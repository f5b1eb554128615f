"""data.decode = "ray": train batches decoded in a Ray actor equal the driver's, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from ckpt_helpers import TINY
from fixtures_data import write_imagenet

from driver.config import ConfigError, load_config
from driver.config.data import DataConfig
from driver.data.common import DatasetSplits
from driver.data.decode import RayDecoded
from driver.data.load import load_dataset, make_loader
from driver.run.epochs import Epoch, Position
from driver.run.train import train

pytestmark = pytest.mark.ray


def _imagenet(root: Path, *, augment: bool) -> DatasetSplits:
    write_imagenet(root, per_class=6, n_val=2)
    return load_dataset(DataConfig(name="imagenet", root=str(root), image_size=32, augment=augment))


@pytest.mark.parametrize("no_ray", ["pipeline.stages=1", 'pipeline.backend="local"'])
def test_ray_decoding_in_a_run_without_ray_is_refused_by_the_config(no_ray):
    with pytest.raises(ConfigError, match=r'has no Ray.*set data.decode = "driver"'):
        load_config(None, [*TINY, 'data.decode="ray"', "pipeline.stages=2", no_ray])


def test_ray_decoding_without_ray_is_refused_with_the_fix(tmp_path):
    assert not ray.is_initialized()  # this module's Ray starts with the next test
    cfg = load_config(None, [*TINY, 'data.decode="ray"', "pipeline.stages=2"])  # Ray not up
    ds = _imagenet(tmp_path, augment=False).train
    with pytest.raises(ValueError, match=r'this run has no Ray.*set data.decode = "driver"'):
        Epoch(cfg, ds, Position(), None)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("augment", [False, True])
def test_ray_decoded_jpeg_batches_equal_the_drivers(local_ray, tmp_path, augment):
    """Real JPEGs, decoded and transformed (random crops and flips too) in the actor, from a
    mid-pass start: the same tensors as the driver's own loader."""
    ds = _imagenet(tmp_path, augment=augment).train
    order = {"shuffle": True, "seed": 4, "epoch": 1, "start": 1}
    here = list(make_loader(ds, 4, **order))  # type: ignore[arg-type]
    there = list(RayDecoded(ds, 4, **order))  # type: ignore[arg-type]
    assert len(here) == len(there) == 3  # 15 train images (one a class held out): batches 1-3
    for (x, y), (rx, ry) in zip(here, there, strict=True):
        assert x.shape == (len(y), 3, 32, 32)
        assert torch.equal(ry, y) and torch.equal(rx, x)


def test_a_decoder_that_cannot_be_placed_times_out_naming_the_keys(local_ray, tmp_path):
    ds = _imagenet(tmp_path, augment=False).train
    batches = RayDecoded(ds, 4, shuffle=True, seed=0, cpus=64, timeout_s=1.0)
    with pytest.raises(TimeoutError, match=r"data.decode_timeout_s = 1 s.*decode_cpus = 64"):
        next(iter(batches))


def test_a_run_decoding_on_ray_trains_as_one_decoding_in_the_driver(local_ray, digits, tmp_path):
    two = ["pipeline.stages=2", "pipeline.boundaries=[2]", "pipeline.micro_batches=2"]
    base = [*TINY, *two, "pipeline.cpus_per_stage=0.5"]
    runs = {
        decode: train(
            load_config(None, [*base, f'data.decode="{decode}"', "data.decode_cpus=1"]),
            quiet=True,
            out_dir=tmp_path / decode,
            splits=digits,
        )
        for decode in ("driver", "ray")
    }
    driver, ray_run = runs["driver"], runs["ray"]
    assert ray_run.steps == driver.steps == 19
    assert ray_run.epochs[0]["train_loss"] == driver.epochs[0]["train_loss"]
    assert ray_run.test_acc == driver.test_acc
