"""A private Docker engine for the container tests: its own dockerd, socket and data root, with
no bridge network, and a Python base image built from Debian's archive (no registry needed).

Every build uses ``--network host`` and every container host networking: the engine never creates
a bridge or a docker0 link, and the test servers bind 127.0.0.1 on free ports.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# The data root persists between runs so the base image (and the build cache) is built once.
DATA_ROOT = Path(os.environ.get("DINO_TEST_DOCKER_ROOT", "/var/cache/dino-feature-service/docker"))
BASE_TAG = "dino-test/python:3.11-bookworm"
DEBIAN_MIRROR = os.environ.get("DINO_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TOOLS = ("dockerd", "docker", "docker-compose", "debootstrap")

# Debian's python3 is 3.11 in bookworm; a venv first on PATH gives `pip` and `python` as in the
# python:3.11-slim image the Dockerfile names by default. The host's CA bundle lets pip reach the
# package index through a TLS-inspecting proxy, where there is one.
BASE_DOCKERFILE = """\
FROM dino-test/debian:bookworm-minbase
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
       python3 python3-venv ca-certificates \\
    && rm -rf /var/lib/apt/lists/* \\
    && python3 -m venv /opt/venv
COPY ca-certificates.crt /etc/ssl/certs/host-ca.crt
ENV PATH=/opt/venv/bin:$PATH PIP_CERT=/etc/ssl/certs/host-ca.crt
"""


def missing_tools() -> list[str]:
    return [name for name in TOOLS if shutil.which(name) is None]


def remove_docker0() -> None:
    """A docker0 link left by another engine: this one must not inherit or create one."""
    if Path("/sys/class/net/docker0").exists():
        subprocess.run(["ip", "link", "delete", "docker0"], check=False, capture_output=True)


class EngineError(RuntimeError):
    """dockerd did not come up (e.g. no overlay2 or no privileges in this environment)."""


class Engine:
    """``dockerd`` on a private socket; ``docker(...)`` runs the CLI against it."""

    def __init__(self, run_dir: Path) -> None:
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        # One engine per data root at a time: a second test run waits here.
        self._lock = open(DATA_ROOT.parent / f"{DATA_ROOT.name}.lock", "w")  # noqa: SIM115
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        remove_docker0()
        self.socket = run_dir / "docker.sock"
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "0",  # the classic builder: no frontend image to pull
            "COMPOSE_DOCKER_CLI_BUILD": "0",
        }
        self.log = run_dir / "dockerd.log"
        command = [
            "dockerd",
            "--host",
            f"unix://{self.socket}",
            "--data-root",
            str(DATA_ROOT),
            "--exec-root",
            str(run_dir / "exec"),
            "--pidfile",
            str(run_dir / "dockerd.pid"),
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--storage-driver=overlay2",
        ]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True)
        try:
            self._wait_up()
            leftovers = self.docker("ps", "-aq").stdout.split()  # from a run that was killed
            if leftovers:
                self.docker("rm", "-f", *leftovers)
        except BaseException:
            self.close()
            raise

    def _wait_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"dockerd exited:\n{self.log.read_text()[-3000:]}")
            if self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise EngineError(f"dockerd not up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600, **kw
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {result.stdout}\n{result.stderr}")
        return result

    def run_compose(
        self, args: list[str], cwd: Path, env: dict[str, str]
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker-compose", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)}: {result.stdout}\n{result.stderr}"
            )
        return result

    def networks(self) -> set[str]:
        return set(self.docker("network", "ls", "--format", "{{.Name}}").stdout.split())

    def close(self) -> None:
        """Remove this run's containers, stop dockerd (and its containerd) by PID, drop docker0."""
        try:
            if self.proc.poll() is None:
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False)
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        finally:
            self._unmount_leftovers()
            remove_docker0()
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its network namespace file mounted under the exec root."""
        exec_root = str(self.socket.parent / "exec")
        with open("/proc/self/mountinfo") as info:
            points = [line.split()[4] for line in info]
        for point in reversed([p for p in points if p.startswith(exec_root + "/")]):
            subprocess.run(["umount", point], check=False, capture_output=True)

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    def ensure_base(self) -> str:
        """The Python base image, from Debian's archive on the first run, cached after."""
        if self.has_image(BASE_TAG):
            return BASE_TAG
        with tempfile.TemporaryDirectory(dir=DATA_ROOT.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
                check=True,
                capture_output=True,
                timeout=900,
            )
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            self.docker("import", "-", "dino-test/debian:bookworm-minbase", stdin=tar.stdout)
            tar.wait()
            context = Path(tmp) / "context"
            context.mkdir()
            (context / "Dockerfile").write_text(BASE_DOCKERFILE)
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", context / "ca-certificates.crt")
            self.docker("build", "--network", "host", "-t", BASE_TAG, str(context))
        return BASE_TAG

    def wait_health(self, container: str, timeout: float = 60.0) -> str:
        """The container's health status once it is no longer `starting` (or at the timeout)."""
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            status = self.docker(
                "inspect", "--format", "{{.State.Health.Status}}", container
            ).stdout.strip()
            if status != "starting":
                return status
            time.sleep(0.5)
        return status
