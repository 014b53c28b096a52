"""The layer rule of docs/design.md, checked on the source (ast only: no torch, no Ray, < 1 s).

Every import under m2m_ray/ counts — at module level, inside functions, under ``if TYPE_CHECKING:``
— and must go to the importing module's own package or to a package of a strictly lower layer.
The layer table is read from docs/design.md (between the ``layer-table`` markers), so the page and
this test cannot drift apart.

Also: a function-level import of m2m_ray (in m2m_ray/, pipelines/, benchmarks/) says why it is
not at the module top, in a ``# local:`` comment.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "m2m_ray"
DESIGN = ROOT / "docs" / "design.md"
MAX_LINES = 420
# Packages above the library: m2m_ray/ never imports them.
ABOVE = ("pipelines", "benchmarks", "tests")
ROOT_PACKAGE = "m2m_ray"  # m2m_ray/__init__.py: __version__ only, layer 0, importable by all


@dataclass(frozen=True)
class Import:
    file: Path     # the importing file
    line: int
    target: str    # dotted module imported, e.g. "m2m_ray.formats.mis" or "pipelines.train"
    in_function: bool
    type_only: bool


# ---------------------------------------------------------------------------------------------
# Reading the tree
# ---------------------------------------------------------------------------------------------


def read_layer_table(text: str) -> dict[str, int]:
    """package → layer from the markdown table between the layer-table markers of design.md."""
    match = re.search(r"<!--\s*layer-table:begin.*?-->(.*?)<!--\s*layer-table:end\s*-->", text, re.S)
    assert match, (
        f"{DESIGN.relative_to(ROOT)} has no layer table: put a markdown table (| layer | packages "
        "| ...) between '<!-- layer-table:begin -->' and '<!-- layer-table:end -->'; "
        "tests/test_layers.py reads the layers from it")
    layers: dict[str, int] = {}
    for row in match.group(1).splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue  # header, separator, blank
        for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[1]):
            assert name not in layers, (
                f"{DESIGN.relative_to(ROOT)}: package {name!r} appears twice in the layer table "
                f"(layers {layers[name]} and {cells[0]}); give it one row")
            layers[name] = int(cells[0])
    assert layers, (f"the layer table of {DESIGN.relative_to(ROOT)} has no rows; each row is "
                    "| <layer number> | `package`, `package` | ... |")
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_files() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every import statement of a file, wherever it is, with absolute dotted targets; a
    ``from pkg import name`` targets ``pkg.name`` when that is a module of the tree, else ``pkg``."""
    source = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(source, filename=str(path))
    module = module_name(path) if path.is_relative_to(ROOT) else path.stem
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(path, node.lineno, alias.name, in_function, type_only))
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module)
                    if node.level else node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if alias.name != "*" and _is_module(sub) else base
                found.append(Import(path, node.lineno, target, in_function, type_only))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_only)
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_only)

    visit(tree, False, False)
    return found


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_of(dotted: str) -> str | None:
    """Top-level name under m2m_ray ("m2m_ray.formats.mis" → "formats"); ``ROOT_PACKAGE`` for
    m2m_ray itself; None for anything outside m2m_ray."""
    parts = dotted.split(".")
    if parts[0] != ROOT_PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else ROOT_PACKAGE


def tree_packages() -> set[str]:
    """The top-level modules and packages of m2m_ray/ (what the layer table must cover)."""
    names = {p.stem for p in LIB.glob("*.py") if p.name != "__init__.py"}
    names |= {d.name for d in LIB.iterdir()
              if d.is_dir() and d.name != "__pycache__" and any(d.rglob("*.py"))}
    return names


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each back edge of a depth-first walk as a cycle ``[a, b, ..., a]`` (empty: no cycle)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return cycles


def _all_imports() -> list[Import]:
    return [imp for f in library_files() for imp in imports_of(f)]


def _where(imp: Import) -> str:
    kind = " (type-only)" if imp.type_only else " (inside a function)" if imp.in_function else ""
    return f"{imp.file.relative_to(ROOT)}:{imp.line}{kind}"


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------


