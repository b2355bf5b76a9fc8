"""The package's shape: no import circles among segpipe modules or its top-level packages (the layer order of
docs/architecture.md), and TensorFlow only where a model runs."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segpipe"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, package): p for p in package.rglob("*.py") if "__pycache__" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _keeps_tensorflow_out(line: str) -> bool:
    """A function-level import whose comment says it keeps TensorFlow (or Keras) out of the caller's path."""
    comment = line.partition("#")[2].lower()
    return "tensorflow" in comment or "keras" in comment


def import_edges(package: Path = PACKAGE) -> list[tuple[str, str, bool]]:
    """Every import of one module of ``package`` by another: ``(importer, imported, lazy)``.

    Module- and function-level imports count; imports under ``TYPE_CHECKING`` do not (they never run).
    ``lazy`` marks a function-level import whose comment says it keeps TensorFlow out. Importing
    ``a.b.c`` also runs the ``__init__`` of ``a.b``, so the packages on the way count too, except the
    importer's own packages (already being imported when it runs).
    """
    root = package.name
    modules = _modules(package)
    edges: list[tuple[str, str, bool]] = []
    for name, path in modules.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        skip: set[int] = set()
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                skip |= {id(n) for n in ast.walk(node)}
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(n) for n in ast.walk(node) if n is not node}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = own_package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            lazy = id(node) in in_function and _keeps_tensorflow_out(lines[node.lineno - 1])
            for target in found:
                if target != root and not target.startswith(root + "."):
                    continue
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if step in modules and step != name and not (name.startswith(step + ".") and
                                                                  modules[step].name == "__init__.py"):
                        edges.append((name, step, lazy))
    return list(dict.fromkeys(edges))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (at module level or inside functions; not under
    TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {name: set() for name in _modules(package)}
    for importer, imported, _ in import_edges(package):
        graph[importer].add(imported)
    return graph


def _top_level(module: str) -> str:
    """``segpipe.data.pipeline`` -> ``data``; a top-level module (``segpipe.io``) is its own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(package: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """Top-level package -> the top-level packages it imports -> the module imports that make the edge.

    A function-level import whose comment says it keeps TensorFlow out does not count: it runs only
    when the function is called, so it is how a light path reaches a heavy stage on demand (the same
    exception the module-circle test has always made for such imports).
    """
    graph: dict[str, dict[str, list[str]]] = {_top_level(m): {} for m in _modules(package)}
    for importer, imported, lazy in import_edges(package):
        a, b = _top_level(importer), _top_level(imported)
        if a != b and not lazy:
            graph[a].setdefault(b, []).append(f"{importer} -> {imported}")
    for targets in graph.values():  # name each import by its module, not also by the packages on the way
        for b, why in targets.items():
            targets[b] = [w for w in why if not any(o.startswith(w + ".") for o in why)]
    return graph


def package_circles(package: Path = PACKAGE) -> list[set[str]]:
    """The groups of top-level packages that import each other round a circle (strongly connected, 2 or more)."""
    graph = package_graph(package)
    reach = {a: _reachable(graph, a) for a in graph}
    groups: list[set[str]] = []
    for a in sorted(graph):
        group = {b for b in reach[a] if a in reach[b]} | {a}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def _reachable(graph: dict[str, dict[str, list[str]]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def describe_circle(group: set[str], package: Path = PACKAGE) -> str:
    """The imports inside one circle, one per line (what to move to break it)."""
    graph = package_graph(package)
    return "\n".join(f"  {a} -> {b}: {', '.join(graph[a][b])}" for a in sorted(group) for b in sorted(graph[a])
                     if b in group)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_among_segpipe_modules():
    graph = import_graph()
    assert len(graph) > 40 and "segpipe.runs.rundir" in graph["segpipe.training.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "fakepkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "fakepkg"


def test_the_package_check_finds_a_planted_circle(tmp_path):
    """A fake package tree: ``low`` -> ``high`` -> ``low`` through a module-level and a function-level import."""
    package = _write_tree(tmp_path, {
        "__init__.py": "",
        "base.py": "",
        "low/__init__.py": "",
        "low/settings.py": "from fakepkg.base import *\n",
        "low/pipeline.py": "def prepare():\n    from fakepkg.high.config import Config  # a planted circle\n",
        "high/__init__.py": "",
        "high/config.py": "from fakepkg.low.settings import *\n",
        "side/__init__.py": "",
        "side/typing_only.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from "
                               "fakepkg.high import config\n",
    })
    assert find_cycle(import_graph(package)) is None  # no circle among the modules themselves
    assert package_circles(package) == [{"high", "low"}]
    assert describe_circle({"high", "low"}, package) == ("  high -> low: fakepkg.high.config -> fakepkg.low.settings\n"
                                                         "  low -> high: fakepkg.low.pipeline -> fakepkg.high.config")
    assert "side" not in package_graph(package)["side"] and not package_graph(package)["side"]  # TYPE_CHECKING

    # the one exception: a function-level import whose comment says it keeps TensorFlow out
    (package / "low" / "pipeline.py").write_text(
        "def prepare():\n    from fakepkg.high.config import Config  # TensorFlow: only when preparing\n")
    assert package_circles(package) == []
    # ... at module level the same comment does not excuse it
    (package / "low" / "pipeline.py").write_text("from fakepkg.high.config import Config  # TensorFlow\n")
    assert package_circles(package) == [{"high", "low"}]


def test_no_import_circles_among_segpipe_packages():
    """The top-level packages form layers (docs/architecture.md, "Layers"): no package imports one that imports it."""
    graph = package_graph()
    assert "config" in graph["training"] and "data" in graph["config"]  # the graph sees real imports
    circles = package_circles()
    assert not circles, "import circles among segpipe's packages:\n" + "\n".join(
        f"{' <-> '.join(sorted(group))}:\n{describe_circle(group)}" for group in circles)


def documented_layers() -> dict[str, int]:
    """Top-level package -> its layer, from the "Layers" table of docs/architecture.md."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in cells[1].split(","):
                layers[name.strip().strip("`")] = int(cells[0])
    return layers


def test_every_import_goes_down_the_documented_layers():
    layers = documented_layers()
    graph = package_graph()
    assert set(layers) == set(graph) - {"segpipe"}, "every top-level package in exactly one layer of the table"
    upward = [f"{a} (layer {layers[a]}) -> {b} (layer {layers[b]}): {', '.join(why)}"
              for a, targets in sorted(graph.items()) if a in layers
              for b, why in sorted(targets.items()) if layers[b] >= layers[a]]
    assert not upward, "imports against the layers of docs/architecture.md:\n" + "\n".join(upward)


def test_every_stage_is_a_package():
    for stage in ("config", "data", "planning", "models", "losses", "metrics", "training", "runs", "inference",
                  "export", "evaluation", "cli"):
        assert (PACKAGE / stage / "__init__.py").is_file() or (PACKAGE / f"{stage}.py").is_file(), stage


def _imports_tensorflow_after(code: str) -> bool:
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('tensorflow' in sys.modules)"],
                            capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1] == "True"


