"""The README stays a short guide, its links and the docs' links resolve, and its test command is CI's."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 320

# Pages other helpers are writing (issues 14, 17 and the inference work); README.md links to them
# before they land. A link to one of these only fails once the file exists and the anchor is wrong.
ALLOWED_PENDING = {"docs/planning.md", "docs/reports.md", "docs/losses-in-keras.md", "docs/inference.md"}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (brackets in code are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def relative_links(path: Path) -> list[str]:
    """Targets of the Markdown links in ``path`` that point into the repository."""
    targets = _LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # no http:, mailto:


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))}


def test_github_anchor_matches_github_rules():
    assert github_anchor("Several GPUs, several machines") == "several-gpus-several-machines"
    assert github_anchor("Choosing the hardware: `train.distribute`") == "choosing-the-hardware-traindistribute"
    assert github_anchor("The default run, measured") == "the-default-run-measured"


def test_link_finder_skips_code_and_urls(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [a](a.md#x) and [web](https://example.org).\n`[no](code.md)`\n"
                    "```\n[no](block.md)\n```\n![img](pics/p.png)\n", encoding="utf-8")
    assert relative_links(page) == ["a.md#x", "pics/p.png"]


def test_readme_is_a_short_guide():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details into docs/"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for link in relative_links(page):
        file_part, _, fragment = link.partition("#")
        target = (page.parent / file_part).resolve() if file_part else page
        rel = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else str(target)
        if not target.exists():
            if rel not in ALLOWED_PENDING:
                broken.append(f"{link}: no file {rel}")
            continue
        if fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{link}: no heading #{fragment} in {rel}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def _ci_commands() -> tuple[list[str], list[str]]:
    """The pip install and pytest commands of .ci/run, as tokens."""
    pip, pytest_cmd = [], []
    for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = shlex.split(line)
        if "pip" in tokens and "install" in tokens and "-e" in tokens:
            pip.append(tokens)
        elif tokens[:3] == ["python", "-m", "pytest"] or tokens[:1] == ["pytest"]:
            pytest_cmd.append(tokens)
    assert len(pip) == 1 and len(pytest_cmd) == 1, \
        f"expected one editable pip install and one pytest in .ci/run: {pip} {pytest_cmd}"
    return pip[0], pytest_cmd[0]


def _readme_test_command() -> tuple[list[str], list[str]]:
    found = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()
             if "pip install" in line and "pytest" in line and "&&" in line]
    assert len(found) == 1, f"expected one 'pip install ... && ... pytest' line in README.md; found {found}"
    install, run = found[0].split("&&")
    return shlex.split(install), shlex.split(run.split("#", 1)[0])


def test_readme_test_command_is_what_ci_runs():
    ci_pip, ci_pytest = _ci_commands()
    readme_pip, readme_pytest = _readme_test_command()
    # CI spells pip as `python -m pip` and adds -q; what it installs must be the README's
    ci_pip = ci_pip[2:] if ci_pip[:3] == ["python", "-m", "pip"] else ci_pip
    ci_pip = ["pip", *[t for t in ci_pip if t not in ("-q", "--quiet", "pip")]]
    assert readme_pip == ci_pip
    assert readme_pytest == ci_pytest


def test_readme_test_extras_exist():
    readme_pip, _ = _readme_test_command()
    spec = readme_pip[readme_pip.index("-e") + 1]
    extras = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
    assert extras, f"expected '.[extra,...]' after -e. Received: {spec}"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert set(extras.group(1).split(",")) <= set(declared)
