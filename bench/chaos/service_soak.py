"""Chaos soak of the served API: `reclra serve` in a process of its own survives killed runs,
an over-budget run and hundreds of malformed requests, while /metrics stays scrapeable.

    python -m bench.chaos --service --json bench/results/chaos_service_cpu.json

It starts `python -m driver.cli serve` (service.max_active_runs = 3, a memory budget a small
digits run fits and a wide one does not), starts three small digits runs at once, SIGKILLs one
run's process (it must end `failed`, "killed by signal 9"), asks for an over-budget run
(RESOURCE_EXHAUSTED), then sends the malformed-request corpus below, each request with the
status code it must get; a thread scrapes /metrics every ~0.5 s throughout. The two runs left
must end `succeeded` at their max_steps, and the service process must never die.

The corpus (`corpus`): a fixed part written out below (bad TOML, 5,000-deep nesting, huge
numbers, NaN and infinities, wrong types, unknown keys and sections, 5 MB bodies, bad tokens,
bad run ids, data roots outside the allowed ones, invalid UTF-8 on the wire, NUL characters,
unknown runs and methods) and a generated part from a seeded `random.Random` (no hypothesis):
out-of-bounds values and wrong types for keys drawn from every section's dataclass, unknown
keys, broken TOML, bad run ids, unknown ids, bad tokens, bad overrides, invalid UTF-8. Every
generated config is refused whatever else happens: each mutation makes it invalid, and its
base is over the memory budget, so a check that lets a bad value through shows up as
RESOURCE_EXHAUSTED instead of a run that trains. `check` sends the cases and compares codes
(tests/test_chaos_service_smoke.py sends a sample to an in-process service).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import typing
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.output import save
from driver.api import reclra_pb2 as _pb
from driver.api.service import METHODS, SERVICE, Client
from driver.config import SECTIONS, parse_config
from driver.config.docs import toml_value
from driver.run.memory import estimate_memory

pb: Any = _pb  # generated messages carry no static types
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "chaos-soak-token"
RIGHT = "<the right token>"  # Case.auth: the token the service expects, as "Bearer <token>"
ACTIVE = 3  # service.max_active_runs, and the runs the soak starts at once
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # service.max_request_bytes (its default)
BIG = 5 * 1024 * 1024
LONG = 20_000  # characters: past the 16 KB of metadata a client takes (status details included)
RPC_TIMEOUT_S = 30.0
TERMINAL = {"succeeded", "failed", "stopped"}

# a small digits run (18 steps an epoch); the soak's runs add train.max_steps, the bound that
# ends them (it is never sent as a malformed request's base)
SMALL = """
[model]
width = 4
[train]
epochs = 200
batch_size = 64
log_every = 1000
threads = 1
"""
# valid, but over any budget this soak sets: the generated cases' base (see the docstring)
OVER_BUDGET = """
[model]
width = 4096
[train]
epochs = 1
batch_size = 4096
log_every = 1000
"""
OVER_BUDGET_WIDE = """
[model]
width = 4096
[train]
epochs = 1
max_steps = 1
batch_size = 64
"""


def budget_gib(active: int = ACTIVE) -> float:
    """service.max_run_memory_gib: `active` small runs fit side by side (the service starts a
    run only while the active runs' estimates, summed, fit the budget), with a quarter to spare
    and rounded up to half a GiB; the over-budget configs are far past it (asserted)."""
    gib = 1024**3
    small = estimate_memory(parse_config(SMALL)).total / gib
    budget = math.ceil(active * small * 1.25 * 2) / 2
    for text in (OVER_BUDGET, OVER_BUDGET_WIDE):
        assert estimate_memory(parse_config(text)).total / gib > 4 * budget, text
    return budget


# -- the corpus ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One malformed request and the status code it must get. `body`: the serialized request
    (bytes, sent as they are, so invalid protobuf and invalid UTF-8 can be sent); `auth`: the
    whole authorization metadata value (RIGHT: the service's token; None: no metadata)."""

    family: str
    summary: str
    method: str
    body: bytes
    expected: str  # a grpc.StatusCode's name
    auth: str | None = RIGHT


def _start(toml: str = "", overrides: list[str] | None = None, run_id: str = "") -> bytes:
    msg = pb.StartRunRequest(config_toml=toml, overrides=overrides or [], run_id=run_id)
    return bytes(msg.SerializeToString())


def _by_id(method: str, run_id: str) -> bytes:
    req = METHODS[method][0]
    return bytes(getattr(pb, req)(run_id=run_id).SerializeToString())


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (the payload need not be UTF-8)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _short(text: str, n: int = 90) -> str:
    shown = repr(text)
    return shown if len(shown) <= n else f"{shown[: n - 20]}...({len(text)} chars)"


def _with(section: str, lines: str, base: str = SMALL) -> str:
    """`base` with `lines` (`key = value` each) set in [section]: a key `base` sets there is
    replaced, not repeated (a repeated key would be refused as bad TOML, whatever its value);
    a section `base` lacks is appended."""
    head, keys = f"[{section}]", {ln.split("=")[0].strip() for ln in lines.splitlines()}
    out, current = [], ""
    for ln in base.splitlines():
        if ln.startswith("["):
            current = ln.strip()
        elif current == head and ln.split("=")[0].strip() in keys:
            continue
        out.append(ln)
        if ln.strip() == head:
            out.append(lines)
    if head not in base.splitlines():
        out += [head, lines]
    return "\n".join(out) + "\n"


def _config_case(family: str, section: str, line: str, expected: str = "INVALID_ARGUMENT") -> Case:
    return Case(
        family,
        f"[{section if len(section) < 40 else _short(section, 30)}] {_short(line, 70)}",
        "StartRun",
        _start(_with(section, line)),
        expected,
    )


def fixed_cases() -> list[Case]:
    """The written-out part of the corpus."""
    inv, cases = "INVALID_ARGUMENT", list[Case]()
    add = cases.append

    # bad TOML
    for text in (
        "[model\nwidth = 4",
        "[model]\nwidth = = 4",
        "[model]\nwidth = 4\n[model]\nwidth = 5",
        "[model]\nwidth = 4\nwidth = 5",
        '[model]\nname = "resnet8',
        "[model]\nwidth = 0x",
        "[[model]]\nwidth = 4",
        "model = 3",
        "model = [1, 2]",
        "= 4",
        "[]",
        "[model]\nwidth = 4 # ok\n[train\nepochs = 1",
        "\x00",
        "[model]\nwidth = 4\x00",
        '[data]\nroot = "a\x00b"',
        '[data]\nroot = "\\uD800"',  # a lone surrogate, escaped: no Unicode scalar value
        '[data]\nroot = "\\U00110000"',
        "\ufeff[model]\nwidth = 0",
        "[model]\r\nwidth = 0\r",
        "[\u6a21\u578b]\nwidth = 4",
        "[model]\nwidth = 4\n" * 2000,
    ):
        add(Case("bad_toml", f"config {_short(text, 60)}", "StartRun", _start(text), inv))
    # deep nesting (5,000 levels)
    deep = 5000
    for section, value in (
        ("train", "[" * deep + "]" * deep),
        ("train", "[" * deep + "1" + "]" * deep),
        ("model", "{a = " * deep + "1" + "}" * deep),
    ):
        add(_config_case("deep", section, f"epochs = {value}"))
    add(
        Case(
            "deep",
            "[a.a.a...] 5000 dotted tables",
            "StartRun",
            _start("[" + ".".join(["a"] * deep) + "]\nx = 1"),
            inv,
        )
    )
    add(
        Case(
            "deep",
            "override 5000 nested arrays",
            "StartRun",
            _start(SMALL, ["train.epochs=" + "[" * deep + "]" * deep]),
            inv,
        )
    )
    # huge numbers
    for section, line in (
        ("train", "epochs = 1_000_000_000_000"),
        ("train", "batch_size = 1_000_000_000"),
        ("model", "width = 1_000_000_000"),
        ("train", f"epochs = {10**400}"),
        ("train", f"max_steps = {10**400}"),
        ("train", f"epochs = {'9' * 5000}"),  # past Python's 4,300 digits
        ("optim", f"lr = {10**400}"),  # an integer too large for a float key
        ("optim", "lr = 1e400"),  # inf once parsed
        ("rule", f"beta = -{10**400}"),
        ("train", "epochs = -1"),
        ("train", "batch_size = 0"),
        ("model", "width = -5"),
        ("train", "seed = 4294967296"),
        ("data", "num_workers = 100000"),
        ("pipeline", "micro_batches = 128"),  # more than train.batch_size
        ("pipeline", "stages = 1000"),
        ("pipeline", "stages = 200"),  # within the bound, more than the model's blocks
        ("pipeline", "step_timeout_s = 1e30"),
        ("optim", "total_steps = -7"),
        ("cluster", "num_cpus = 100000000"),
    ):
        add(_config_case("huge_number", section, line))
    # NaN and infinities
    for section, key in (
        ("optim", "lr"),
        ("rule", "beta"),
        ("rule", "gamma"),
        ("optim", "weight_decay"),
        ("optim", "momentum"),
        ("pipeline", "cpus_per_stage"),
        ("pipeline", "step_timeout_s"),
    ):
        for value in ("nan", "inf", "-inf"):
            add(_config_case("nan_inf", section, f"{key} = {value}"))
    # wrong types
    for section, line in (
        ("model", 'width = "4"'),
        ("model", "width = 4.5"),
        ("model", "width = true"),
        ("model", "width = [4]"),
        ("model", "width = {a = 1}"),
        ("model", "width = 1979-05-27"),
        ("model", "name = 5"),
        ("model", 'name = "vgg"'),
        ("model", "batchnorm = 1"),
        ("train", "epochs = 1.5"),
        ("train", 'dtype = "float16"'),
        ("train", 'device = "tpu"'),
        ("train", "compare = 3"),
        ("train", 'compare = ["nosuchrule"]'),
        ("rule", 'beta = "x"'),
        ("rule", 'name = "nosuchrule"'),
        ("optim", "lr = [0.1]"),
        ("optim", 'name = "lbfgs"'),
        ("data", "name = 5"),
        ("data", "synthetic_shape = [1, 2]"),
        ("data", 'root = ""'),
        ("data", "root = [1]"),
        ("pipeline", "stages = true"),
        ("pipeline", 'stages = "many"'),
        ("pipeline", "stages = 2.5"),
        ("cluster", "runtime_env = 5"),
    ):
        add(_config_case("wrong_type", section, line))
    # unknown keys and sections
    for text in (
        _with("model", "nope = 1"),
        _with("train", "Epochs = 3"),
        _with("nosuchsection", "x = 1"),
        SMALL + "\nx = 1\n",  # a top-level key: a section that is no table
        _with("compare.backprop.nope", "x = 1"),
        _with("compare.nobody.rule", "beta = 0.1"),
        _with("compare.backprop.rule", "beta = nan"),
    ):
        tail = text.strip().splitlines()[-2:] if "compare" in text or "section" in text else []
        add(
            Case(
                "unknown_key",
                f"config ...{_short(' '.join(tail) or text[-40:], 60)}",
                "StartRun",
                _start(text),
                inv,
            )
        )
    # what a request may not set: where the run writes, downloads, the service, the workers' env
    for section, line in (
        ("train", 'out_dir = "/tmp/elsewhere"'),
        ("train", 'out_dir = "s3://bucket/elsewhere"'),
        ("service", "port = 1"),
        ("service", "max_run_memory_gib = 1000.0"),
        ("cluster", 'runtime_env = {pip = ["evil"]}'),
    ):
        add(_config_case("forbidden_key", section, line))
    # data.root outside the allowed roots (and a data set that is not there)
    for root in ("/etc", "/", "..", "../../..", "/proc/self", "~", "/tmp/../etc"):
        for name in ("fashion_mnist", "mnist"):
            line = f'name = "{name}"\nroot = "{root}"'
            add(_config_case("data_root", "data", line))
    add(_config_case("data_root", "data", 'name = "cifar10"\nroot = "/etc"\ndownload = true'))
    # overrides
    for item in (
        "model.width",
        "=",
        "width=4",
        "nosuch.key=1",
        "model.width=abc",
        "model.width=4096000",
        "model.width=" + "9" * 5000,
        "compare.x=1",
        "optim.lr=nan",
        "optim.lr=inf",
        "train.epochs=nan",
        "rule.beta=1e999",
        "train.out_dir=/tmp/x",
        "pipeline.stages=1000",
        "model.width=\x00",
    ):
        add(
            Case("override", f"override {_short(item, 60)}", "StartRun", _start(SMALL, [item]), inv)
        )
    # bad run ids (with a config over budget: an id let through shows as RESOURCE_EXHAUSTED)
    for run_id in (
        "../x",
        "a/b",
        "/abs",
        ".",
        "..",
        "...",
        "-x",
        "_x",
        ".hidden",
        "x" * 65,
        "x" * 10_000,
        "a b",
        "a\x00b",
        "\x00",
        "a\nb",
        "\u00e9t\u00e9",
        "run\u202e",
        "\U0001f600",
        "a\\b",
        "a:b",
        "*",
        "%2e%2e",
    ):
        add(
            Case(
                "bad_run_id",
                f"StartRun run_id {_short(run_id, 50)}",
                "StartRun",
                _start(OVER_BUDGET, run_id=run_id),
                inv,
            )
        )
    # unknown runs
    for method in ("GetRun", "StopRun", "WatchRun"):
        for run_id in ("nope", "", "../../etc/passwd", "a" * 64, "\x00", "\u00fc", " ", "*"):
            add(
                Case(
                    "unknown_run",
                    f"{method} {_short(run_id, 50)}",
                    method,
                    _by_id(method, run_id),
                    "NOT_FOUND",
                )
            )
    # bad or missing tokens (on requests the service would refuse anyway)
    bad_start = _start(_with("model", "width = 0"))
    for auth in (
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"bearer {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN}x",
        f"Bearer  {TOKEN}",
        f"Bearer {TOKEN[:-1]}",
        "Basic Zm9vOmJhcg==",
        f"Bearer {TOKEN} ",
    ):
        for method, body in (
            ("StartRun", bad_start),
            ("GetRun", _by_id("GetRun", "nope")),
            ("ListRuns", b""),
            ("StopRun", _by_id("StopRun", "nope")),
            ("WatchRun", _by_id("WatchRun", "nope")),
        ):
            add(
                Case(
                    "bad_token",
                    f"{method} authorization {_short(str(auth), 40)}",
                    method,
                    body,
                    "UNAUTHENTICATED",
                    auth,
                )
            )
    # long values a refusal might quote whole: its details must stay readable (a client drops
    # status details past 16 KB of metadata, and the call then reads RESOURCE_EXHAUSTED)
    long = "k" * LONG
    for section, line in (
        ("model", f"{long} = 1"),
        ("rule", f"name = {json.dumps(long)}"),
        ("data", f'name = "mnist"\nroot = "/{long}"'),
        (long, "x = 1"),
    ):
        add(_config_case("long_echo", section, line))
    add(Case("long_echo", "override 20 KB key", "StartRun", _start(SMALL, [long + "=1"]), inv))
    add(
        Case(
            "long_echo",
            "override 20 KB value",
            "StartRun",
            _start(SMALL, [f"model.name={long}"]),
            inv,
        )
    )
    for method in ("GetRun", "StopRun", "WatchRun"):
        add(Case("long_echo", f"{method} 20 KB id", method, _by_id(method, long), "NOT_FOUND"))
    # bodies over service.max_request_bytes
    for summary, method, body in (
        ("StartRun 5 MB config", "StartRun", _start("# " + "x" * BIG)),
        ("StartRun 4 MiB + 100 B config", "StartRun", _start("#" * (MAX_REQUEST_BYTES + 100))),
        ("StartRun 5 MB of overrides", "StartRun", _start(SMALL, ["model.width=4" * 80] * 5000)),
        ("StartRun 5 MB run_id", "StartRun", _start(OVER_BUDGET, run_id="a" * BIG)),
        ("GetRun 5 MB run_id", "GetRun", _by_id("GetRun", "a" * BIG)),
        ("StopRun 5 MB run_id", "StopRun", _by_id("StopRun", "a" * BIG)),
        ("WatchRun 5 MB run_id", "WatchRun", _by_id("WatchRun", "a" * BIG)),
        ("ListRuns 5 MB unknown field", "ListRuns", _field(7, b"\x01" * BIG)),
    ):
        add(Case("too_big", summary, method, body, "RESOURCE_EXHAUSTED"))
    # under the request limit but big: parsed and refused
    add(
        Case(
            "big",
            "StartRun 3 MB of comments, then width = 0",
            "StartRun",
            _start("#" * (3 << 20) + "\n" + _with("model", "width = 0")),
            inv,
        )
    )
    # over the memory budget
    for text in (OVER_BUDGET, OVER_BUDGET_WIDE):
        add(
            Case(
                "over_budget",
                f"config {_short(text.strip(), 60)}",
                "StartRun",
                _start(text),
                "RESOURCE_EXHAUSTED",
            )
        )
    # on the wire: invalid UTF-8 in string fields, broken protobuf
    guard = _field(1, OVER_BUDGET.encode())
    for summary, method, body in (
        ("StartRun config_toml \\xff", "StartRun", _field(1, b"[model]\nwidth = \xff")),
        ("StartRun config_toml \\xc3 (cut)", "StartRun", _field(1, b"[model]\nwidth = 4\xc3")),
        ("StartRun config_toml surrogate", "StartRun", _field(1, b"[data]\nroot = '\xed\xa0\x80'")),
        ("StartRun overrides \\xfe", "StartRun", guard + _field(2, b"model.width=\xfe")),
        ("StartRun run_id \\x80", "StartRun", guard + _field(3, b"run\x80")),
        ("StartRun run_id overlong /", "StartRun", guard + _field(3, b"a\xc0\xafb")),
        ("GetRun run_id \\xff\\xfe", "GetRun", _field(1, b"\xff\xfe")),
        ("StopRun run_id \\xed\\xa0\\x80", "StopRun", _field(1, b"\xed\xa0\x80")),
        ("WatchRun run_id \\xf8", "WatchRun", _field(1, b"\xf8\x88\x80\x80\x80")),
        ("StartRun truncated field", "StartRun", b"\x0a\x64[model]"),
        ("GetRun truncated field", "GetRun", b"\x0a\x05ab"),
        ("GetRun endless varint", "GetRun", b"\x0a" + b"\xff" * 11),
        ("StopRun field number 0", "StopRun", b"\x02\x01a"),
        ("GetRun bare garbage", "GetRun", b"\xff\xff\xff\xff"),
    ):
        add(Case("wire", summary, method, body, inv))
    # methods the service does not have
    for path in (f"/{SERVICE}/DeleteEverything", "/reclra.v1.Other/GetRun", f"/{SERVICE}/getrun"):
        add(Case("no_method", f"call {path}", path, b"", "UNIMPLEMENTED"))
    return cases


# -- the generated part -------------------------------------------------------------------------
def _kind(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "choice"
    if origin is tuple:
        return "tuple"
    if origin is dict:
        return "dict"
    if origin in (typing.Union, __import__("types").UnionType):
        return "int_or_str"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(hint, "other")


def _keys() -> list[tuple[str, str, str, tuple[float, float] | None]]:
    """Every request-settable key: (section, key, kind, bound or None)."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        limits = getattr(cls, "LIMITS", {}) or {}
        for f in dataclasses.fields(cls):
            out.append((section, f.name, _kind(hints[f.name]), limits.get(f.name)))
    return out


WRONG = {  # values of a type each kind of key refuses
    "int": ["x", 1.5, True, [1], {"a": 1}, ""],
    "float": ["x", True, [1.0], {"a": 1}],
    "str": [5, 1.5, True, ["a"], {"a": 1}],
    "bool": [1, 0, "true", 1.0, []],
    "choice": ["no-such-choice", 3, True, [], ""],
    "tuple": [3, "x", True, {"a": 1}, [[1]]],
    "dict": [5, "x", [], True],
    "int_or_str": ["many", 1.5, [], {"a": 1}, True],
}
ODD_CHARS = [
    "/",
    "\\",
    " ",
    "\t",
    "\n",
    "\x00",
    "\u00e9",
    "\u00df",
    "\u202e",
    "\U0001f600",
    ":",
    "*",
    "?",
    "<",
    ">",
    "|",
    "%",
    "$",
    "~",
    "'",
    '"',
    "\x7f",
    "\u0301",
    "\x1b",
]
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
JUNK = "[]{}=\"',.#\\\n\t =[[ ]] \"\"\" ''' 1e 0x +- :"


def _out_of_bounds(rng: random.Random, kind: str, bound: tuple[float, float]) -> Any:
    low, high = bound
    if kind == "float":
        return rng.choice([float("nan"), float("inf"), float("-inf"), high * 2 + 1, low - 1.0])
    return rng.choice(
        [
            int(high) + 1,
            int(high) * 10 + 7,
            int(low) - 1,
            10 ** rng.randint(13, 400) + int(high),
            -(10 ** rng.randint(2, 400)),
        ]
    )


def _mutated_config(rng: random.Random) -> tuple[str, str]:
    """(summary, config): OVER_BUDGET with one key made invalid (out of bounds, wrong type,
    unknown), or the service's own keys set."""
    keys = _keys()
    while True:
        section, key, kind, bound = rng.choice(keys)
        how = rng.choice(["bound", "type", "type", "unknown"])
        if section == "service":
            how = "service"
        if how == "bound" and (bound is None or kind not in ("int", "float", "int_or_str")):
            continue
        if how == "type" and kind not in WRONG:
            continue
        break
    if how == "bound":
        assert bound is not None
        value: Any = _out_of_bounds(rng, "float" if kind == "float" else "int", bound)
    elif how == "type":
        value = rng.choice(WRONG[kind])
    elif how == "service":  # any value but the key's default (which a request may repeat)
        default = getattr(SECTIONS["service"](), key)
        value = rng.choice([v for v in (1, 0, "x", True, [1], 10**6) if v != default])
    else:
        known = {k for s, k, _, _ in keys if s == section}
        while key in known:
            key = "".join(rng.choice("abcdefghij_") for _ in range(rng.randint(1, 12))).strip("_")
            key = key or "k"
        value = rng.choice([1, "x", True, 1.5])
    line = f"{key} = {toml_value(value)}"
    return f"{how} [{section}] {_short(line, 60)}", _with(section, line, OVER_BUDGET)


def _brokentoml_value(rng: random.Random) -> str:
    for _ in range(100):
        text = OVER_BUDGET
        at = rng.randint(0, len(text))
        junk = "".join(rng.choice(JUNK) for _ in range(rng.randint(1, 12)))
        text = text[:at] + junk + text[at:]
        try:
            tomllib.loads(text)
        except (tomllib.TOMLDecodeError, ValueError, RecursionError):
            return text
    return "[[["


def _bad_id(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "".join(rng.choice(ID_CHARS) for _ in range(rng.randint(65, 300)))
    body = [rng.choice(ID_CHARS) for _ in range(rng.randint(0, 20))]
    for _ in range(rng.randint(1, 3)):
        body.insert(rng.randint(0, len(body)), rng.choice(ODD_CHARS))
    if rng.random() < 0.2:
        body.insert(0, rng.choice("._-"))
    return "".join(body)


def _any_id(rng: random.Random) -> str:
    chars = ID_CHARS + "".join(ODD_CHARS)
    return "zz" + "".join(rng.choice(chars) for _ in range(rng.randint(0, 80)))


def _invalid_utf8(rng: random.Random) -> bytes:
    bad = rng.choice(
        [b"\xff", b"\xfe", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88"]
    )
    head = "".join(rng.choice(ID_CHARS) for _ in range(rng.randint(0, 10))).encode()
    return head + bad + "".join(rng.choice(ID_CHARS) for _ in range(rng.randint(0, 10))).encode()


def generated_cases(seed: int, n: int) -> list[Case]:
    """`n` cases drawn by a seeded random generator (the same seed, the same cases)."""
    rng = random.Random(seed)
    inv, out = "INVALID_ARGUMENT", []
    keys = [(s, k, kind) for s, k, kind, _ in _keys() if s != "service" and kind in WRONG]
    for i in range(n):
        family = rng.choice(
            [
                "config",
                "config",
                "config",
                "config",
                "toml",
                "run_id",
                "unknown_run",
                "token",
                "override",
                "utf8",
            ]
        )
        tag = f"gen{i} "
        if family == "config":
            summary, text = _mutated_config(rng)
            out.append(Case("gen_config", tag + summary, "StartRun", _start(text), inv))
        elif family == "toml":
            text = _brokentoml_value(rng)
            out.append(
                Case("gen_toml", tag + f"config {_short(text, 60)}", "StartRun", _start(text), inv)
            )
        elif family == "run_id":
            run_id = _bad_id(rng)
            out.append(
                Case(
                    "gen_run_id",
                    tag + f"StartRun run_id {_short(run_id, 50)}",
                    "StartRun",
                    _start(OVER_BUDGET, run_id=run_id),
                    inv,
                )
            )
        elif family == "unknown_run":
            method, run_id = rng.choice(["GetRun", "StopRun", "WatchRun"]), _any_id(rng)
            out.append(
                Case(
                    "gen_unknown_run",
                    tag + f"{method} {_short(run_id, 50)}",
                    method,
                    _by_id(method, run_id),
                    "NOT_FOUND",
                )
            )
        elif family == "token":
            token = "".join(rng.choice(ID_CHARS) for _ in range(rng.randint(0, 40)))
            auth = rng.choice([f"Bearer {token}", token, f"Bearer {TOKEN}{token or 'x'}"])
            method = rng.choice(["StartRun", "GetRun", "ListRuns", "StopRun", "WatchRun"])
            body = (
                _start(OVER_BUDGET)
                if method == "StartRun"
                else (b"" if method == "ListRuns" else _by_id(method, _any_id(rng)))
            )
            out.append(
                Case(
                    "gen_token",
                    tag + f"{method} authorization {_short(auth, 40)}",
                    method,
                    body,
                    "UNAUTHENTICATED",
                    auth,
                )
            )
        elif family == "override":
            section, key, kind = rng.choice(keys)
            item = f"{section}.{key}={toml_value(rng.choice(WRONG[kind]))}"
            if rng.random() < 0.3:
                item = rng.choice([item.replace("=", ":"), item.replace(".", "", 1), f"{key}=1"])
            out.append(
                Case(
                    "gen_override",
                    tag + f"override {_short(item, 60)}",
                    "StartRun",
                    _start(OVER_BUDGET, [item]),
                    inv,
                )
            )
        else:
            method = rng.choice(["StartRun", "StartRun", "GetRun", "StopRun", "WatchRun"])
            payload = _invalid_utf8(rng)
            if method == "StartRun":
                where = rng.choice([1, 2, 3])
                body = (
                    _field(where, payload)
                    if where == 1
                    else (_field(1, OVER_BUDGET.encode()) + _field(where, payload))
                )
            else:
                body = _field(1, payload)
            out.append(
                Case("gen_utf8", tag + f"{method} bytes {payload!r}"[:100], method, body, inv)
            )
    return out


def corpus(seed: int = 0, generated: int = 150) -> list[Case]:
    """The fixed cases, then `generated` drawn from `seed`."""
    return fixed_cases() + generated_cases(seed, generated)


def sample(cases: list[Case], n: int, seed: int = 0) -> list[Case]:
    """`n` cases, every family represented while n allows (round robin over shuffled
    families)."""
    rng = random.Random(seed)
    families: dict[str, list[Case]] = {}
    for case in cases:
        families.setdefault(case.family, []).append(case)
    for members in families.values():
        rng.shuffle(members)
    order = sorted(families)
    rng.shuffle(order)
    out: list[Case] = []
    while len(out) < min(n, len(cases)):
        for name in order:
            if families[name] and len(out) < n:
                out.append(families[name].pop())
    return out


# -- sending them -------------------------------------------------------------------------------
class Prober:
    """Sends Cases as raw bytes on one channel and reads the status code each gets."""

    def __init__(self, target: str, token: str, timeout_s: float = RPC_TIMEOUT_S) -> None:
        self.token, self.timeout_s = token, timeout_s
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
        self.client = Client(target, token)  # stops a run a malformed request started

    def close(self) -> None:
        self.channel.close()
        self.client.close()

    def _path(self, method: str) -> str:
        return method if method.startswith("/") else f"/{SERVICE}/{method}"

    def send(self, case: Case) -> tuple[str, str, bytes]:
        """(status code name, details, reply bytes)."""
        auth = f"Bearer {self.token}" if case.auth == RIGHT else case.auth
        metadata = None if auth is None else (("authorization", auth),)
        path = self._path(case.method)
        streaming = case.method in METHODS and METHODS[case.method][2]
        try:
            if streaming:
                call = self.channel.unary_stream(path)(
                    case.body, metadata=metadata, timeout=self.timeout_s
                )
                try:
                    reply = next(iter(call))
                finally:
                    call.cancel()
            else:
                reply = self.channel.unary_unary(path)(
                    case.body, metadata=metadata, timeout=self.timeout_s
                )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            return code.name, str(exc.details() if hasattr(exc, "details") else exc), b""
        except StopIteration:
            return "OK", "the stream ended without an event", b""
        return "OK", "", bytes(reply)

    def undo(self, case: Case, reply: bytes) -> str:
        """A malformed StartRun the service accepted: stop the run it started."""
        if case.method != "StartRun" or not reply:
            return ""
        run = pb.Run.FromString(reply)
        told = f"accepted as run {run.run_id!r} ({run.state})"
        try:
            self.client.call("StopRun", pb.StopRunRequest(run_id=run.run_id), timeout=30)
        except grpc.RpcError as exc:
            told += f"; StopRun: {exc.code().name} {exc.details()}"
        return told


def check(target: str, token: str, cases: list[Case]) -> dict[str, Any]:
    """Send every case; count the ones whose status differs from the expected (UNKNOWN never
    matches), each listed with what was sent, expected and got."""
    prober, wrong, got_codes = Prober(target, token), list[dict[str, str]](), Counter[str]()
    t0 = time.perf_counter()
    try:
        for case in cases:
            code, details, reply = prober.send(case)
            got_codes[code] += 1
            if code != case.expected or code == "UNKNOWN":
                if code == "OK":
                    details = prober.undo(case, reply) or details
                wrong.append(
                    {
                        "family": case.family,
                        "request": case.summary,
                        "method": case.method,
                        "expected": case.expected,
                        "got": code,
                        "details": details[:400],
                    }
                )
    finally:
        prober.close()
    return {
        "malformed_requests": len(cases),
        "wrong_status": len(wrong),
        "wrong": wrong,
        "expected_codes": dict(Counter(c.expected for c in cases)),
        "got_codes": dict(got_codes),
        "families": dict(Counter(c.family for c in cases)),
        "malformed_seconds": time.perf_counter() - t0,
    }


# -- the served soak ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """`python -m driver.cli serve` in a process of its own, on free loopback ports."""

    def __init__(self, work: Path, max_active: int, budget_gib: float) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        (work / "data").mkdir(parents=True, exist_ok=True)
        config = work / "serve.toml"
        config.write_text(
            "[service]\n"
            'addr = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"runs_dir = {json.dumps(str(work / 'runs'))}\n"
            f"data_roots = [{json.dumps(str(work / 'data'))}]\n"
            f"max_active_runs = {max_active}\n"
            f"max_run_memory_gib = {budget_gib}\n"
            "[metrics]\n"
            'addr = "127.0.0.1"\n'
            f"port = {self.metrics_port}\n"
        )
        self.log = work / "serve.log"
        env = {**os.environ, "RECLRA_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "driver.cli", "serve", "--config", str(config)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_serving(self, client: Client, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"reclra serve exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(grpc.RpcError):
                if client.health() == "SERVING":
                    return
            time.sleep(0.5)
        raise RuntimeError(f"reclra serve not serving after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-n:]
            return "\n".join(ln[:300] for ln in lines)
        except OSError:
            return ""

    def stop(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """SIGTERM, then SIGKILL past the deadline; how it ended."""
        if not self.alive():
            return {"exit_code": self.proc.returncode, "how": "already dead"}
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
            how = "SIGTERM"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code, how = self.proc.wait(30), "SIGKILL after the SIGTERM deadline"
            with contextlib.suppress(ProcessLookupError):  # its run processes (its session)
                os.killpg(self.pid, signal.SIGKILL)
        return {"exit_code": code, "how": how, "seconds": time.monotonic() - t0}


class Scraper(threading.Thread):
    """GETs /metrics every `period_s` and parses it; also watches that the service lives."""

    def __init__(self, served: Served, period_s: float = 0.5) -> None:
        super().__init__(name="metrics-scraper", daemon=True)
        self.served, self.period_s = served, period_s
        self.done = threading.Event()
        self.scrapes = self.failures = 0
        self.reasons: list[str] = []
        self.service_died = False

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.monotonic()
            if not self.served.alive():
                self.service_died = True
            self.scrapes += 1
            try:
                with urllib.request.urlopen(self.served.metrics_url, timeout=10) as reply:
                    status, text = reply.status, reply.read().decode()
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
                families = list(text_string_to_metric_families(text))
                if not any(f.name.startswith("reclra_") for f in families):
                    raise RuntimeError("no reclra_ metric in the page")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.failures += 1
                if len(self.reasons) < 10:
                    self.reasons.append(f"{type(exc).__name__}: {exc}"[:300])
            self.done.wait(max(0.0, self.period_s - (time.monotonic() - t0)))


def _get(client: Client, run_id: str) -> Any:
    return client.call("GetRun", pb.GetRunRequest(run_id=run_id), timeout=RPC_TIMEOUT_S)


def _until(client: Client, run_id: str, done: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        run = _get(client, run_id)
        if done(run) or time.monotonic() > deadline:
            return run
        time.sleep(0.25)


def soak(work: Path, steps: int, seed: int, generated: int, deadline_s: float) -> dict[str, Any]:
    t_start, load = time.perf_counter(), os.getloadavg()
    budget = budget_gib()
    served = Served(work, max_active=ACTIVE, budget_gib=budget)
    client = Client(served.target, TOKEN)
    scraper = Scraper(served)
    result: dict[str, Any] = {
        "max_steps": steps,
        "seed": seed,
        "generator": "random.Random(seed)",
        "max_run_memory_gib": budget,
    }
    names, victim = ["soak-a", "soak-b", "soak-victim"], "soak-victim"
    survivors = [n for n in names if n != victim]
    runs: dict[str, dict[str, Any]] = {}
    timeline: dict[str, float] = {}  # seconds from the start, as each phase ended
    result["timeline"] = timeline

    def mark(phase: str) -> None:
        timeline[phase] = round(time.perf_counter() - t_start, 2)

    try:
        served.wait_serving(client)
        mark("serving")
        scraper.start()
        text = SMALL.replace("log_every", f"max_steps = {steps}\nlog_every")
        started = {}
        for name in names:
            client.call("StartRun", pb.StartRunRequest(config_toml=text, run_id=name))
            started[name] = time.perf_counter()
        mark("runs started")
        # kill one run's process once it trains (the three admitted at once, each in a process)
        at_once, deadline = 0, time.monotonic() + deadline_s
        while True:
            seen = {name: _get(client, name) for name in names}
            at_once = max(at_once, sum(r.pid > 0 for r in seen.values()))
            run = seen[victim]
            if (run.step >= 1 and run.pid > 0) or run.state in TERMINAL:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        result["runs_at_once"] = at_once
        result["survivors_step_at_kill"] = {n: seen[n].step for n in survivors}
        result["killed_pid"], result["killed_at_step"] = run.pid, run.step
        if run.pid > 0 and run.state not in TERMINAL:
            os.kill(run.pid, signal.SIGKILL)
        mark("victim killed")
        dead = _until(client, victim, lambda r: r.state in TERMINAL, 120)
        mark("victim failed")
        result["killed_run_state"], result["killed_run_error"] = dead.state, dead.error
        # a run over the memory budget
        try:
            reply = client.call(
                "StartRun", pb.StartRunRequest(config_toml=OVER_BUDGET_WIDE, run_id="soak-over")
            )
            result["over_budget_status"] = f"OK ({reply.state}: accepted)"
            with contextlib.suppress(grpc.RpcError):
                client.call("StopRun", pb.StopRunRequest(run_id="soak-over"))
        except grpc.RpcError as exc:
            result["over_budget_status"] = exc.code().name
            result["over_budget_details"] = exc.details()
        mark("over budget refused")
        # the malformed requests, while the two runs left train
        cases = corpus(seed, generated)
        result["survivors_step_before_malformed"] = {n: _get(client, n).step for n in survivors}
        result.update(check(served.target, TOKEN, cases))
        result["survivors_step_after_malformed"] = {n: _get(client, n).step for n in survivors}
        mark("malformed sent")
        # the runs left end as they would have
        for name in survivors:
            end = _until(client, name, lambda r: r.state in TERMINAL, deadline_s)
            runs[name] = {
                "state": end.state,
                "step": end.step,
                "error": end.error,
                "seconds": time.perf_counter() - started[name],
            }
        runs[victim] = {"state": dead.state, "step": dead.step, "error": dead.error}
        mark("survivors ended")
    finally:
        scraper.done.set()
        if scraper.is_alive():
            scraper.join(15)
        died = scraper.service_died or not served.alive()
        client.close()
        result["service"] = served.stop()
        mark("service stopped")
        result["service_pid"] = served.pid
        result["service_restarts"] = int(died)
        if died:
            result["service_log_tail"] = served.tail()
    result["runs"] = runs
    result["runs_expected"] = len(survivors)
    result["runs_finished"] = sum(
        runs.get(n, {}).get("state") == "succeeded" and runs[n]["step"] == steps for n in survivors
    )
    result["metrics_scrapes"] = scraper.scrapes
    result["metrics_scrape_failures"] = scraper.failures
    result["metrics_failure_reasons"] = scraper.reasons
    result["seconds"] = time.perf_counter() - t_start
    result["load_average_before_after"] = [load[0], os.getloadavg()[0]]
    result["targets"] = targets(result)
    result["ok"] = all(result["targets"].values())
    if not result["ok"]:
        result.setdefault("service_log_tail", served.tail())
    return result


def targets(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "service_restarts == 0": r["service_restarts"] == 0,
        "runs_finished == runs_expected": r["runs_finished"] == r["runs_expected"],
        f"{ACTIVE} runs in their processes at once": r.get("runs_at_once") == ACTIVE,
        "malformed_requests >= 200": r.get("malformed_requests", 0) >= 200,
        "wrong_status == 0": r.get("wrong_status", 1) == 0,
        "metrics_scrape_failures == 0": r["metrics_scrape_failures"] == 0,
        "killed run failed, killed by signal 9": r.get("killed_run_state") == "failed"
        and "killed by signal 9" in r.get("killed_run_error", ""),
        "over budget: RESOURCE_EXHAUSTED": r.get("over_budget_status") == "RESOURCE_EXHAUSTED",
    }


def table(r: dict[str, Any]) -> str:
    rows = ["| figure | value |", "|---|---|"]
    for key in (
        "max_run_memory_gib",
        "runs_at_once",
        "service_restarts",
        "runs_expected",
        "runs_finished",
        "malformed_requests",
        "wrong_status",
        "metrics_scrapes",
        "metrics_scrape_failures",
        "over_budget_status",
        "killed_run_error",
    ):
        value = r.get(key)
        rows.append(f"| {key} | {value if not isinstance(value, float) else round(value, 2)} |")
    rows.append(f"| seconds | {r['seconds']:.0f} |")
    phases = ", ".join(f"{k} {v:.1f}" for k, v in r.get("timeline", {}).items())
    rows.append(f"\ntimeline (s): {phases}")
    if r.get("wrong"):
        rows.append(f"\nwrong statuses ({len(r['wrong'])}; all in the JSON's `wrong`):")
    for w in r.get("wrong", [])[:60]:
        rows.append(
            f"  {w['family']}: {w['request']}: expected {w['expected']}, got {w['got']} "
            f"({w['details'][:160]})"
        )
    missed = [name for name, met in r["targets"].items() if not met]
    rows.append("\nall targets met" if not missed else f"\nMISSED: {'; '.join(missed)}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument(
        "--steps", type=int, default=1500, help="train.max_steps of each run (at most 3,600)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the generated requests")
    p.add_argument("--generated", type=int, default=150, help="generated malformed requests")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds a run may take")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="reclra-chaos-service-"))
    result = soak(work, args.steps, args.seed, args.generated, args.deadline)
    return save(result, args.json, table(result))
