"""compose.yaml, checked without a Docker engine: Compose accepts it, every file it mounts exists,
Prometheus accepts its configuration, and Grafana's provisioning names the shipped dashboard and
the Prometheus service."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import pytest
import yaml

from proxy.config import load_settings
from proxy.emulator import Emulator
from tests.helpers import readme_block, running

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


def _environment(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """A command's leading `NAME=value` words, and the command after them."""
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def test_the_readme_starts_the_stack_with_the_keys_compose_reads() -> None:
    """The README's one command sets exactly the variables compose.yaml reads (lmswitch's keys)
    and builds and starts the stack."""
    env, command = _environment(shlex.split(readme_block("compose")))
    assert command == ["docker", "compose", "up", "-d", "--build"]
    read = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text(encoding="utf-8")))
    assert set(env) == read == {"LMSWITCH_API_KEY", "LMSWITCH_ADMIN_KEY"}
    lmswitch = service("lmswitch")["environment"]
    assert env["LMSWITCH_API_KEY"] in lmswitch["LMSWITCH_AUTH__API_KEYS"]  # its default too


async def test_open_webui_as_the_readme_starts_it_reaches_lmswitch() -> None:
    """The README's Open WebUI command: valid shell, an OpenAI connection to lmswitch's `/v1` on
    the port lmswitch publishes, with the key the Docker example and compose give lmswitch. That
    connection (the Docker host's name swapped for loopback) lists the models through lmswitch."""
    block = readme_block("open-webui")
    bash = shutil.which("bash")
    assert bash is not None
    checked = await anyio.run_process([bash, "-n", "-c", block], check=False)
    assert checked.returncode == 0, checked.stderr
    words = shlex.split(block.replace("\\\n", " "))  # the lines continued
    env = dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-e")
    assert words[:3] == ["docker", "run", "-d"]
    assert "--add-host=host.docker.internal:host-gateway" in words
    assert env["ENABLE_OLLAMA_API"] == "false"
    base_url, key = env["OPENAI_API_BASE_URL"], env["OPENAI_API_KEY"]
    assert base_url == "http://host.docker.internal:8000/v1"
    assert "8000:8000" in service("lmswitch")["ports"][0]
    assert f"LMSWITCH_AUTH__API_KEYS='[\"{key}\"]'" in readme_block("docker")
    async with running(Emulator(), auth={"api_keys": [key]}) as proxy:
        sdk_url = base_url.replace("http://host.docker.internal:8000", proxy.url)
        response = await proxy.http.get(
            sdk_url.removeprefix(proxy.url) + "/models", headers={"authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200
        assert "qwen2.5-7b-instruct" in {model["id"] for model in response.json()["data"]}
