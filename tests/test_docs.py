"""The documents name only what exists, the README stays short, and no product file speaks of
development rounds, ticket numbers or files that are not in the repository.

What counts as a repository path is deliberately narrow, so that example paths a user creates
(``runs/mine/checkpoint.pth``, ``models/<name>/``, ``data/gallery/``) are not checked: a path whose
first component is a tracked top-level folder other than the runtime folders, a top-level file
named exactly, a Markdown link, or a dotted module of one of the project's packages.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
    + [
        ROOT / "benchmarks" / "results" / n
        for n in ("performance_history.md", "quickstart_tuning.md")
    ]
)
README_MAX_LINES = 260
# Folders the product creates at run time; only models/README.md of them is in the repository.
RUNTIME_DIRS = {"models", "data", "runs"}
PACKAGES = ("training", "service", "benchmarks", "tests", "artifact")
TOP_FILES = {"Dockerfile", "Makefile", "pyproject.toml", "docker-compose.yml", ".dockerignore"}
# Built from pieces so this file does not match its own patterns.
FORBIDDEN = re.compile(
    "|".join(
        [
            "sess" + r"ion [0-9]",
            "iss" + r"ue [0-9]",
            "MEASURE" + r"MENTS\.md",
            "DES" + r"IGN\.md",
            r"/t" + r"mp/q[0-9]",
            r"runs/quick" + r"start[0-9]",
        ]
    ),
    re.IGNORECASE,
)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")
RUN_MODULE = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")
PATH_TOKEN = re.compile(r"^[A-Za-z0-9_.][\w./-]*$")
UPPER_MD = re.compile(r"^[A-Z][A-Z_]*\.md$")


@functools.cache
def _top_level() -> frozenset[str]:
    """First components of the repository's files, without the run-time folders."""
    return frozenset({p.relative_to(ROOT).parts[0] for p in _product_files()} - RUNTIME_DIRS)


def _is_repo_path(token: str, top: frozenset[str]) -> bool:
    if not PATH_TOKEN.match(token) or "://" in token:
        return False
    if "/" in token:
        return token.split("/", 1)[0] in top
    return token in TOP_FILES or bool(UPPER_MD.match(token))


def _module_exists(name: str) -> bool:
    """``training.perceptual.FeaturePredictionLoss``: a prefix of two or more parts is a module
    (``service`` alone: the package)."""
    parts = name.split(".")
    for end in range(len(parts), 1 if len(parts) > 1 else 0, -1):
        base = ROOT.joinpath(*parts[:end])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def named_things(text: str) -> tuple[list[str], list[str], list[str]]:
    """(links, repo paths, modules) a Markdown text names."""
    top = _top_level()
    links = [t for t in LINK.findall(text) if not re.match(r"^(https?:|mailto:|#)", t)]
    fences = [m.group(0) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    tokens: list[str] = []
    for span in CODE_SPAN.findall(prose):
        tokens += span.split()
    for block in fences:
        tokens += block.split()
    tokens = [t.strip(",;:()[]'\"") for t in tokens]
    paths = sorted({t.rstrip(".") for t in tokens if t and _is_repo_path(t.rstrip("."), top)})
    modules = {t.split("(", 1)[0] for t in tokens if MODULE.match(t.split("(", 1)[0])}
    for block in fences:
        modules |= set(RUN_MODULE.findall(block))
    return links, paths, sorted(m for m in modules if m.split(".")[0] in PACKAGES)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_path_and_module_a_document_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    links, paths, modules = named_things(text)
    missing = [
        link for link in links if not (doc.parent / link.split("#", 1)[0]).resolve().exists()
    ]
    if doc.name != "CHANGELOG.md":  # history may name files and modules since moved or removed
        missing += [path for path in paths if not (ROOT / path).exists()]
        missing += [module for module in modules if not _module_exists(module)]
    missing = sorted(set(missing))
    assert not missing, f"{doc.relative_to(ROOT)} names what is not in the repository: {missing}"


def test_the_checker_sees_paths_links_and_modules_and_skips_user_paths():
    text = (
        "See [training](docs/nope.md#x) and `training/nope.py`, `Makefile`, `NOPE.md`, run\n"
        "```bash\npython -m service.nope --out runs/mine\n```\n"
        "`models/<name>/model.onnx` `runs/mine/checkpoint.pth` `data/gallery/` `config.json`\n"
        "[web](https://example.org/a.md) `training.perceptual.FeaturePredictionLoss`\n"
    )
    links, paths, modules = named_things(text)
    assert links == ["docs/nope.md#x"]
    assert paths == ["Makefile", "NOPE.md", "training/nope.py"]
    assert modules == ["service.nope", "training.perceptual.FeaturePredictionLoss"]
    assert _module_exists("training.perceptual.FeaturePredictionLoss")
    assert not _module_exists("service.nope")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def _product_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it
        skip = {".git", ".venv", "__pycache__"} | RUNTIME_DIRS
        names = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_no_product_file_speaks_of_development_rounds_or_missing_files():
    hits = []
    for path in _product_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (images, models)
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
