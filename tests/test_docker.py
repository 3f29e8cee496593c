"""The Dockerfile, checked without a Docker engine: it parses, pins its bases, runs as a user,
copies only what exists, runs a real `lmswitch` command, and its health check works."""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import pytest
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped] # no type hints

from proxy import cli
from proxy.config import CONFIG_ENV_VAR, ConfigError, Settings, load_settings
from proxy.emulator import Emulator
from proxy.server import free_port
from tests.helpers import readme, readme_block, running

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = "/etc/lmswitch/config.yaml"


def dockerfile() -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((ROOT / "Dockerfile").read_bytes()))


def instructions(stage: str = "all") -> list[tuple[str, str]]:
    """(instruction, value) pairs, comments left out; `stage="final"`: after the last FROM."""
    pairs = [
        (item["instruction"], item["value"])
        for item in dockerfile().structure
        if item["instruction"] != "COMMENT"
    ]
    if stage == "final":
        last_from = max(i for i, (name, _) in enumerate(pairs) if name == "FROM")
        pairs = pairs[last_from:]
    return pairs


def values(name: str, stage: str = "all") -> list[str]:
    return [value for instruction, value in instructions(stage) if instruction == name]


def exec_form(value: str) -> list[str]:
    """An instruction's JSON (exec form) argument list."""
    parsed: Any = json.loads(value)
    assert isinstance(parsed, list), value
    assert all(isinstance(arg, str) for arg in parsed), value
    return [str(arg) for arg in parsed]


def test_dockerfile_parses_into_a_build_and_a_runtime_stage() -> None:
    parsed = dockerfile()
    assert parsed.is_multistage
    assert [name for name, _ in instructions()].count("FROM") >= 2
    assert values("EXPOSE", "final") == ["8000"]


def unpinned(bases: list[str]) -> list[str]:
    """The FROM values whose image is pinned neither by digest nor by a version tag."""
    stages: set[str] = set()
    found = []
    for value in bases:
        image, *alias = value.split()
        if alias:
            stages.add(alias[-1])
        if image in stages or "@sha256:" in image:
            continue  # an earlier stage of this file, or a digest
        name, _, tag = image.rpartition(":")
        if not name or "/" in tag or not re.search(r"\d", tag) or "latest" in tag:
            found.append(image)
    return found


def test_unpinned_finds_bare_names_and_latest() -> None:
    bases = ["python:3.12-slim AS build", "build", "debian@sha256:abc", "python", "uv:latest"]
    assert unpinned(bases) == ["python", "uv:latest"]
    assert unpinned(["host:5000/python"]) == ["host:5000/python"]


def test_base_images_are_pinned() -> None:
    """Every base is pinned by digest or by a version tag (never a bare name or `latest`)."""
    assert unpinned(values("FROM")) == []


def test_runs_as_a_user_it_creates_not_root() -> None:
    (user,) = values("USER", "final")
    name = user.split(":")[0]
    assert name not in ("root", "0")
    assert any("useradd" in run and name in run for run in values("RUN", "final"))


def test_dependencies_come_from_the_lock_without_dev_tools() -> None:
    runs = values("RUN")
    assert any(re.search(r"\buv sync --locked --no-dev\b", run) for run in runs)
    assert not any("pip install" in run for run in runs)


def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _matches(path: str, pattern: str) -> bool:
    """Whether `pattern` (Docker's syntax, roughly) matches `path` or one of its parents."""
    pattern = pattern.rstrip("/")
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if pattern.startswith("**/"):
        tails = [
            "/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)
        ]
        return any(fnmatch(tail, pattern[3:]) for tail in tails)
    return any(fnmatch(candidate, pattern) for candidate in candidates)


def dockerignored(path: str) -> bool:
    """Whether `.dockerignore` keeps `path` (relative to the repository) out of the build."""
    ignored = False
    for pattern in _ignore_patterns():
        negated = pattern.startswith("!")
        if _matches(path, pattern.removeprefix("!")):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_out_what_the_image_does_not_need() -> None:
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_docker.py",
        "proxy/__pycache__/a.pyc",
        "docs/design.md",
    ):
        assert dockerignored(path), path
    assert not dockerignored("proxy/ui/index.html")


