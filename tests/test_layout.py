"""The code's shape, as the README promises it: no import cycles, actor calls by method (never
by a name string), and a layout section that mirrors the tree. Files are cut by concept, not by
length: there is no line cap (one made classes into mixins)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workers", "cluster", "driver")


def product_files() -> list[Path]:
    return sorted(
        p
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "_pb2" not in p.name and "__pycache__" not in p.parts
    )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Product modules `path` imports anywhere in it (module level, in functions, and under
    TYPE_CHECKING: a cycle there is still a tangle a reader must follow)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def test_no_import_cycles() -> None:
    files = product_files()
    names = {module_name(p) for p in files}
    graph = {module_name(p): imports(p, names) - {module_name(p)} for p in files}
    for pkg in list(graph):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        graph[pkg] = {d for d in graph[pkg] if not pkg.startswith(d + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The checker itself: two modules importing each other make a cycle it reports."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import b\n")
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a import x\n")
    assert imports(a, {"a", "b"}) == {"b"} and imports(b, {"a", "b"}) == {"a"}


STRING_DISPATCH = re.compile(
    r"getattr\([^)]*\)\s*\.\s*(remote|options)\b|__ray_call__|\.call\(\s*\w"
)


def test_actor_calls_name_their_methods() -> None:
    """Stage methods are called as methods (typed handles), never dispatched by a string."""
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in product_files()
        if p.parts[-2] in ("cluster", "pipeline", "run")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if STRING_DISPATCH.search(line) and not line.lstrip().startswith("#")
    ]
    assert not hits, "actor calls by name: " + "; ".join(hits)


def readme_layout(text: str) -> set[str]:
    """The paths the layout page's block lists (docs/layout.md, its first code block): `dir/`
    lines open a folder (indent: two spaces a level), other lines name a file in the folder
    above them."""
    block = text.split("```", 2)[1]
    listed: set[str] = set()
    stack: list[str] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent % 2 or indent > 2 * len(stack):
            continue  # a continuation of the line above (deeper than any entry could be)
        depth = indent // 2
        name = line.split()[0]
        stack = stack[:depth]
        path = "/".join([*stack, name.rstrip("/")])
        listed.add(path)
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return listed


def test_readme_layout_mirrors_the_tree() -> None:
    actual = {
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*")
        if p.suffix in (".py", ".proto")
        and p.name != "__init__.py"
        and "_pb2" not in p.name
        and "__pycache__" not in p.parts
    }
    actual |= {str(Path(f).parent) for f in actual}
    listed = readme_layout((ROOT / "docs" / "layout.md").read_text())
    listed = {p for p in listed if p.split("/")[0] in PACKAGES}
    assert listed == actual, (
        f"docs/layout.md lacks {sorted(actual - listed)}; lists what is not there: "
        f"{sorted(listed - actual)}"
    )


def test_layout_parser_reads_nested_folders() -> None:
    """The parser walks folders by indent and skips continuation lines, so the comparison above
    sees a misplaced or missing file."""
    text = "# Layout\n\n```\nworkers/  what\n  stage.py  does\n           more words\n"
    text += "driver/\n  run/\n    controller.py\n  cli.py\n```\n"
    assert readme_layout(text) == {
        "workers",
        "workers/stage.py",
        "driver",
        "driver/run",
        "driver/run/controller.py",
        "driver/cli.py",
    }


# The layer order of the code, lowest first: a module may import its own layer and those below
# it, never one above (TYPE_CHECKING imports included). workers/ (pure torch) and cluster/ (Ray
# plumbing) know nothing of each other or of driver/; inside driver/, config sits at the bottom,
# then data, pipeline, run (the lifecycle: it learns of the service only through callbacks), api
# (metrics, the service, reports) and the command line.
LAYERS: list[tuple[str, ...]] = [
    ("workers",),
    ("cluster",),
    ("driver.config",),
    ("driver.data",),
    ("driver.pipeline",),
    ("driver.run",),
    ("driver.api",),
    ("driver.cli",),
]


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS; place it")


def test_imports_follow_the_layer_order() -> None:
    files = product_files()
    names = {module_name(p) for p in files}
    against = []
    for path in files:
        mod = module_name(path)
        for dep in sorted(imports(path, names)):
            low, high = layer_of(dep), layer_of(mod)
            # workers and cluster are side by side: neither imports the other
            side_by_side = {low, high} == {0, 1}
            if low > high or side_by_side:
                against.append(f"{mod} imports {dep}")
    assert not against, "imports against the layer order: " + "; ".join(against)


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """A lower layer importing a higher one, even only for type checking, is caught."""
    f = tmp_path / "x.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from driver.api.metrics import Metrics\n"
    )
    found = imports(f, {"driver.api.metrics"})
    assert found == {"driver.api.metrics"} and layer_of("driver.api.metrics") > layer_of(
        "driver.run.x"
    )


def _classes() -> dict[str, list[str]]:
    """Every class defined in the product: its name -> the names of its bases."""
    out: dict[str, list[str]] = {}
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                out[f"{module_name(path)}.{node.name}"] = [ast.unparse(b) for b in node.bases]
    return out


def test_no_class_inherits_from_more_than_one_project_class() -> None:
    """Collaborators are composed, not mixed in: a class in driver/ or cluster/ has at most one
    base of the project's own (and no Protocol listing a host's private attributes)."""
    classes = _classes()
    ours = {name.rsplit(".", 1)[1] for name in classes}
    mixed = {
        name: bases
        for name, bases in classes.items()
        if name.startswith(("driver.", "cluster."))
        and sum(b.rsplit(".", 1)[-1] in ours for b in bases) > 1
    }
    assert not mixed, f"classes with several project bases: {mixed}"
    hosts = [
        name
        for name, bases in classes.items()
        if "Protocol" in bases and name.rsplit(".", 1)[1].startswith("_")
    ]
    assert not hosts, f"private Protocols of a host's attributes: {hosts}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _docs() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return pages + [p for p in (ROOT / "deploy" / "README.md", ROOT / "bench" / "README.md")]


def test_every_relative_link_in_the_docs_resolves() -> None:
    """README.md, docs/ and the folder READMEs: every relative link names a file or folder that
    exists (links into ../shared may point outside a user's clone and are not checked)."""
    broken = []
    for page in _docs():
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith(("#", "mailto:")) or "shared/" in target:
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links: " + "; ".join(broken)


def test_the_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 20_000, "README.md over 20 KB: move details to docs/"
    assert "docs/" in text


def test_the_readme_map_names_every_top_level_folder() -> None:
    """The README's map (its "## Map" block) lists exactly the top-level folders of the tree."""
    block = (ROOT / "README.md").read_text().split("## Map", 1)[1].split("```", 2)[1]
    listed = {line.split()[0].rstrip("/") for line in block.splitlines() if line.strip()}
    folders = {
        p.name
        for p in ROOT.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name not in ("runs", "build")
        and not p.name.endswith(".egg-info")
        and p.name != "__pycache__"
    }
    assert listed == folders, f"map {sorted(listed)} != tree {sorted(folders)}"
