"""Layering, read from the source: ``artifact`` is the contract both sides share, ``training``
writes through it, ``service`` reads through it, and neither imports the other.

Every import statement counts, including those inside functions (a lazy import is still a
dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("artifact", "training", "service", "benchmarks")

# package -> top-level modules it must never import
FORBIDDEN = {
    "artifact": {"torch", "torchvision", "training", "service", "fastapi", "onnxruntime"},
    "training": {"service"},
    "service": {"torch", "torchvision", "training"},
}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def offenders(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imported_modules(path)):
            if name.split(".")[0] in FORBIDDEN.get(package, ()):
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    assert not offenders(package), offenders(package)


def test_the_walk_sees_every_package_and_lazy_imports():
    for package in PACKAGES:
        assert list((ROOT / package).rglob("*.py")), package
    # A lazy import inside a function is found (this is how the walk would catch one).
    assert "skimage.data" in imported_modules(ROOT / "artifact" / "photos.py")
    assert "artifact.files" in imported_modules(ROOT / "training" / "checkpoints.py")