def test_walker_sees_imports_inside_functions_and_type_checking() -> None:
    """Self-check, so the rules below cannot pass because the walker saw nothing."""
    sample = (
        "from typing import TYPE_CHECKING\n"
        "import m2m_ray.storage\n"
        "from m2m_ray import runtime, __version__\n"
        "if TYPE_CHECKING:\n"
        "    from m2m_ray.formats.mis import MISLayout\n"
        "def f():\n"
        "    from m2m_ray.models import m2m_unet\n"
        "    import m2m_ray.eval.stats as s\n"
    )
    found = {(i.target, i.in_function, i.type_only)
             for i in imports_of(LIB / "viz.py", sample) if i.target.startswith("m2m_ray")}
    assert found == {
        ("m2m_ray.storage", False, False),
        ("m2m_ray.runtime", False, False),
        ("m2m_ray", False, False),
        ("m2m_ray.formats.mis", False, True),
        ("m2m_ray.models.m2m_unet", True, False),
        ("m2m_ray.eval.stats", True, False),
    }, f"the import walker of tests/test_layers.py misread the sample: {sorted(found)}"

    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []

    ours = [i for i in _all_imports() if package_of(i.target)]
    assert len(ours) > 50, (f"found only {len(ours)} imports of m2m_ray under m2m_ray/; the walker "
                            "of tests/test_layers.py is broken")
    assert any(i.in_function for i in ours), (
        "no function-level import of m2m_ray found under m2m_ray/; if that is really so, drop this "
        "assertion, otherwise the walker of tests/test_layers.py misses imports inside functions")
    assert any(i.type_only for i in ours), (
        "no `if TYPE_CHECKING:` import of m2m_ray found under m2m_ray/; if that is really so, drop "
        "this assertion, otherwise the walker misses them")


def test_every_package_has_a_layer() -> None:
    layers = read_layer_table(DESIGN.read_text(encoding="utf-8"))
    missing = sorted(tree_packages() - set(layers))
    assert not missing, (
        f"m2m_ray/ has top-level modules/packages without a layer: {missing}. Place each one "
        f"deliberately: add it to a row of the layer table in {DESIGN.relative_to(ROOT)} (the "
        "lowest layer whose packages cover everything it imports)")
    stale = sorted(set(layers) - tree_packages())
    assert not stale, (f"the layer table of {DESIGN.relative_to(ROOT)} names {stale}, which m2m_ray/ "
                       "does not have; remove or rename those entries")


def test_imports_go_down_the_layers() -> None:
    layers = read_layer_table(DESIGN.read_text(encoding="utf-8"))
    layers[ROOT_PACKAGE] = 0
    problems = []
    for imp in _all_imports():
        top = imp.target.split(".")[0]
        if top in ABOVE:
            problems.append(f"{_where(imp)}: imports {imp.target}; m2m_ray/ never imports {top}/ "
                            "(it sits above the library): move the code it needs into m2m_ray/")
            continue
        target = package_of(imp.target)
        source = package_of(module_name(imp.file))
        if target is None or target in (source, ROOT_PACKAGE):
            continue
        if source not in layers or target not in layers:
            continue  # reported by test_every_package_has_a_layer
        if layers[target] >= layers[source]:
            how = "the same layer (siblings never import each other)" if (
                layers[target] == layers[source]) else "a higher layer"
            problems.append(
                f"{_where(imp)}: {source} (layer {layers[source]}) imports {imp.target} — {target} "
                f"is on {how}, layer {layers[target]}")
    assert not problems, (
        "imports against the layer rule of docs/design.md (a module imports its own package and "
        "strictly lower layers only; type-only and function-level imports count too). Move the "
        "shared code down to a layer both can import (formats/ for on-disk contracts, the lower "
        "package's config.py for config classes), or pass values instead of the higher package's "
        "objects:\n  " + "\n  ".join(problems))


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], Import] = {}
    for imp in _all_imports():
        if package_of(imp.target) in (None, ROOT_PACKAGE):
            continue
        source = module_name(imp.file)
        if imp.target != source:
            graph[source].add(imp.target)
            where.setdefault((source, imp.target), imp)

    cycles = find_cycles(graph)
    described = [" → ".join(c) + "\n      " + "; ".join(_where(where[a, b]) for a, b in zip(c, c[1:]))
                 for c in cycles]
    assert not cycles, (
        "import cycles between m2m_ray modules (every import counts, also inside functions and "
        "under TYPE_CHECKING). Break each by moving what both need into a third, lower module, "
        "or by passing the value in instead of importing it:\n  " + "\n  ".join(described))


#: eval/ reads the shapes world only through its read-out adapter (docs/design.md, "Why these
#: cuts"); the shapes-world experiments live in fidelity/, one layer up.
EVAL_SHAPES_ADAPTER = LIB / "eval" / "shapes_extractors.py"


def test_eval_reads_the_shapes_world_only_through_its_adapter() -> None:
    imports = [imp for imp in _all_imports() if package_of(module_name(imp.file)) == "eval"]
    assert any(imp.file == EVAL_SHAPES_ADAPTER and package_of(imp.target) == "shapes"
               for imp in imports), "the walker found no shapes import in the adapter"
    stray = [f"{_where(imp)} imports {imp.target}" for imp in imports
             if package_of(imp.target) == "shapes" and imp.file != EVAL_SHAPES_ADAPTER]
    assert not stray, (
        "eval/ imports the shapes world outside its read-out adapter "
        f"{EVAL_SHAPES_ADAPTER.relative_to(ROOT)}: " + "; ".join(stray) + ". Put a shapes-world "
        "measure in m2m_ray/fidelity/ (layer 8), or what eval's extractors need in the adapter")


