"""Helpers for the service tests: serve an exported model over real HTTP (ASGI), make images."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from skimage import data

from service.app import create_app
from service.settings import Settings


def settings_for(model_dir: Path, data_dir: Path, **overrides: object) -> Settings:
    """Settings serving ``model_dir`` (a folder in a model store) over ``data_dir``."""
    values: dict = {
        "models_dir": model_dir.parent,
        "model": model_dir.name,
        "data_dir": data_dir,
        "threads": 1,
        "api_token": None,  # a DINO_API_TOKEN in the test environment must not leak in
        "model_variant": "fp32",
        "index_type": "flat",
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (model + index loaded) and yield a client speaking HTTP to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.runtime.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield client


def photo(name: str, size: int | None = None) -> Image.Image:
    """A bundled scikit-image photo as RGB (astronaut, chelsea, coffee, rocket, camera, ...)."""
    img = Image.fromarray(getattr(data, name)())
    if size:
        img = img.resize((size, size * img.height // img.width), Image.Resampling.BICUBIC)
    return img.convert("RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "coins")


def photo_bytes(i: int, size: int = 96) -> bytes:
    """Distinct small JPEGs by index (photos, then flipped / rotated variants)."""
    img = photo(PHOTOS[i % len(PHOTOS)], size)
    if (i // len(PHOTOS)) % 2:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return encode(img)


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.fullmatch(r"([a-z_]+)(\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    return 0.0


def random_rgb(seed: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
