"""Measure bench/profiles/cpu_here.toml: ImageNet-form ResNet-18/34/50 blocks timed here at a
small input and scaled to 224x224 by pixel count (bench/scaling/project.py has their MACs)."""

from __future__ import annotations

from bench.scaling.profile import config_of, profile_blocks
from bench.scaling.project import resnet_blocks

FAMILIES = {"rec_lra": "rec_lra:topology=skip", "rec_lra_mirror": "rec_lra", "backprop": "backprop"}
MEASURED = ("resnet18", "resnet34", "resnet50")  # the models bench.scaling projects


def measure(size: int, batch: int, reps: int) -> dict:
    scale = (224 / size) ** 2
    models: dict = {}
    for model in MEASURED:
        ov = [
            f"model.name={model}",
            'model.form="imagenet"',
            "model.width=64",
            "data.name=synthetic",
            f"data.synthetic_shape=[3, {size}, {size}]",
            f"train.batch_size={batch}",
            "pipeline.micro_batches=1",
        ]
        entry: dict = {}
        for fam, spec in FAMILIES.items():
            p = profile_blocks(config_of(ov, spec), reps=reps, micro_batches=1)
            entry[fam] = {
                "forward_s": [scale * v / batch for v in p.forward],
                "learn_s": [scale * v / batch for v in p.learn],
                "apply_s": list(p.apply),  # weights: independent of the input size
            }
            print(f"  {model} {fam}: {sum(entry[fam]['forward_s']) * 1e3:.2f} ms/sample fwd")
        entry["out_bytes"] = [4.0 * b["out"] for b in resnet_blocks(model)]
        models[model] = entry
    return models


