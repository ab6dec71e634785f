"""The images for real: a private Docker engine builds the serve target from the repository's
Dockerfile, runs it on a freshly exported tiny model and starts the real compose file.

Needs root, dockerd, docker, docker-compose and debootstrap (`.ci/run` installs them); without
them the tests skip, except under CI where that is a failure. The first run builds a Python base
image from Debian's archive into a persistent data root (docker_engine.DATA_ROOT); later runs
reuse it and the build cache. The train target builds only when DINO_TEST_TRAIN_IMAGE=1 (several
GB of torch). See docs/containers.md.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from docker_engine import Engine, EngineError, missing_tools
from live_server import free_port
from service_helpers import photo_bytes

ROOT = Path(__file__).resolve().parents[1]
SERVE_TAG = "dino-feature-service:serve"  # the compose file's image name
UID = 10001

pytestmark = pytest.mark.slow


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the container tests start their own dockerd, which needs root"
    missing = missing_tools()
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install docker.io docker-compose "
        message += "debootstrap; .ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(message)
        return message
    return None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    run_dir = tmp_path_factory.mktemp("docker")
    try:
        eng = Engine(run_dir)
    except EngineError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no private Docker engine can run here: {str(exc)[-500:]}")
    try:
        yield eng
        # Host networking only: the engine never had a bridge network.
        assert eng.networks() == {"host", "none"}
    finally:
        eng.close()
    assert eng.proc.returncode is not None
    assert not Path("/sys/class/net/docker0").exists()
    assert str(run_dir) not in Path("/proc/self/mountinfo").read_text()


@pytest.fixture(autouse=True)
def _remove_containers(engine):
    """Each test leaves no container behind (a failed one is removed too)."""
    yield
    ids = engine.docker("ps", "-aq").stdout.split()
    if ids:
        engine.docker("rm", "-f", *ids)


@pytest.fixture(scope="module")
def serve_image(engine) -> str:
    base = engine.ensure_base()
    engine.docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--target",
        "serve",
        "-t",
        SERVE_TAG,
        str(ROOT),
    )
    engine.docker("image", "prune", "-f")  # the previous build's image, now untagged
    return SERVE_TAG


@pytest.fixture
def model_store(tiny_vit_dir, tmp_path) -> Path:
    """A store holding the freshly exported tiny ViT, readable by the container's user."""
    store = tmp_path / "models"
    shutil.copytree(tiny_vit_dir, store / tiny_vit_dir.name)
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return store


def _data_dir(parent: Path) -> Path:
    data = parent / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    return data


def _run(engine: Engine, image: str, name: str, models: Path, data: Path, *env: str) -> int:
    """Start a serving container with host networking on a free loopback port."""
    port = free_port()
    flags = ["-e", "DINO_HOST=127.0.0.1", "-e", f"DINO_PORT={port}", "-e", "DINO_THREADS=1"]
    for item in env:
        flags += ["-e", item]
    engine.docker(
        "run", "-d", "--name", name, "--network", "host", "--health-interval", "1s", *flags,
        "-v", f"{models}:/app/models:ro", "-v", f"{data}:/app/data", image,
    )  # fmt: skip
    return port


def _wait_ready(engine: Engine, name: str, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        running = engine.docker("inspect", "--format", "{{.State.Running}}", name).stdout
        if running.strip() != "true":
            break
        time.sleep(0.2)
    raise AssertionError(f"{name} not ready:\n{engine.docker('logs', name).stderr}")


def test_serve_image_answers_restarts_with_its_data_and_stops_cleanly(
    engine, serve_image, model_store, tmp_path
):
    data = _data_dir(tmp_path)
    port = _run(engine, serve_image, "serve", model_store, data)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(engine, "serve", url)
    # Its own HEALTHCHECK, probing DINO_PORT (not the image's default 8000).
    assert engine.wait_health("serve") == "healthy"
    assert engine.docker("exec", "serve", "id", "-u").stdout.strip() == str(UID)
    no_torch = engine.docker("exec", "serve", "python", "-c", "import torch", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    blobs = [photo_bytes(i) for i in range(2)]
    embed = httpx.post(f"{url}/embed", files={"images": ("a.jpg", blobs[0])}, timeout=30)
    assert embed.status_code == 200, embed.text
    assert embed.json()["dim"] == 192 and len(embed.json()["embeddings"]) == 1
    attention = httpx.post(f"{url}/attention", files={"image": ("a.jpg", blobs[0])}, timeout=30)
    assert attention.status_code == 200, attention.text
    assert attention.json()["heads"] == 3
    added = httpx.post(
        f"{url}/items",
        files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)],
        data={"ids": ["a", "b"]},
        timeout=30,
    )
    assert added.status_code == 201, added.text

    engine.docker("restart", "serve")
    _wait_ready(engine, "serve", url)
    found = httpx.post(
        f"{url}/similar", files={"image": ("q.jpg", blobs[1])}, data={"k": 2}, timeout=30
    ).json()["results"]
    assert [r["id"] for r in found] == ["b", "a"]
    assert (data / ".lock").stat().st_uid == UID  # written by the container's user

    # uvicorn drains for up to 10 s; docker stop's SIGKILL comes at 10 s.
    started = time.monotonic()
    engine.docker("stop", "serve")
    stopped_in = time.monotonic() - started
    exit_code = engine.docker("inspect", "--format", "{{.State.ExitCode}}", "serve").stdout
    assert stopped_in < 10 and exit_code.strip() in ("0", "143"), (stopped_in, exit_code)
    assert "Application shutdown complete" in engine.docker("logs", "serve").stderr