def test_files_stay_small() -> None:
    long = [(f, n) for f in library_files()
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, (
        f"files under m2m_ray/ longer than {MAX_LINES} lines (the limit is ~400): "
        + ", ".join(f"{f.relative_to(ROOT)} ({n})" for f, n in long)
        + ". Split each along a seam (one capability per module) and add the new file to its "
        "package's README.md table")


def test_main_guard_is_last() -> None:
    """``if __name__ == "__main__":`` runs ``main()`` when the file is executed, before anything
    defined below it exists: method fidelity (then m2m_ray/eval/fidelity.py) once defined a helper
    there, and the demo's last step died with a NameError that importing
    the module never shows. In every script and module, the guard is the last statement."""
    late = []
    for path in sorted([*library_files(), *(ROOT / "pipelines").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for index, node in enumerate(body):
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                    and isinstance(node.test.left, ast.Name)
                    and node.test.left.id == "__name__" and index != len(body) - 1):
                late.append(f"{path.relative_to(ROOT)}:{body[index + 1].lineno}")
    assert not late, ("statements after the `if __name__ == \"__main__\":` block (they do not "
                      "exist yet when main() runs as a script): " + ", ".join(late))


#: Where a function-level import of m2m_ray must say why it is not at the module top.
LOCAL_IMPORT_DIRS = ("m2m_ray", "pipelines", "benchmarks")


def unexplained_local_imports(path: Path, source: str | None = None) -> list[int]:
    """Lines of the function-level imports of m2m_ray in a file that give no reason: a comment
    containing ``local:`` on the statement's own lines, or in the comment lines right above it or
    above an earlier statement of the same run of consecutive imports (one comment explains the
    imports below it)."""
    source = path.read_text(encoding="utf-8") if source is None else source
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string
    lines = source.splitlines()
    runs: dict[int, list[ast.stmt]] = {}  # line of an import → its run, up to and including it
    for node in ast.walk(ast.parse(source, filename=str(path))):
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            run: list[ast.stmt] = []
            for stmt in block:
                run = [*run, stmt] if isinstance(stmt, (ast.Import, ast.ImportFrom)) else []
                if run:
                    runs[stmt.lineno] = run

    def comment_above(line: int) -> bool:
        while line > 1 and lines[line - 2].strip().startswith("#"):
            line -= 1
            if "local:" in comments.get(line, ""):
                return True
        return False

    def explained(line: int) -> bool:
        run = runs[line]
        return (any("local:" in comments.get(n, "") for n in range(line, run[-1].end_lineno + 1))
                or any(comment_above(stmt.lineno) for stmt in run))

    return sorted({imp.line for imp in imports_of(path, source)
                   if imp.in_function and package_of(imp.target) and not explained(imp.line)})


def test_function_level_imports_say_why() -> None:
    """Imports of m2m_ray sit at the module top; one that must stay inside a function (a heavy
    or optional dependency only that function needs) says why in a ``# local:`` comment."""
    sample = (
        "def f():\n"
        "    from m2m_ray.viz import arrow_tile\n"
        "    # local: diffusers is heavy and only f needs it,\n"
        "    # a second comment line\n"
        "    import torch\n"
        "\n"
        "    from m2m_ray.models import m2m_unet\n"
        "    from m2m_ray.models.presets import load_vae  # local: a reason\n"
        "    x = 1  # local: not an import\n"
        "    from m2m_ray import storage\n"
        "    s = 'local:'\n"
        "    from m2m_ray.formats import ids\n"
    )
    assert unexplained_local_imports(LIB / "viz.py", sample) == [2, 10, 12], (
        "the local-import check of tests/test_layers.py misread its sample")
    missing = [f"{path.relative_to(ROOT)}:{line}"
               for directory in LOCAL_IMPORT_DIRS
               for path in sorted((ROOT / directory).rglob("*.py"))
               if "__pycache__" not in path.parts
               for line in unexplained_local_imports(path)]
    assert not missing, (
        "function-level imports of m2m_ray without a reason: " + ", ".join(missing) + ". Move "
        "each to the module top (ruff's isort order); if it must stay local (e.g. it pulls in "
        "torch/diffusers/ray that the module's other users never need), say why in a comment "
        "containing 'local:' on its line or right above its block of imports")