def _arr(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"


def _write_models(path: str, lines: list[str], models: dict, note: str = "") -> None:
    """Append each model's per-block tables to `lines` and write the profile."""
    for model, entry in models.items():
        lines += ["", f"[models.{model}]"] + ([note] if note else [])
        lines.append(f"out_bytes = {_arr(entry['out_bytes'])}")
        for fam in FAMILIES:
            e = entry[fam]
            lines += ["", f"[models.{model}.{fam}]  # seconds per sample; apply: per step"]
            lines += [f"{k} = {_arr(e[k])}" for k in ("forward_s", "learn_s", "apply_s")]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write(path: str, models: dict, link: dict, size: int, batch: int) -> None:
    lines = [
        "# Measured here (python -m bench.scaling --measure-profile): a 2-core CPU VM, one torch",
        f"# thread per block. ResNet-18/34/50 ImageNet form timed at {size}x{size},",
        f"# micro-batch {batch}, scaled to 224x224 by pixel count (x{(224 / size) ** 2:.2f}).",
        "# Link: Ray on this machine.",
        "# Projected with one core per stage (cores unlimited), i.e. a cluster of such cores.",
        'name = "cpu_here"',
        "micro_batch = 8        # samples per micro-batch projected",
        "micro_batches = 32     # per step (the same for every K and rule)",
        "",
        "[link]",
        f"call_s = {link['call_s']:.6g}        # one Ray actor call's own work (measured)",
        f"latency_s = {link['latency_s']:.6g}     # per hop (measured)",
        f"bandwidth_Bps = {link['bandwidth_Bps']:.6g}  # per hop, via {link['bandwidth_via']}",
        *_driver_line(link),
    ]
    _write_models(path, lines, models, "# float32 activation bytes per sample, per block")


A100 = {  # published figures, named in the written profile's header
    "r50_images_per_s": 2470.0,  # 1x A100 80GB, AMP, ResNet-50 v1.5 PyTorch, batch 256
    "fwd_share": 1 / 3,  # forward : backward = 1 : 2 (backward: input and weight gradients)
    "rec_lra_over_backprop": 1.21,  # one-process step ratio measured here (README, ResNet-18)
    "apply_s": 0.3e-3,  # SGD/AdamW over ~25M fp32 params at ~2 TB/s HBM: ~0.3 ms per step
    "act_bytes": 2.0,  # fp16 activations
}


MEASURED_LINK = {  # key: what it is (bench.scaling's validation: calibration.<source>)
    "driver_call_s": "the driver's CPU per stream call (driver_s_per_call)",
    "driver_p2p_call_s": "the driver's CPU per p2p step call (driver_s_per_p2p_call)",
    "p2p_op_s": "a p2p op's messages, per op (fitted_p2p_op_s)",
}


def _driver_line(link: dict) -> list[str]:
    """The driver's and the p2p engine's per-call costs, where measured."""
    return [f"{k} = {link[k]:.6g}  # {what}" for k, what in MEASURED_LINK.items() if k in link]


def derive_gpu(path: str, link: dict) -> None:
    """An A100 profile: ResNet-50's published training throughput spread over its blocks by
    forward MACs (uniform seconds per MAC), the same seconds per MAC for ResNet-18/34."""
    a = A100
    r50 = resnet_blocks("resnet50")
    per_mac = (1.0 / a["r50_images_per_s"]) / sum(b["macs"] for b in r50)  # F + B, per sample
    models: dict = {}
    for model in ("resnet18", "resnet34", "resnet50"):
        blocks = resnet_blocks(model)
        total = sum(b["macs"] for b in blocks)
        fwd = [per_mac * a["fwd_share"] * b["macs"] for b in blocks]
        bwd = [per_mac * (1 - a["fwd_share"]) * b["macs"] for b in blocks]
        # rec-LRA's learn: its step is r x backprop's, forward unchanged: learn = r(F+B) - F
        r = a["rec_lra_over_backprop"]
        rec = [r * (f + b) - f for f, b in zip(fwd, bwd, strict=True)]
        apply = [a["apply_s"] * b["macs"] / total for b in blocks]
        entry: dict = {"out_bytes": [a["act_bytes"] * b["out"] for b in blocks]}
        entry["backprop"] = {"forward_s": fwd, "learn_s": bwd, "apply_s": apply}
        for fam in ("rec_lra", "rec_lra_mirror"):
            entry[fam] = {"forward_s": fwd, "learn_s": rec, "apply_s": apply}
        models[model] = entry
    header = [
        "# Derived, not measured (python -c 'from bench.scaling.toml import *; derive_gpu(...)').",
        "# Sources: ResNet-50 v1.5 training, 1x A100 80GB, mixed precision: 2470 img/s",
        "#   (NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md,",
        "#   'Training performance: NVIDIA DGX A100 (8x A100 80GB)', pytorch-21.03 NGC).",
        "# Per-block split: by forward MACs (bench/scaling/project.resnet_blocks), assuming",
        "#   uniform seconds per MAC; ResNet-18/34 at ResNet-50's seconds per MAC.",
        "# forward : backward = 1 : 2. rec-LRA's step = 1.21 x backprop's (measured here, README",
        "#   'The single-process step'), the extra in its learn. fp16 activations (2 bytes).",
        "# Link: one stage per GPU, 8 per node (DGX A100): within a node NVLink 3, 300 GB/s per",
        "#   direction (600 GB/s total); across nodes HDR InfiniBand 200 Gb/s = 25 GB/s, one HCA",
        "#   per GPU; latency 20 us (NCCL point-to-point order); call_s: one Ray actor call's",
        "#   own work as measured on this machine (not overlapped with GPU work: conservative);",
        "#   driver_call_s, driver_p2p_call_s, p2p_op_s: measured here (bench.scaling's",
        "#   validation); the driver has a core of its own.",
        "# Micro-batch 64 samples, 32 micro-batches per step (batch 2048) for every K and rule.",
    ]
    lines = [*header, 'name = "a100"', "micro_batch = 64", "micro_batches = 32", ""]
    lines += [
        "[link]",
        f"call_s = {link['call_s']:.6g}",
        "latency_s = 2e-05",
        "bandwidth_Bps = 2.5e10        # between nodes: HDR InfiniBand, 200 Gb/s per GPU",
        "intra_bandwidth_Bps = 3e11    # within a node: NVLink 3, 300 GB/s per direction",
        "stages_per_node = 8           # a DGX A100: 8 GPUs, one stage each",
        *_driver_line(link),
    ]

    _write_models(path, lines, models)
