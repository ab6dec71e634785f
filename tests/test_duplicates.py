"""GET /duplicates and /similar's min_score, over real HTTP against a live server process."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import Server
from service_helpers import encode, photo

from service.index.duplicates import components, find_groups

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page", "clock")
COPIED = ("chelsea", "rocket", "moon")  # each stored twice more, byte for byte: scores of 1.0


@pytest.fixture(scope="module")
def server(tiny_vit_dir: Path, tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("duplicates")
    live = Server(tiny_vit_dir, tmp / "data", tmp / "server.log")
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def _add(url: str, ids: list[str], blobs: list[bytes]) -> None:
    files = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in zip(ids, blobs, strict=True)]
    r = httpx.post(f"{url}/items", files=files, data={"ids": ids}, timeout=60)
    assert r.status_code == 201, r.text


def _groups(url: str, **params: object) -> httpx.Response:
    return httpx.get(f"{url}/duplicates", params=params, timeout=60)


def test_empty_index_has_no_groups(server: Server) -> None:
    r = _groups(server.url, threshold=0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["total_groups"], body["groups"], body["items_scanned"]) == (0, [], 0)


@pytest.mark.parametrize("bad", ["nan", "NaN", "-0.2", "0", "1.5", "inf", "-inf", "abc", ""])
def test_hostile_thresholds_are_422(server: Server, bad: str) -> None:
    r = _groups(server.url, threshold=bad)
    assert r.status_code == 422, r.text
    assert "threshold" in r.json()["detail"]


def test_groups_and_paging(server: Server) -> None:
    blobs = {name: encode(photo(name, 80)) for name in PHOTOS}
    _add(server.url, list(PHOTOS), [blobs[n] for n in PHOTOS])
    copies = [f"{n}-copy{c}" for n in COPIED for c in (1, 2)]
    _add(server.url, copies, [blobs[c.split("-")[0]] for c in copies])

    response = _groups(server.url, threshold=0.9999, limit=100)
    assert response.status_code == 200, response.text
    everything = response.json()
    assert everything["items_scanned"] == len(PHOTOS) + len(copies)
    assert everything["total_groups"] == 3 and everything["pairs"] == 9  # 3 pairs per trio
    for group in everything["groups"]:
        ids = sorted(m["id"] for m in group["items"])
        assert group["size"] == 3 and group["max_score"] > 0.9999
        assert ids == sorted([ids[0], f"{ids[0]}-copy1", f"{ids[0]}-copy2"])
        assert all(m["best_score"] > 0.9999 for m in group["items"])

    pages = [_groups(server.url, threshold=0.9999, offset=o, limit=1).json() for o in range(4)]
    assert [len(p["groups"]) for p in pages] == [1, 1, 1, 0]
    assert [p["groups"][0] for p in pages[:3]] == everything["groups"]
    assert all(p["total_groups"] == 3 for p in pages)
    for bad in ({"offset": -1}, {"limit": 0}, {"limit": 101}, {"offset": "x"}):
        assert _groups(server.url, threshold=0.9, **bad).status_code == 422

    # A very low threshold links most items: groups never hold more than the index.
    low = _groups(server.url, threshold=1e-9, limit=100).json()
    assert low["pairs"] >= 9 and sum(g["size"] for g in low["groups"]) <= 15

    # Deleting a copy changes the groups at once (the cached search is keyed on the index).
    assert httpx.delete(f"{server.url}/items/moon-copy1").status_code == 204
    after = _groups(server.url, threshold=0.9999, limit=100).json()
    assert sorted(g["size"] for g in after["groups"]) == [2, 3, 3]


def test_min_score_filters_similar(server: Server) -> None:
    url = server.url
    loose = httpx.get(f"{url}/similar", params={"id": "chelsea", "k": 10}).json()["results"]
    strict = httpx.get(
        f"{url}/similar", params={"id": "chelsea", "k": 10, "min_score": 0.9999}
    ).json()["results"]
    assert len(loose) == 10 and {r["id"] for r in strict} == {"chelsea-copy1", "chelsea-copy2"}
    image = {"image": ("q.jpg", encode(photo("chelsea", 80)), "image/jpeg")}
    posted = httpx.post(f"{url}/similar", files=image, data={"k": "10", "min_score": "0.9999"})
    assert posted.status_code == 200, posted.text
    assert {r["id"] for r in posted.json()["results"]} == {
        "chelsea",
        "chelsea-copy1",
        "chelsea-copy2",
    }
    for bad in ("nan", "1.01", "-1.5", "high"):
        r = httpx.get(f"{url}/similar", params={"id": "chelsea", "min_score": bad})
        assert r.status_code == 422 and "min_score" in r.json()["detail"], r.text
        r = httpx.post(f"{url}/similar", files=image, data={"min_score": bad})
        assert r.status_code == 422 and "min_score" in r.json()["detail"], r.text


def test_components_and_limits() -> None:
    # A chain 0-1-2-3 and a pair 5-6 with 4 alone: labels are each component's smallest node.
    i, j = np.array([2, 0, 1, 5]), np.array([3, 1, 2, 6])
    assert components(7, i, j).tolist() == [0, 0, 0, 0, 4, 5, 5]
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 16)).astype(np.float32)
    vectors = np.concatenate([base, base[:5] + 1e-3 * rng.normal(size=(5, 16))])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = np.arange(100, 155)
    found = find_groups(rows, vectors.astype(np.float32), 0.99)
    assert found.pairs == 5 and [len(m) for m in found.members] == [2] * 5
    assert sorted(int(m[0]) for m in found.members) == [100, 101, 102, 103, 104]
