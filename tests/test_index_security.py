"""Attacks on the index through the live server and ``python -m service.index``, each shown to
fail safely: client-chosen paths, maintenance under a running server, symlinks, id collisions."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from live_server import Server
from service_helpers import photo_bytes
from test_index_cli import PHOTOS, cli, open_for, write_images

from service.index import IndexStore, IndexStoreError
from service.index.snapshot import SNAPSHOT_FILE

PRECIOUS = "not to be touched\n"


def _args(model_dir: Path, data: Path) -> list[str]:
    return ["--models-dir", str(model_dir.parent), "--data-dir", str(data), "--no-progress"]


def _post(url: str, files: list[tuple[str, bytes]], ids: list[str]) -> httpx.Response:
    return httpx.post(
        f"{url}/items",
        files=[("images", (name, data)) for name, data in files],
        data={"ids": ids},
        timeout=60,
    )


def test_client_file_names_are_never_opened(tiny_vit_dir, tiny_resnet_dir, tmp_path):
    images, data = tmp_path / "images", tmp_path / "data"
    write_images(images, PHOTOS)
    assert cli("build", "--images", str(images), *_args(tiny_vit_dir, data)).returncode == 0
    # A server-side image a client wants re-embedded (it would decode fine if opened).
    private = tmp_path / "private" / "secret.png"
    private.parent.mkdir()
    private.write_bytes(photo_bytes(5))
    names = {"abs": str(private), "etc": "/etc/hostname", "dotdot": "../../etc/hostname"}
    server = Server(tiny_vit_dir, data, tmp_path / "server.log")
    try:
        server.wait_ready()
        files = [(name, photo_bytes(i)) for i, name in enumerate(names.values())]
        added = _post(server.url, files, list(names))
        assert added.status_code == 201, added.text
        for bad in (".", ".."):  # path steps are no ids
            refused = _post(server.url, [("x.jpg", photo_bytes(0))], [bad])
            assert refused.status_code == 422 and "not allowed" in refused.json()["detail"]
        listed = httpx.get(f"{server.url}/items", timeout=10).json()["items"]
    finally:
        assert server.stop() in (0, -15)
    sources = {item["id"]: item["source"] for item in listed}
    # Answers hold names, never server paths: the upload's last name, a built item's path
    # below its --images folder.
    assert sources["abs"] == "secret.png" and sources["etc"] == sources["dotdot"] == "hostname"
    assert sources["coffee.png"] == "coffee.png"
    assert not any(str(tmp_path) in s or s.startswith("/") for s in sources.values())

    other = _args(tiny_resnet_dir, data)
    refused = cli("rebuild", *other)
    assert refused.returncode == 2
    assert all(repr(i) in refused.stderr for i in names) and "Traceback" not in refused.stderr
    done = cli("rebuild", "--skip-missing", *other)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{") :])
    # The three uploads were dropped, not re-read: the server's file was never embedded.
    assert sorted(report["dropped"]) == sorted(names) and report["re_embedded"] == len(PHOTOS)
    with open_for(tiny_resnet_dir, data) as store:
        assert len(store) == len(PHOTOS) and not store.existing(names)


def test_maintenance_refused_while_the_server_runs(tiny_vit_dir, tiny_resnet_dir, tmp_path):
    images, data = tmp_path / "images", tmp_path / "data"
    write_images(images, PHOTOS)
    assert cli("build", "--images", str(images), *_args(tiny_vit_dir, data)).returncode == 0
    snapshot = (data / SNAPSHOT_FILE).read_bytes()
    server = Server(tiny_vit_dir, data, tmp_path / "server.log")
    try:
        server.wait_ready()
        assert _post(server.url, [("a.jpg", photo_bytes(0))], ["before"]).status_code == 201
        env = {k: v for k, v in os.environ.items() if not k.startswith("DINO_")}
        running = subprocess.Popen(
            [sys.executable, "-m", "service.index", "rebuild", "--skip-missing",
             *_args(tiny_resnet_dir, data)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        during = _post(server.url, [("b.jpg", photo_bytes(1))], ["during"])
        _, err = running.communicate(timeout=180)
        assert during.status_code == 201, during.text
        assert running.returncode == 2 and "in use by another process" in err, err
        for command in ("rebuild", "stats"):
            same = cli(command, *(["--data-dir", str(data)] if command == "stats" else
                                  _args(tiny_vit_dir, data)))  # fmt: skip
            assert same.returncode == 2 and f"pid {server.proc.pid}" in same.stderr
        assert (data / SNAPSHOT_FILE).read_bytes() == snapshot  # not deleted before the lock
    finally:
        assert server.stop() in (0, -15)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("data")) == ["data"]
    with open_for(tiny_vit_dir, data) as store:
        assert store.existing(["before", "during"]) == {"before", "during"}
        assert len(store) == len(PHOTOS) + 2


def test_second_server_waits_for_the_lock(tiny_vit_dir, tmp_path):
    data = tmp_path / "data"
    first = Server(tiny_vit_dir, data, tmp_path / "first.log")
    second = None
    try:
        first.wait_ready()
        assert _post(first.url, [("a.jpg", photo_bytes(0))], ["kept"]).status_code == 201
        second = Server(tiny_vit_dir, data, tmp_path / "second.log")
        detail = ""
        for _ in range(300):
            try:
                answer = httpx.get(f"{second.url}/readyz", timeout=2)
                detail = answer.json().get("detail") or ""
                if "waiting for the data folder lock" in detail:
                    break
            except httpx.TransportError:
                pass
            assert second.proc.poll() is None, second.output()
            __import__("time").sleep(0.1)
        assert f"held by pid {first.proc.pid}" in detail, detail
        assert first.stop() in (0, -15)
        second.wait_ready(timeout=60)
        item = httpx.get(f"{second.url}/items/kept", timeout=10)
        assert item.status_code == 200
    finally:
        first.stop()
        if second is not None:
            assert second.stop() in (0, -15)


def test_symlinks_are_not_followed(tiny_vit_dir, tmp_path):
    images, data, outside = tmp_path / "images", tmp_path / "data", tmp_path / "outside"
    write_images(images, PHOTOS)
    write_images(outside, {"private.png": "chelsea", "deep/also.png": "rocket"})
    (images / "link.png").symlink_to(outside / "private.png")
    (images / "dir").symlink_to(outside / "deep")
    (images / "inside.png").symlink_to(images / "coffee.png")  # stays in the folder: fine
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)

    # A symlink planted as the lock file: refused, its target untouched.
    data.mkdir()
    (data / ".lock").symlink_to(victim)
    planted = cli("build", "--images", str(images), *_args(tiny_vit_dir, data))
    assert planted.returncode == 2 and "symbolic link" in planted.stderr, planted.stderr
    assert victim.read_text() == PRECIOUS
    (data / ".lock").unlink()

    built = cli("build", "--images", str(images), "--recursive", *_args(tiny_vit_dir, data))
    assert built.returncode == 0, built.stderr
    assert "link.png: a symbolic link out of --images" in built.stdout
    with open_for(tiny_vit_dir, data) as store:
        assert store.existing(["link.png", "dir:also.png"]) == set()
        assert "inside.png" in store and len(store) == len(PHOTOS) + 1

    # The snapshot's temp file: the server's predictable old name, planted as a link.
    server = Server(tiny_vit_dir, data, tmp_path / "server.log")
    try:
        server.wait_ready()
        (data / f".{SNAPSHOT_FILE}.tmp-{server.proc.pid}").symlink_to(victim)
        assert _post(server.url, [("n.jpg", photo_bytes(2))], ["new"]).status_code == 201
    finally:
        assert server.stop() in (0, -15)  # writes a snapshot on the way out
    assert victim.read_text() == PRECIOUS
    with open_for(tiny_vit_dir, data) as store:
        assert "new" in store


def test_colliding_ids_fail_per_file_and_reruns_work(tiny_vit_dir, tmp_path):
    images, data = tmp_path / "images", tmp_path / "data"
    write_images(images, {"a/b.png": "coffee", "a:b.png": "camera", "c.png": "astronaut"})
    args = ["build", "--images", str(images), "--recursive", *_args(tiny_vit_dir, data)]
    for run, added, skipped in ((1, 2, 0), (2, 0, 2)):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert f"3 images found: {added} added, {skipped} already indexed, 1 failed" in (
            done.stdout
        ), (run, done.stdout)
        assert "rename one of the two files" in done.stdout
    with open_for(tiny_vit_dir, data) as store:
        kept = store.get("a:b.png")
        assert kept is not None and kept.source in ("a/b.png", "a:b.png") and "c.png" in store


def test_store_refuses_bad_sources_and_ids(tmp_path):
    store = IndexStore.open(tmp_path / "d", "sha", 4, progress=False)
    try:
        one = np.ones((1, 4), np.float32)
        for source, root in (("../x.png", "/r"), ("/etc/hostname", "/r"), ("x.png", "rel")):
            try:
                store.add(one, ids=["x"], sources=[source], source_roots=[root])
            except ValueError as exc:
                assert "source" in str(exc)
            else:
                raise AssertionError(f"{source!r} under {root!r} was accepted")
        for bad in (".", ".."):
            try:
                store.add(one, ids=[bad])
            except ValueError as exc:
                assert "not allowed" in str(exc)
            else:
                raise AssertionError(f"id {bad!r} was accepted")
        assert len(store) == 0
    finally:
        store.close()
    try:
        IndexStore.open(tmp_path / "d", "sha", 4, progress=False).close()
    except IndexStoreError as exc:  # pragma: no cover - the lock was released on close
        raise AssertionError(exc) from exc


def test_legacy_absolute_sources_need_an_explicit_root(tiny_vit_dir, tiny_resnet_dir, tmp_path):
    # An index written before sources recorded their folder: absolute paths, no root column.
    images, data = tmp_path / "images", tmp_path / "data"
    write_images(images, PHOTOS)
    assert cli("build", "--images", str(images), *_args(tiny_vit_dir, data)).returncode == 0
    with sqlite3.connect(data / "items.sqlite") as db:
        db.execute("UPDATE items SET source = ? || '/' || source", (str(images.resolve()),))
        db.execute("ALTER TABLE items DROP COLUMN source_root")
    with open_for(tiny_vit_dir, data) as store:  # the column comes back, empty
        assert store.get("coffee.png").source == "coffee.png"  # the name only
    other = _args(tiny_resnet_dir, data)
    elsewhere = cli("rebuild", "--legacy-root", str(tmp_path / "nothing-here"), *other)
    assert elsewhere.returncode == 2 and "'coffee.png'" in elsewhere.stderr
    done = cli("rebuild", "--legacy-root", str(images), *other)
    assert done.returncode == 0, done.stderr
    with open_for(tiny_resnet_dir, data) as store:
        assert len(store) == len(PHOTOS) and store.get("coffee.png").source == "coffee.png"
