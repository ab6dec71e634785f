"""The server (and the artifact contract it reads) runs where torch cannot be imported, and never
imports ``training``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: torch is made unimportable before anything else is imported.
SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    import asyncio, io, importlib, pkgutil
    import httpx
    from PIL import Image
    import artifact
    import service
    from service.app import create_app
    from service.settings import Settings

    async def main():
        app = create_app(Settings(models_dir=sys.argv[1], data_dir=sys.argv[2], threads=1))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            url = "http://localhost"  # a Host the default DINO_ALLOWED_HOSTS serves
            async with httpx.AsyncClient(transport=transport, base_url=url) as client:
                health = await client.get("/healthz")
                assert health.status_code == 200, health.text
                blob = io.BytesIO()
                Image.new("RGB", (40, 30), (200, 30, 90)).save(blob, "PNG")
                embed = await client.post("/embed", files={"images": ("x.png", blob.getvalue())})
                assert embed.status_code == 200, embed.text
                assert len(embed.json()["embeddings"][0]) == embed.json()["dim"]

    asyncio.run(main())
    # Every service module imports without torch (CLI entry points are not run, only imported).
    for package in (artifact, service):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    assert sys.modules["torch"] is None
    leaked = sorted(m for m in sys.modules if m == "training" or m.startswith("training."))
    assert not leaked, leaked
    print("torch-free ok")
    """
)


def test_server_runs_with_torch_unimportable(tiny_vit_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINO_")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_vit_dir.parent), str(tmp_path / "data")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch-free ok" in result.stdout


def test_no_service_or_artifact_source_imports_torch_or_training():
    offenders = []
    for path in sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "artifact").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("torch", "torchvision", "training"):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders
