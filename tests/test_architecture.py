"""The package's shape: no import circles among segpipe modules, and TensorFlow only where a model runs."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segpipe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_graph() -> dict[str, set[str]]:
    """Module -> the segpipe modules it imports (at module level or inside functions; not under TYPE_CHECKING).

    Importing ``a.b.c`` also runs the ``__init__`` of ``a.b``, so the packages on the way count too,
    except the importer's own packages (already being imported when it runs).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skip: set[int] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                skip |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in found:
                if not target.startswith("segpipe"):
                    continue
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if step in modules and step != name and not (name.startswith(step + ".") and
                                                                  modules[step].name == "__init__.py"):
                        targets.add(step)
        graph[name] = targets
    return graph


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

