"""One contract, two backends: every index endpoint and store call behaves the same on the
embedded FAISS + SQLite index and on PostgreSQL + pgvector (a real server, ``pg_fixture``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from service_helpers import photo_bytes, serve, settings_for

from service.index import DuplicateIdError, IndexModelMismatch, IndexStore, InvalidItemError
from service.index.factory import open_index
from service.index.filters import matches

pytestmark = pytest.mark.anyio
BACKENDS = ("embedded", "postgres")
SHA, DIM = "c" * 64, 32


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> dict:
    """Settings overrides selecting the backend (a fresh data dir or a fresh database)."""
    if request.param == "postgres":
        return {"index_url": request.getfixturevalue("pg_url")}
    return {}


def open_store(tmp_path, backend: dict, sha: str = SHA, **params):
    settings = settings_for(tmp_path, tmp_path / "data", **{**backend, "index_params": params})
    return open_index(settings, sha, DIM, "contract-model", progress=False)


def upload(blobs: list[bytes]) -> list:
    return [("images", (f"img{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


async def test_every_index_endpoint(tiny_vit_dir, tmp_path, backend):
    blobs = [photo_bytes(i) for i in range(5)]
    metas = [{"label": "cat" if i % 2 else "dog", "n": i} for i in range(5)]
    async with serve(settings_for(tiny_vit_dir, tmp_path / "data", **backend)) as client:
        added = await client.post(
            "/items",
            files=upload(blobs),
            data={"ids": [f"p{i}" for i in range(5)], "metadata": json.dumps(metas)},
        )
        assert added.status_code == 201, added.text
        assert added.json()["ids"] == [f"p{i}" for i in range(5)]
        again = await client.post("/items", files=upload(blobs[:1]), data={"ids": ["p0"]})
        assert again.status_code == 409 and "p0" in again.json()["detail"]

        item = (await client.get("/items/p3")).json()
        assert item["metadata"] == {"label": "cat", "n": 3} and item["has_thumbnail"]
        assert item["source"] == "img3.jpg" and item["created_at"].endswith("Z")
        thumb = await client.get("/items/p3/thumbnail")
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        listed = (await client.get("/items", params={"limit": 2})).json()
        assert [i["id"] for i in listed["items"]] == ["p4", "p3"] and listed["total"] == 5

        by_id = (await client.get("/similar", params={"id": "p1", "k": 10})).json()["results"]
        assert len(by_id) == 4 and "p1" not in [r["id"] for r in by_id]
        scores = [r["score"] for r in by_id]
        assert scores == sorted(scores, reverse=True)
        query = {"image": ("q.jpg", blobs[2])}
        by_image = await client.post("/similar", files=query, data={"k": 2})
        top = by_image.json()["results"][0]
        assert top["id"] == "p2" and top["score"] > 0.999 and top["metadata"]["n"] == 2

        cats = await client.get("/similar", params={"id": "p0", "filter": '{"label": "cat"}'})
        assert sorted(r["id"] for r in cats.json()["results"]) == ["p1", "p3"]
        dogs = await client.post(
            "/similar",
            files={"image": ("q.jpg", blobs[1])},
            data={"k": 10, "filter": json.dumps({"label": "dog", "n": 4})},
        )
        assert [r["id"] for r in dogs.json()["results"]] == ["p4"]

        assert (await client.delete("/items/p2")).status_code == 204
        assert (await client.delete("/items/p2")).status_code == 404
        assert (await client.get("/items/p2")).status_code == 404
        assert (await client.get("/similar", params={"id": "p2"})).status_code == 404
        after = (await client.get("/similar", params={"id": "p0", "k": 10})).json()["results"]
        assert "p2" not in [r["id"] for r in after] and len(after) == 3
        stats = (await client.get("/index")).json()
        assert stats["count"] == 4 and stats["dim"] == 192
        ready = (await client.get("/readyz")).json()
        assert ready["ready"] and ready["index_size"] == 4


HOSTILE = [
    ("[1, 2]", "JSON object"),
    ('"label"', "JSON object"),
    ("{not json", "not valid JSON"),
    ('{"a": {"b": 1}}', "strings, numbers or booleans"),
    ('{"a": [1]}', "strings, numbers or booleans"),
    ('{"a": null}', "strings, numbers or booleans"),
    ("[" * 5000 + "]" * 5000, "longer than"),
    ('{"a": ' + "[" * 1500 + "]" * 1500 + "}", "nested too deeply"),
    (json.dumps({f"k{i}": i for i in range(17)}), "at most 16"),
    ('{"bad key\\"": 1}', "not allowed"),
    ('{"a": 1e999}', "strings, numbers or booleans"),
    ('{"a": ' + "9" * 3000 + "}", "64-bit"),
    (json.dumps({"a": "x" * 600}), "over 512"),
    ('{"a": "\\ud800"}', "not valid text"),
    ('{"a": "\\u0000"}', "not valid text"),
]


@pytest.mark.parametrize(("text", "says"), HOSTILE)
async def test_hostile_filters_are_422(tiny_vit_dir, tmp_path, text, says):
    async with serve(settings_for(tiny_vit_dir, tmp_path / "data")) as client:
        await client.post("/items", files=upload([photo_bytes(0)]), data={"ids": ["x"]})
        got = await client.get("/similar", params={"id": "x", "filter": text})
        posted = await client.post(
            "/similar", files={"image": ("q.jpg", photo_bytes(1))}, data={"filter": text}
        )
    for response in (got, posted):
        assert response.status_code == 422, response.text
        assert says in response.json()["detail"]


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, DIM))
    return (centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.mark.parametrize("exact_max", [None, 50], ids=["default", "ann-path"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_filtered_search_returns_k_from_a_rare_label(
    tmp_path, backend_name, exact_max, request, monkeypatch
):
    """20 of 3,000 items carry the rare label: a filtered top 10 is 10 of them. By default few
    matches are scanned exactly (the best 10); with the threshold lowered the approximate path
    (FAISS id selector, pgvector iterative scan) must still fill k."""
    if exact_max is not None:
        from service.index import filtered, postgres

        monkeypatch.setattr(filtered, "EXACT_MAX", exact_max)
        monkeypatch.setattr(postgres, "EXACT_MAX", exact_max)
    backend = (
        {"index_url": request.getfixturevalue("pg_url")}
        if backend_name == "postgres"
        else {"index_type": "hnsw"}
    )
    x = clustered(3000)
    metas = [
        {"label": "rare" if i % 150 == 7 else "common", "even": i % 2 == 0} for i in range(3000)
    ]
    with open_store(tmp_path, backend) as store:
        store.add(x, ids=[f"v{i}" for i in range(3000)], metadata=metas)
        units = x / np.linalg.norm(x, axis=1, keepdims=True)
        for flt in ({"label": "rare"}, {"label": "rare", "even": False}, {"even": True}):
            allowed = np.array([matches(m, flt) for m in metas])
            for q in range(3):
                hits = store.search(x[q], 10, filter=flt)[0]
                want = np.flatnonzero(allowed)[np.argsort(-(units[allowed] @ units[q]))][:10]
                assert len(hits) == min(10, allowed.sum()), (flt, len(hits))
                assert all(matches(h.metadata, flt) for h in hits)
                overlap = len({h.id for h in hits} & {f"v{i}" for i in want})
                if exact_max is None or allowed.sum() > 1000:
                    assert overlap >= 9, (flt, overlap)  # HNSW is approximate; exact: 10
        near = store.similar("v7", 5, filter={"label": "rare"})
        assert len(near) == 5 and "v7" not in [h.id for h in near]
        assert store.search(x[0], 5, filter={"label": "absent"}) == [[]]
        with pytest.raises(InvalidItemError, match="JSON object"):
            store.search(x[0], 5, filter=["label"])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_store_contract_and_another_model_refused(tmp_path, backend_name, request):
    backend = {"index_url": request.getfixturevalue("pg_url")} if backend_name == "postgres" else {}
    x = clustered(40, seed=1)
    with open_store(tmp_path, backend) as store:
        assert store.add(x[:30], ids=[f"a{i}" for i in range(30)]) == [f"a{i}" for i in range(30)]
        with pytest.raises(DuplicateIdError):
            store.add(x[30:32], ids=["b0", "a3"])
        assert store.existing(["a1", "b0", "zz"]) == {"a1"}  # all or nothing: b0 not stored
        assert len(store) == 30 and store.get("zz") is None and store.vector("zz") is None
        np.testing.assert_allclose(
            store.vector("a5"), x[5] / np.linalg.norm(x[5]), rtol=1e-5, atol=1e-6
        )
        with pytest.raises(InvalidItemError):
            store.add(x[:1, :5])
        assert store.delete("a5") and not store.delete("a5") and len(store) == 29
        assert "a5" not in [h.id for h in store.search(x[5], 29)[0]]
        items, total = store.list_items(0, 3)
        assert [i.id for i in items] == ["a29", "a28", "a27"] and total == 29
    with pytest.raises(IndexModelMismatch, match="was built by model 'contract-model'"):
        open_store(tmp_path, backend, sha="d" * 64)


def test_both_backends_satisfy_the_protocol(tmp_path, pg_url):
    from service.index.backend import IndexBackend

    for backend in ({}, {"index_url": pg_url}):
        with open_store(tmp_path, backend) as store:
            assert isinstance(store, IndexBackend)
    assert IndexStore is not None
