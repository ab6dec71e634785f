"""The ``scale`` compose file: valid, host networking only, replicas on one database URL."""

from __future__ import annotations

import subprocess

import yaml
from live_server import ROOT
from test_containers import _tool

SCALE = ROOT / "docker-compose.scale.yml"


def test_scale_compose_is_valid() -> None:
    result = subprocess.run(
        [_tool("docker-compose"), "-f", SCALE.name, "--profile", "scale", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_is_on_the_host_network_and_replicas_share_one_database() -> None:
    spec = yaml.safe_load(SCALE.read_text())
    assert "networks" not in spec
    services = spec["services"]
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert service.get("profiles") == ["scale"], name
        assert "ports" not in service and "networks" not in service, name
    replicas = [s for n, s in services.items() if n.startswith("api-")]
    assert len(replicas) >= 2
    urls = {s["environment"]["DINO_INDEX_URL"] for s in replicas}
    ports = {s["environment"]["DINO_PORT"] for s in replicas}
    assert len(urls) == 1 and len(ports) == len(replicas)
    upstreams = (ROOT / "deploy" / "nginx-scale.conf").read_text()
    assert all(
        f"127.0.0.1:{port};" in upstreams or f"127.0.0.1:{port} " in upstreams for port in ports
    )
