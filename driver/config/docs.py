"""Each config key's one-line doc (the docstring under it in its dataclass), and the resolved
config written out as TOML with every key's origin and doc: what `reclra config` prints."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap
from typing import Any

from driver.config.root import SECTIONS, Config


def field_docs(cls: type) -> dict[str, str]:
    """{key: its docstring, folded to one paragraph} for a dataclass whose fields are each
    followed by a string literal (torchtitan's style)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def toml_value(value: Any) -> str:
    """`value` as a TOML literal (strings, numbers, booleans, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    return json.dumps(str(value))


def describe(cfg: Config) -> str:
    """The resolved config as TOML a run can read back, each key followed by a comment: where
    its value came from (user: the file or --set; recipe: the rule's recipe; default) and what
    it does."""
    lines = ["# resolved config: value, then where it came from and what the key does"]
    for section in SECTIONS:
        obj = getattr(cfg, section)
        docs = field_docs(type(obj))
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(obj):
            key = f"{section}.{f.name}"
            text = f"{f.name} = {toml_value(getattr(obj, f.name))}"
            origin = cfg.origin.get(key, "default")
            lines.append(f"{text:<40} # {origin:<7} {docs.get(f.name, '')}".rstrip())
    for rule, tables in cfg.compare.items():
        for section, values in tables.items():
            lines += ["", f"[compare.{rule}.{section}]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
