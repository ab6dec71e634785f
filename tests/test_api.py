"""The HTTP API over a real exported tiny ViT, real onnxruntime and a real FAISS index."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from service_helpers import metric_value, photo_bytes, serve, settings_for

from artifact import load_manifest
from artifact.cosine import l2_normalise
from service.app import create_app
from service.images import decode_image
from service.index import IndexStoreError
from service.preprocess import eval_pixels

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def direct_embeddings(model_dir, blobs: list[bytes]) -> np.ndarray:
    """What the model gives when run directly on the same preprocessed pixels."""
    manifest = load_manifest(model_dir)
    batch = np.stack([eval_pixels(decode_image(b, 10**8), manifest) for b in blobs])
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    return session.run(["embedding"], {"pixel_values": batch})[0]


def files(blobs: list[bytes], field: str = "images") -> list:
    return [(field, (f"img{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


async def test_embed_equals_the_model_run_directly(tiny_vit_dir, tmp_path):
    blobs = [photo_bytes(i) for i in range(3)]
    expected = direct_embeddings(tiny_vit_dir, blobs)
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        raw = await client.post("/embed", files=files(blobs), data={"normalize": "false"})
        unit = await client.post("/embed", files=files(blobs))
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["model"] == "tiny-vit" and body["dim"] == 192 and body["normalized"] is False
    assert np.allclose(np.array(body["embeddings"]), expected, atol=1e-5)
    rows = np.array(unit.json()["embeddings"])
    assert np.allclose(rows, l2_normalise(expected), atol=1e-5)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


async def test_concurrent_requests_are_batched_and_answered_in_order(tiny_vit_dir, tmp_path):
    blobs = [photo_bytes(i) for i in range(10)]
    expected = l2_normalise(direct_embeddings(tiny_vit_dir, blobs))
    settings = settings_for(tiny_vit_dir, tmp_path, max_batch=8, batch_wait_ms=150)
    async with serve(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/embed", files=files([b])) for b in blobs[:8]),
            client.post("/embed", files=files(blobs[8:])),
        )
        metrics = (await client.get("/metrics")).text
    for i, answer in enumerate(answers[:8]):
        assert answer.status_code == 200, answer.text
        assert np.allclose(answer.json()["embeddings"][0], expected[i], atol=1e-5)
    assert np.allclose(answers[8].json()["embeddings"], expected[8:], atol=1e-5)
    batches = metric_value(metrics, "dino_batch_size_count", kind="embed")
    assert metric_value(metrics, "dino_batch_size_sum", kind="embed") == 10
    assert batches < 10  # at least one inference call held several callers' images
    assert metric_value(metrics, "dino_batch_size_bucket", kind="embed", le="1") < batches
    posts = metric_value(
        metrics, "dino_http_requests_total", method="POST", endpoint="/embed", status="200"
    )
    assert posts == 9
    assert "dino_queue_depth 0" in metrics and "dino_index_items 0" in metrics
    assert metric_value(metrics, "dino_http_request_duration_seconds_count", endpoint="/embed") == 9


async def test_items_similar_and_index(tiny_vit_dir, tmp_path):
    blobs = [photo_bytes(i) for i in range(5)]
    async with serve(settings_for(tiny_vit_dir, tmp_path, max_k=3)) as client:
        added = await client.post(
            "/items",
            files=files(blobs[:4]),
            data={"ids": ["a", "b", "c", "d"], "metadata": '[{"n":0},{"n":1},{"n":2},{"n":3}]'},
        )
        assert added.status_code == 201, added.text
        assert added.json() == {"ids": ["a", "b", "c", "d"]}
        generated = await client.post("/items", files=files(blobs[4:]), data={"metadata": "{}"})
        new_id = generated.json()["ids"][0]
        assert len(new_id) == 32

        by_id = (await client.get("/similar", params={"id": "b", "k": 3})).json()
        assert by_id["model"] == "tiny-vit" and len(by_id["results"]) == 3
        assert "b" not in [r["id"] for r in by_id["results"]]
        scores = [r["score"] for r in by_id["results"]]
        assert scores == sorted(scores, reverse=True)

        by_image = await client.post("/similar", files=files([blobs[2]], "image"), data={"k": 2})
        top = by_image.json()["results"][0]
        assert top["id"] == "c" and top["metadata"] == {"n": 2} and top["score"] > 0.999

        item = (await client.get("/items/c")).json()
        assert item["metadata"] == {"n": 2} and item["source"] == "img2.jpg"
        assert item["has_thumbnail"] is True
        thumb = await client.get("/items/c/thumbnail")
        assert thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"
        listing = (await client.get("/items", params={"limit": 2})).json()
        assert listing["total"] == 5 and len(listing["items"]) == 2

        duplicate = await client.post("/items", files=files(blobs[:1]), data={"ids": "a"})
        assert duplicate.status_code == 409 and "'a'" in duplicate.json()["detail"]
        assert (await client.delete("/items/a")).status_code == 204
        for response in (
            await client.delete("/items/a"),
            await client.get("/items/a"),
            await client.get("/items/a/thumbnail"),
            await client.get("/similar", params={"id": "a"}),
        ):
            assert response.status_code == 404, response.text
            assert "'a'" in response.json()["detail"]
        assert (await client.get("/similar", params={"id": "b", "k": 4})).status_code == 422
        stats = (await client.get("/index")).json()
        assert stats["count"] == 4 and stats["dim"] == 192 and stats["type"] == "flat"
        ready = (await client.get("/readyz")).json()
        assert ready == {"ready": True, "model": "tiny-vit", "index_size": 4, "detail": None}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"metadata": "{not json"}, "metadata is not valid JSON"),
        ({"metadata": "[1]"}, "metadata must be a JSON object"),
        ({"ids": ["x", "y"]}, "got 2 ids for 1 images"),
        ({"ids": "has/slash"}, "'/'"),
        ({"metadata": '{"big": "' + "x" * 20000 + '"}'}, "limit"),
    ],
)
async def test_bad_item_parameters_are_422(tiny_vit_dir, tmp_path, data, words):
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        response = await client.post("/items", files=files([photo_bytes(0)]), data=data)
        assert response.status_code == 422 and words in response.json()["detail"]
        assert (await client.get("/index")).json()["count"] == 0


async def test_token_guards_mutating_endpoints_only(tiny_vit_dir, tmp_path):
    async with serve(settings_for(tiny_vit_dir, tmp_path, api_token="s3cret")) as client:
        blob = files([photo_bytes(0)])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            denied = await client.post("/items", files=blob, headers=headers)
            assert denied.status_code == 401 and "Bearer" in denied.json()["detail"]
            assert denied.headers["www-authenticate"] == "Bearer"
        ok = await client.post(
            "/items", files=blob, data={"ids": "x"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 201
        assert (await client.delete("/items/x")).status_code == 401
        deleted = await client.delete("/items/x", headers={"Authorization": "Bearer s3cret"})
        assert deleted.status_code == 204
        assert (await client.post("/embed", files=blob)).status_code == 200  # read-only: open


async def test_full_queue_answers_503_with_retry_after(tiny_vit_dir, tmp_path):
    settings = settings_for(
        tiny_vit_dir, tmp_path, queue_limit=4, max_batch=64, batch_wait_ms=400, retry_after_s=3
    )
    blobs = [photo_bytes(i) for i in range(3)]
    async with serve(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/embed", files=files(blobs)) for _ in range(6))
        )
        metrics = (await client.get("/metrics")).text
    codes = [a.status_code for a in answers]
    assert 200 in codes and 503 in codes, codes
    busy = answers[codes.index(503)]
    assert busy.headers["retry-after"] == "3" and "busy" in busy.json()["detail"]
    assert metric_value(metrics, "dino_queue_rejections_total") == codes.count(503)


async def test_models_health_and_openapi(tiny_vit_dir, tmp_path):
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        model = (await client.get("/models")).json()
        assert model["name"] == "tiny-vit" and model["patch_size"] == 8
        assert model["variant"] == "fp32" and model["served_file"] == "model.onnx"
        assert model["sha256"] == load_manifest(tiny_vit_dir).model_sha256
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert (await client.get("/static/app.js")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/embed",
        "/attention",
        "/similar",
        "/items",
        "/items/{item_id}",
        "/items/{item_id}/thumbnail",
        "/index",
        "/models",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    embed = paths["/embed"]["post"]
    assert set(embed["responses"]) >= {"200", "400", "413", "415", "422", "503"}
    assert embed["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    assert {"401", "409"} <= set(paths["/items"]["post"]["responses"])
    assert "409" in paths["/attention"]["post"]["responses"]
    assert "image/png" in paths["/attention"]["post"]["responses"]["200"]["content"]


async def test_model_endpoints_work_while_the_index_cannot_open(tiny_vit_dir, tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data dir should be")
    app = create_app(settings_for(tiny_vit_dir, not_a_dir))
    async with app.router.lifespan_context(app):
        with pytest.raises(IndexStoreError, match="cannot open the index"):
            await app.state.runtime.wait_ready(timeout=30)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            ready = await client.get("/readyz")
            similar = await client.get("/similar", params={"id": "x"})
            embed = await client.post("/embed", files=files([photo_bytes(0)]))
            metrics = (await client.get("/metrics")).text
    assert ready.status_code == 503 and ready.headers["retry-after"]
    assert ready.json()["ready"] is False and "cannot open the index" in ready.json()["detail"]
    assert similar.status_code == 503 and "cannot open the index" in similar.json()["detail"]
    assert embed.status_code == 200
    assert "\ndino_index_items " not in metrics  # no sample while there is no index