def test_folder_evaluation_never_imports_tensorflow(tmp_path):
    """Scoring folders of label maps (and comparing runs, reading run directories) runs without TensorFlow."""
    import nibabel as nib
    import numpy as np

    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        label = np.zeros((8, 8, 8), np.uint8)
        label[2:6, 2:6, 2:6] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / folder / "a.nii.gz")
    code = (f"from segpipe.cli.evaluate import main; import segpipe.evaluation.compare, segpipe.runs.rundir\n"
            f"assert main(['--pred', r'{tmp_path / 'pred'}', '--ref', r'{tmp_path / 'ref'}', '--workers', '1']) == 0")
    assert not _imports_tensorflow_after(code)
    # the check can see TensorFlow (a stand-in module: the real import takes seconds and proves no more)
    assert _imports_tensorflow_after("import sys, types; sys.modules['tensorflow'] = types.ModuleType('tensorflow')")


def _documented_tree() -> set[str]:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    block = text.split("<!-- tree:", 1)[1].split("```", 2)[1]
    files: set[str] = set()
    for line in block.splitlines()[1:]:
        if not line.strip() or line.strip() == "segpipe/":
            continue
        first, *rest = line.split()
        if first.endswith("/"):
            files |= {f"{first}{name}" for name in rest}
        else:
            files.add(first)
    return files


def test_the_tree_in_docs_architecture_matches_the_package():
    on_disk = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert _documented_tree() == on_disk


def test_function_level_imports_of_segpipe_modules_say_why():
    """A segpipe import inside a function is there to keep TensorFlow (or another heavy import) out of a
    path that must not load it; a comment on its line says so. Anything else belongs at the top."""
    unexplained = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("segpipe") \
                        and "#" not in lines[node.lineno - 1]:
                    unexplained.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "\n".join(unexplained)

