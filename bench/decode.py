"""Benchmark: ImageNet-format JPEG decoding, in the driver (DataLoader) and in a Ray actor.

    python -m bench.decode --json bench/results/decode_cpu.json
    python -m bench.decode --images 60 --json /tmp/decode.json     # a smoke run

Writes a small ImageNet-format folder of real JPEGs (PIL; by default 2,000 images of 256x256 in
10 class folders, in a temporary directory unless --dir names one), loads it as a run does
(driver/data/imagenet.py: decode, resize or random-resized crop, normalise) and times whole
passes over the train split with the run's loader (driver/data/load.py make_loader):
data.decode = "driver" with 0, 1 and 2 DataLoader workers, and data.decode = "ray" (a decoder
actor on a local Ray, driver/data/decode.py) with the worker counts of --ray-workers. Each row
gives images/s (the median pass; passes of all rows are interleaved round by round) and the
driver process's CPU time per image, which is what decoding off the driver takes off the head
node, and the wait for the first batch (worker or actor start-up, in every pass). The images
are smooth colour fields with pixel noise, not photos.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image

from bench.output import save
from driver.config.data import DataConfig
from driver.data.decode import RayDecoded
from driver.data.load import load_dataset, make_loader


def write_folder(root: Path, images: int, size: int, classes: int, seed: int = 0) -> Path:
    """`root/{train,val}/class_<c>/<i>.JPEG`: `images` train JPEGs in `classes` folders (and
    two a class in val), `size` x `size`, quality 90."""
    rng = np.random.default_rng(seed)
    across, down = np.meshgrid(*[np.linspace(0.0, 1.0, size)] * 2)
    for split, count in (("train", images), ("val", 2 * classes)):
        for i in range(count):
            folder = root / split / f"class_{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            a, b, c = rng.uniform(0.2, 1.0, 3) * 255
            field = np.stack([a * across, b * down, c * (1 - across * down)], axis=-1)
            field = field + rng.normal(0, 12, (size, size, 3))
            pixels = np.clip(field, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)
    return root


def timed_pass(batches: Callable[[], Iterable[Any]]) -> tuple[float, float, int, float]:
    """(wall s, driver CPU s, images, s to the first batch) of one pass over `batches()`."""
    t0, c0, n, first = time.perf_counter(), time.process_time(), 0, 0.0
    for _, y in batches():
        first = first or time.perf_counter() - t0
        n += len(y)
    return time.perf_counter() - t0, time.process_time() - c0, n, first


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="train JPEGs to write")
    ap.add_argument("--size", type=int, default=256, help="the JPEGs' side in pixels")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224, help="data.image_size (the crop)")
    ap.add_argument("--augment", action="store_true", help="random-resized crops and flips")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="driver DataLoader worker counts")
    ap.add_argument("--ray-workers", default="0,1", help="the Ray decoder's DataLoader workers")
    ap.add_argument("--ray-cpus", type=float, default=2.0, help="data.decode_cpus and Ray's CPUs")
    ap.add_argument("--rounds", type=int, default=2, help="passes of each row (median)")
    ap.add_argument("--dir", default="", help="write (or reuse) the folder here, not in a temp dir")
    ap.add_argument("--json", default="bench/results/decode.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        if not (root / "train").is_dir():
            t0 = time.perf_counter()
            write_folder(root, args.images, args.size, args.classes)
            print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s under {root}")
        cfg = DataConfig(
            name="imagenet", root=str(root), image_size=args.image_size, augment=args.augment
        )
        train: Any = load_dataset(cfg).train

        def driver(workers: int) -> Callable[[], Iterable[Any]]:
            return lambda: make_loader(train, args.batch, shuffle=True, seed=0, num_workers=workers)

        def on_ray(workers: int) -> Callable[[], Iterable[Any]]:
            return lambda: RayDecoded(
                train, args.batch, shuffle=True, seed=0, num_workers=workers, cpus=args.ray_cpus
            )

        rows: dict[str, tuple[str, int, Callable[[], Iterable[Any]]]] = {}
        for w in (int(v) for v in args.workers.split(",") if v):
            rows[f"driver/{w}"] = ("driver", w, driver(w))
        for w in (int(v) for v in args.ray_workers.split(",") if v):
            rows[f"ray/{w}"] = ("ray", w, on_ray(w))
        if any(where == "ray" for where, _, _ in rows.values()):
            ray.init(num_cpus=max(1, int(args.ray_cpus)), include_dashboard=False)
        passes: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in rows}
        try:
            for _ in range(args.rounds):
                for key, (_, _, batches) in rows.items():
                    passes[key].append(timed_pass(batches))
        finally:
            if ray.is_initialized():
                ray.shutdown()

    result: dict[str, Any] = {
        "images": len(train),
        "jpeg_size": args.size,
        "image_size": args.image_size,
        "augment": args.augment,
        "batch": args.batch,
        "rounds": args.rounds,
        "ray_cpus": args.ray_cpus,
        "rows": [],
    }
    lines = [
        f"{len(train)} JPEGs {args.size}x{args.size} -> {args.image_size}, batch {args.batch}",
        f"{'decode':<8}{'workers':>8}{'images/s':>11}{'driver CPU ms/image':>21}"
        f"{'first batch s':>15}",
    ]
    for key, (where, workers, _) in rows.items():
        wall = statistics.median(p[0] for p in passes[key])
        cpu = statistics.median(p[1] for p in passes[key])
        n = passes[key][0][2]
        row = {
            "decode": where,
            "workers": workers,
            "images_per_s": n / wall,
            "driver_cpu_ms_per_image": 1000 * cpu / n,
            "first_batch_s": statistics.median(p[3] for p in passes[key]),
            "pass_seconds": [p[0] for p in passes[key]],
        }
        result["rows"].append(row)
        lines.append(
            f"{where:<8}{workers:>8}{row['images_per_s']:>11.1f}"
            f"{row['driver_cpu_ms_per_image']:>21.2f}{row['first_batch_s']:>15.2f}"
        )
    return save(result, args.json, "\n".join(lines))


if __name__ == "__main__":
    main()
