"""The house style a tool keeps: ruff (configured in pyproject.toml) finds nothing in the repository, and every
docstring of the package, the benchmarks, the data preparation and the top-level scripts is numpydoc."""
import ast
import shutil
import subprocess
import sys

from process_helpers import REPO


def test_ruff_is_clean():
    command = [shutil.which("ruff")] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    result = subprocess.run([*command, "check", "--no-cache", str(REPO)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


# Google-style section headers; the house style is numpydoc (``Parameters`` underlined with dashes, ...).
GOOGLE_HEADERS = {"Args:", "Arguments:", "Returns:", "Yields:", "Raises:", "Example:", "Examples:", "Attributes:",
                  "Note:", "Notes:"}


def _documented_sources():
    """Every .py file of the package, the benchmarks, the data preparation and the top-level scripts."""
    files = sorted(REPO.glob("*.py"))
    for folder in ("segpipe", "benchmarks", "data_prep"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def google_style_headers(source: str, filename: str) -> tuple[int, list[str]]:
    """The number of module/class/function docstrings in ``source`` and ``file:line: header`` for each
    Google-style section header line among them."""
    tree = ast.parse(source, filename=filename)
    count, found = 0, []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not (node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                and isinstance(node.body[0].value.value, str)):
            continue
        count += 1
        literal = node.body[0].value
        for offset, line in enumerate(literal.value.splitlines()):
            if line.strip() in GOOGLE_HEADERS:
                found.append(f"{filename}:{literal.lineno + offset}: {line.strip()}")
    return count, found


def test_docstrings_are_numpydoc():
    files = _documented_sources()
    assert len(files) > 100 and any(f.name == "train.py" and f.parent == REPO for f in files)
    assert all(any(f.parent.name == folder for f in files) for folder in ("benchmarks", "data_prep")), files
    docstrings, found = 0, []
    for path in files:
        count, headers = google_style_headers(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
        docstrings += count
        found += headers
    assert docstrings > 800, f"only {docstrings} docstrings found: the walk missed files"
    assert not found, "Google-style docstring sections (write numpydoc: Parameters / Returns / Raises / " \
                      "Examples, underlined with dashes):\n" + "\n".join(found)


def test_google_style_check_finds_a_header():
    source = 'def f(x):\n    """Do it.\n\n    Args:\n        x: a number.\n    """\n'
    assert google_style_headers(source, "m.py") == (1, ["m.py:4: Args:"])
    numpydoc = 'def f(x):\n    """Do it.\n\n    Parameters\n    ----------\n    x\n        a number.\n    """\n'
    assert google_style_headers(numpydoc, "m.py") == (1, [])


MAX_MODULE_LINES = 500  # a module over this holds several concepts: split it by concept (docs/architecture.md)


def long_modules(folder, limit: int = MAX_MODULE_LINES) -> list[str]:
    """``path: N lines`` for every .py file under ``folder`` longer than ``limit`` lines."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            found.append(f"{path.relative_to(folder)}: {lines} lines")
    return found


def test_no_package_module_is_over_500_lines(tmp_path):
    assert long_modules(REPO / "segpipe") == []
    (tmp_path / "big.py").write_text("x = 1\n" * 501)  # the check itself can fail
    (tmp_path / "small.py").write_text("x = 1\n" * 500)
    assert long_modules(tmp_path) == ["big.py: 501 lines"]