def _startup_error(engine: Engine, image: str, name: str, models: Path, data: Path, *env: str):
    _run(engine, image, name, models, data, *env)
    exit_code = engine.docker("wait", name, timeout=60).stdout.strip()
    logs = engine.docker("logs", name)
    return exit_code, (logs.stdout + logs.stderr).strip()


def test_misconfigured_containers_say_what_to_do_in_one_line(
    engine, serve_image, model_store, tmp_path
):
    root_data = tmp_path / "root-data"
    root_data.mkdir(mode=0o755)  # as a root-run `mkdir data` leaves it
    closed = tmp_path / "closed-models"
    shutil.copytree(model_store, closed)
    closed.chmod(0o700)
    empty = tmp_path / "empty-models"
    empty.mkdir(mode=0o755)
    data = _data_dir(tmp_path)
    cases = {
        "root-data": (
            model_store,
            root_data,
            [],
            "/app/data (DINO_DATA_DIR) is not writable by uid 10001",
            "chown -R 10001 ./data",
        ),
        "closed": (
            closed,
            data,
            [],
            "/app/models (DINO_MODELS_DIR) is not readable by uid 10001",
            "chmod -R a+rX ./models",
        ),
        "no-model": (empty, data, [], "no model in /app/models", "python -m training.export"),
        "bad-port": (model_store, data, ["DINO_PORT=http"], "DINO_PORT='http'", "1-65535"),
    }
    for name, (models, folder, env, what, fix) in cases.items():
        exit_code, log = _startup_error(engine, serve_image, name, models, folder, *env)
        assert exit_code == "1", (name, log)
        assert len(log.splitlines()) == 1 and log.startswith("cannot start:"), (name, log)
        assert what in log and fix in log, (name, log)


def test_compose_up_with_host_network_is_healthy_and_down_is_clean(
    engine, serve_image, model_store, tmp_path
):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("docker-compose.yml", "docker-compose.host.yml"):
        shutil.copy(ROOT / name, project / name)
    # Only for the test: probe every second instead of every 10 s.
    (project / "fast-health.yml").write_text(
        "services:\n  api:\n    healthcheck:\n      interval: 1s\n"
    )
    shutil.copytree(model_store, project / "models")
    _data_dir(project)
    port = free_port()
    env = {k: v for k, v in engine.env.items() if not k.startswith("DINO_")}
    env["DINO_PORT"] = str(port)
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.host.yml", "-f", "fast-health.yml"]

    def compose(*args: str) -> str:
        result = engine.run_compose(["-p", "dinotest", *files, *args], cwd=project, env=env)
        return result.stdout

    compose("up", "-d", "--no-build")
    try:
        container = compose("ps", "-q", "api").strip()
        assert engine.wait_health(container) == "healthy", engine.docker("logs", container).stderr
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["model"] == "tiny-vit"
    finally:
        compose("down")
    left = engine.docker("ps", "-aq", "--filter", "label=com.docker.compose.project=dinotest")
    assert left.stdout.strip() == ""
    assert engine.networks() == {"host", "none"}


@pytest.mark.skipif(
    os.environ.get("DINO_TEST_TRAIN_IMAGE") != "1",
    reason="builds the train image (several GB of torch): set DINO_TEST_TRAIN_IMAGE=1",
)
def test_train_image_builds_and_imports_training(engine, serve_image):
    tag = "dino-feature-service:train"
    base = engine.ensure_base()
    started = time.monotonic()
    engine.docker(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
        "--target", "train", "-t", tag, str(ROOT), timeout=1800,
    )  # fmt: skip
    print(f"train image built in {time.monotonic() - started:.0f} s")
    probe = "import torch, training.export; print(torch.__version__)"
    result = engine.docker("run", "--rm", "--network", "host", tag, "python", "-c", probe)
    assert result.stdout.strip().startswith("2.")
    user = engine.docker("run", "--rm", "--network", "host", tag, "id", "-u").stdout.strip()
    assert user == str(UID)
    size = engine.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
    print(f"train image: {int(size) / 1e9:.2f} GB")
    engine.docker("rmi", tag)  # several GB: not kept in the cached data root
