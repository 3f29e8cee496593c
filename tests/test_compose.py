"""compose.yaml, checked without a Docker engine: Compose accepts it, every file it mounts exists,
Prometheus accepts its configuration, and Grafana's provisioning names the shipped dashboard and
the Prometheus service."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def mounts(name: str) -> dict[str, str]:
    """A service's bind mounts from the repository: container path -> host path."""
    found = {}
    for volume in service(name).get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            found[target] = source
    return found


def test_docker_compose_accepts_the_file() -> None:
    """Debian's `docker-compose` validates the file (and resolves it) with no Docker engine."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (Debian's package docker-compose)")
    checked = subprocess.run(  # noqa: S603 - a fixed command
        [tool, "--file", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_every_service_has_a_health_check_and_data_lives_in_named_volumes() -> None:
    doc = compose()
    assert set(doc["services"]) == {"lmswitch", "prometheus", "grafana"}
    for name, spec in doc["services"].items():
        assert spec["healthcheck"]["test"][0] == "CMD", name
    named = set(doc["volumes"])
    assert named == {"prometheus-data", "grafana-data"}
    assert "prometheus-data:/prometheus" in service("prometheus")["volumes"]
    assert "grafana-data:/var/lib/grafana" in service("grafana")["volumes"]


def test_every_mounted_file_exists() -> None:
    for name in compose()["services"]:
        for source in mounts(name).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    assert service("lmswitch")["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_lmswitch_reaches_lm_studio_on_the_host() -> None:
    """The mounted config points at the host's LM Studio, which `extra_hosts` names on Linux;
    the health check is the Dockerfile's own."""
    lmswitch = service("lmswitch")
    assert "host.docker.internal:host-gateway" in lmswitch["extra_hosts"]
    config = mounts("lmswitch")["/etc/lmswitch/config.yaml"]
    settings = load_settings(ROOT / config)
    assert settings.upstream.base_url.startswith("http://host.docker.internal:1234")
    assert {"LMSWITCH_AUTH__API_KEYS", "LMSWITCH_AUTH__ADMIN_KEYS"} <= lmswitch[
        "environment"
    ].keys()
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert json.dumps(lmswitch["healthcheck"]["test"][1:]) in dockerfile  # after its CMD


def test_prometheus_scrapes_lmswitch_as_the_docs_say(tmp_path: Path) -> None:
    """The scrape job is docs/metrics.md's, aimed at the service; promtool accepts the file."""
    config_path = ROOT / mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    job = yaml.safe_load(config_path.read_text(encoding="utf-8"))["scrape_configs"][0]
    assert job["static_configs"] == [{"targets": ["lmswitch:8000"]}]
    docs = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    example = docs.split("<!-- example: prometheus -->\n```yaml\n", 1)[1].split("```", 1)[0]
    documented = yaml.safe_load(example)["scrape_configs"][0]
    assert {k: v for k, v in job.items() if k != "static_configs"} == {
        k: v for k, v in documented.items() if k != "static_configs"
    }
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's package prometheus)")
    checked = subprocess.run(  # noqa: S603 - a fixed command
        [promtool, "check", "config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grafana_provisions_the_dashboard_and_the_data_source() -> None:
    """The provisioning files parse; the data source is the Prometheus service, and the
    dashboard provider's path is where compose.yaml mounts the folder holding lmswitch.json."""
    grafana = mounts("grafana")
    provisioning = ROOT / grafana["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    assert "127.0.0.1:9090:9090" in service("prometheus")["ports"]

    providers = yaml.safe_load((provisioning / "dashboards" / "lmswitch.yaml").read_text())
    (provider,) = providers["providers"]
    inside = PurePosixPath(provider["options"]["path"])
    on_host = next(
        ROOT / source / inside.relative_to(target)
        for target, source in grafana.items()
        if inside.is_relative_to(target)
    )
    assert (on_host / "lmswitch.json").is_file()
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home) == inside / "lmswitch.json"
