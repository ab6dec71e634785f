"""Auth and limits over HTTP: every endpoint that changes state needs the token (and says so in
OpenAPI), reads stay open; k, images per request, body bytes and image pixels stop exactly at
their settings; ids and metadata are validated (size, type, nesting) and a refusal writes
nothing. Extends test_api.py / test_api_errors.py (which cover the basic cases)."""

from __future__ import annotations

import pytest
from PIL import Image
from service_helpers import encode, metric_value, photo_bytes, serve, settings_for

pytestmark = pytest.mark.anyio
TOKEN = "s3cret-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
MUTATING = {("post", "/items"), ("delete", "/items/{item_id}")}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def guarded(tiny_vit_dir, tmp_path):
    async with serve(settings_for(tiny_vit_dir, tmp_path, api_token=TOKEN)) as client:
        yield client


def files(n: int, field: str = "images", start: int = 0) -> list:
    return [(field, (f"{i}.jpg", photo_bytes(i))) for i in range(start, start + n)]


async def count(client) -> int:
    return (await client.get("/index")).json()["count"]


async def test_openapi_marks_exactly_the_mutating_endpoints_with_401(guarded):
    spec = (await guarded.get("/openapi.json")).json()
    with_401 = {
        (method, path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "401" in op.get("responses", {})
    }
    assert with_401 == MUTATING
    # Any method other than GET/POST would change state: it must be guarded too.
    others = {(m, p) for p, ops in spec["paths"].items() for m in ops if m not in ("get", "post")}
    assert others <= MUTATING


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
        f"Bearer {TOKEN} {TOKEN}",
    ],
)
async def test_mutations_without_the_right_token_are_401_and_change_nothing(guarded, auth):
    headers = {} if auth is None else {"Authorization": auth}
    added = await guarded.post("/items", files=files(1), data={"ids": "x"}, headers=headers)
    assert added.status_code == 401, added.text
    assert added.headers["www-authenticate"] == "Bearer"
    assert "DINO_API_TOKEN" in added.json()["detail"]
    # Even without a body the token is checked first (no 422 telling what the body needs).
    assert (await guarded.post("/items", headers=headers)).status_code == 401
    assert (await guarded.delete("/items/x", headers=headers)).status_code == 401
    assert await count(guarded) == 0
    metrics = (await guarded.get("/metrics")).text
    assert metric_value(metrics, "dino_images_total") == 0  # no inference spent on it


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_right_token_is_accepted_with_any_scheme_case(guarded, scheme):
    headers = {"Authorization": f"{scheme}  {TOKEN}"}
    added = await guarded.post("/items", files=files(1), data={"ids": "x"}, headers=headers)
    assert added.status_code == 201, added.text
    assert (await guarded.delete("/items/x", headers=headers)).status_code == 204


async def test_reads_stay_open_without_a_token(guarded):
    assert (await guarded.post("/items", files=files(2), headers=GOOD)).status_code == 201
    some_id = (await guarded.get("/items")).json()["items"][0]["id"]
    image = files(1, "image")
    answers = {
        "POST /embed": await guarded.post("/embed", files=files(1)),
        "POST /attention": await guarded.post("/attention", files=image),
        "POST /similar": await guarded.post("/similar", files=image),
        "GET /similar": await guarded.get("/similar", params={"id": some_id}),
        "GET /items": await guarded.get("/items"),
        "GET /items/{id}": await guarded.get(f"/items/{some_id}"),
        "GET /items/{id}/thumbnail": await guarded.get(f"/items/{some_id}/thumbnail"),
        "GET /index": await guarded.get("/index"),
        "GET /models": await guarded.get("/models"),
        "GET /healthz": await guarded.get("/healthz"),
        "GET /readyz": await guarded.get("/readyz"),
        "GET /metrics": await guarded.get("/metrics"),
    }
    assert {k: v.status_code for k, v in answers.items() if v.status_code != 200} == {}


async def test_k_images_bytes_and_pixels_stop_exactly_at_their_settings(tiny_vit_dir, tmp_path):
    settings = settings_for(
        tiny_vit_dir,
        tmp_path,
        max_k=5,
        max_images_per_request=3,
        max_image_pixels=120 * 100,
        max_request_bytes=60_000,
    )
    at_limit = encode(Image.new("RGB", (120, 100), "olive"), "PNG")
    over = encode(Image.new("RGB", (120, 101), "olive"), "PNG")
    async with serve(settings) as client:
        assert (
            await client.post("/items", files=files(3), data={"ids": '["a","b","c"]'})
        ).is_success
        for k, status in ((5, 200), (6, 422), (10**30, 422)):
            by_id = await client.get("/similar", params={"id": "a", "k": k})
            by_image = await client.post("/similar", files=files(1, "image"), data={"k": k})
            assert (by_id.status_code, by_image.status_code) == (status, status), by_id.text
        four = await client.post("/items", files=files(4, start=3))
        assert four.status_code == 413 and "DINO_MAX_IMAGES_PER_REQUEST" in four.json()["detail"]
        big = await client.post(
            "/items", files=[("images", ("big", b"\xff\xd8\xff" + b"0" * 60_000))]
        )
        assert big.status_code == 413 and "DINO_MAX_REQUEST_BYTES" in big.json()["detail"]
        for path, field in (("/embed", "images"), ("/attention", "image"), ("/similar", "image")):
            ok = await client.post(path, files={field: ("ok.png", at_limit)})
            refused = await client.post(path, files={field: ("over.png", over)})
            assert ok.status_code == 200, (path, ok.text)
            assert refused.status_code == 413 and "120x101" in refused.json()["detail"]
        mixed = await client.post("/items", files={"images": ("over.png", over)})
        assert mixed.status_code == 413
        assert await count(client) == 3  # none of the refused requests wrote anything


@pytest.mark.parametrize(
    ("ids", "n", "status", "words"),
    [
        ("x" * 128, 1, 201, None),
        ("x" * 129, 1, 422, "1 to 128 characters"),
        ("a\x01b", 1, 422, "non-printable"),
        (" padded", 1, 422, "leading or trailing"),
        ("a/b", 1, 422, "'/'"),
        ('["p", "p"]', 2, 409, "p"),
        ('["p", 7]', 2, 422, "ids must be strings"),
        ('["p", ["q"]]', 2, 422, "ids must be strings"),
        ("[" * 20_000, 2, 422, "nested too deeply"),
        ('["p"', 2, 422, "not a valid JSON array"),
    ],
)
async def test_ids_are_validated(tiny_vit_dir, tmp_path, ids, n, status, words):
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        answer = await client.post("/items", files=files(n), data={"ids": ids})
        assert answer.status_code == status, answer.text
        if words:
            assert words in answer.json()["detail"]
            assert await count(client) == 0


async def test_an_existing_id_refuses_the_whole_batch(tiny_vit_dir, tmp_path):
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        assert (await client.post("/items", files=files(1), data={"ids": "old"})).is_success
        clash = await client.post("/items", files=files(2, start=1), data={"ids": '["new","old"]'})
        assert clash.status_code == 409 and "old" in clash.json()["detail"]
        assert (await client.get("/items/new")).status_code == 404  # all or nothing
        assert await count(client) == 1


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    ("metadata", "status", "words"),
    [
        (nested(32), 201, None),
        (nested(33), 422, "nested more than 32 levels"),
        ('{"a": ' + "[" * 40 + "]" * 40 + "}", 422, "nested more than 32 levels"),
        # Found here: these three were 500s (RecursionError, ValueError from int()).
        ("[" * 100_000, 422, "nested too deeply"),
        (nested(50_000), 422, "nested too deeply"),
        ('{"n": ' + "9" * 5000 + "}", 422, "too many digits"),
        ('{"x": NaN}', 422, "JSON"),
        ('"text"', 422, "JSON object"),
        ("[{}, 3]", 422, "JSON object"),
    ],
)
async def test_metadata_is_validated_and_what_is_stored_can_be_served(
    tiny_vit_dir, tmp_path, metadata, status, words
):
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        answer = await client.post("/items", files=files(2), data={"metadata": metadata})
        assert answer.status_code == status, answer.text
        if words:
            assert words in answer.json()["detail"]
        # Found here: metadata 300 levels deep was stored, then every GET /items (the gallery)
        # and GET /items/{id} answered 500. Whatever is accepted must be servable.
        listed = await client.get("/items")
        assert listed.status_code == 200 and listed.json()["total"] == (2 if status == 201 else 0)
        for item in listed.json()["items"]:
            assert (await client.get(f"/items/{item['id']}")).status_code == 200
