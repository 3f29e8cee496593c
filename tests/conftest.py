"""pytest's hooks and shared fixtures: the soak options, the asyncio backend, a clean
environment. The shared helpers (servers, the proxy, ports) are in tests/helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-minutes",
        type=float,
        default=0.75,
        help="how long tests/test_soak.py drives load and faults (default 0.75: about a minute)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run for --soak-minutes: their timeout follows (plus set-up and checks)."""
    minutes: float = config.getoption("--soak-minutes")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(minutes * 60 + 120))


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn.Server is asyncio-only, as in uvicorn's own test suite.
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Tests never see the developer's LMSWITCH_* variables."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("LMSWITCH_")}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("LMSWITCH_")]:
        del os.environ[key]
    os.environ.update(saved)