def _copied_sources() -> Iterator[str]:
    for value in values("COPY") + values("ADD"):
        args = shlex.split(value)
        if any(arg.startswith("--from") for arg in args):
            continue  # from another stage or image
        yield from (arg for arg in args[:-1] if not arg.startswith("--"))


def test_every_copied_file_exists_and_reaches_the_build() -> None:
    sources = list(_copied_sources())
    assert {"pyproject.toml", "uv.lock", "proxy", "config.yaml"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_command_is_lmswitch_serve_on_all_interfaces() -> None:
    """The entry point is the console script and the command a real `serve` invocation."""
    (entrypoint,) = values("ENTRYPOINT", "final")
    (cmd,) = values("CMD", "final")
    program, *args = exec_form(entrypoint) + exec_form(cmd)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts
    parsed = cli._parser().parse_args(args)  # the CLI's own parser
    assert parsed.command == "serve"
    assert parsed.host == "0.0.0.0"
    assert str(parsed.port) == values("EXPOSE", "final")[0]


def test_config_is_read_from_its_documented_path() -> None:
    assert dockerfile().envs[CONFIG_ENV_VAR] == CONFIG_PATH
    assert f"config.yaml {CONFIG_PATH}" in values("COPY", "final")
    assert CONFIG_PATH in readme()


def healthcheck_code() -> str:
    (value,) = values("HEALTHCHECK", "final")
    options, command = value.split("CMD", 1)
    assert "--timeout" in options
    program, flag, code = exec_form(command.strip())
    assert (program, flag) == ("python", "-c")
    assert "urllib" in code
    assert "/healthz" in code
    return code


async def test_healthcheck_passes_on_a_running_proxy_and_fails_without_one() -> None:
    code = healthcheck_code()
    assert "127.0.0.1:8000" in code
    async with running(Emulator()) as proxy:
        url = proxy.url.removeprefix("http://")
        with anyio.fail_after(10):
            up = await anyio.run_process(
                [sys.executable, "-c", code.replace("127.0.0.1:8000", url)]
            )
    assert up.returncode == 0
    closed = code.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}")
    with anyio.fail_after(10):
        down = await anyio.run_process([sys.executable, "-c", closed], check=False)
    assert down.returncode != 0


def _container_settings() -> Settings:
    """The settings `serve` would start with in the container, from this environment."""
    (cmd,) = values("CMD", "final")
    args = cli._parser().parse_args(exec_form(cmd))  # the CLI's own parser
    return load_settings(ROOT / "config.yaml", server={"host": args.host, "port": args.port})


def test_readme_docker_run_starts_serve_with_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's `docker run` reaches the host's LM Studio, and its variables make settings
    that `serve` accepts on 0.0.0.0; without its keys `serve` refuses, unless told not to."""
    block = readme_block("docker")
    build, run = (shlex.split(line) for line in block.replace("\\\n", " ").splitlines())
    image = build[build.index("-t") + 1]
    assert run[-1] == image
    assert run[run.index("-p") + 1] == f"8000:{values('EXPOSE', 'final')[0]}"
    assert "--add-host=host.docker.internal:host-gateway" in run
    env = dict(run[i + 1].split("=", 1) for i, arg in enumerate(run) if arg == "-e")
    assert env["LMSWITCH_UPSTREAM__BASE_URL"].startswith("http://host.docker.internal:")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = _container_settings()
    cli.refuse_open_proxy(settings)
    assert settings.upstream.base_url == env["LMSWITCH_UPSTREAM__BASE_URL"]
    assert settings.auth.admin_keys  # the host reaches /api/v1/* from Docker's network
    monkeypatch.delenv("LMSWITCH_AUTH__API_KEYS")
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        cli.refuse_open_proxy(_container_settings())
    monkeypatch.setenv("LMSWITCH_AUTH__ALLOW_UNAUTHENTICATED", "true")  # as the README says
    assert "LMSWITCH_AUTH__ALLOW_UNAUTHENTICATED=true" in readme()
    cli.refuse_open_proxy(_container_settings())
