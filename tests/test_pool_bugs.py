"""Bugs the pool of hosts had, each pinned by the smallest test that showed it."""

from __future__ import annotations

import anyio

from proxy.emulator import Emulator
from proxy.emulator.catalog import DEFAULT_CATALOG
from proxy.placement import HostView, Placement, Presence, Where, place
from proxy.server import free_port
from tests.helpers import MESSAGES, proxy_for, serve

GEMMA = "google/gemma-3-4b"


def _host(name: str, *, up: bool, has: bool, presence: Presence = Presence.ABSENT) -> HostView:
    return HostView(
        name=name,
        up=up,
        has=has,
        presence=presence,
        in_flight=0,
        fits=True,
        room=2**40,
        idle_victims_used=None,
        never=False,
        waiting=0,
    )


def test_a_model_only_down_hosts_have_is_placed_on_one_of_them() -> None:
    """The soak (two hosts, one away): a model only the host away had, not loaded there, was
    placed nowhere, so the pool queued it on its first host, which does not have it."""
    hosts = [_host("a", up=True, has=False), _host("b", up=False, has=True)]
    assert place(hosts) == Placement("b", Where.DOWN)
    ready = _host("c", up=False, has=True, presence=Presence.READY)
    assert place([*hosts, ready]) == Placement("c", Where.DOWN)  # ready there: tried first
    assert place([_host("a", up=True, has=False)]) is None  # no host has it


async def test_a_model_only_a_host_that_is_down_has_is_503_not_loaded_on_another() -> None:
    """Host b alone has Gemma, and goes away with it unloaded: a request for Gemma is 503
    upstream_unavailable, and host a's LM Studio is never asked to load a model it lacks (it
    answered 404, the client got 503 model_load_failed; a full host would have evicted an idle
    model first)."""
    a = Emulator(catalog=[m for m in DEFAULT_CATALOG if m.key != GEMMA])
    b = Emulator(catalog=DEFAULT_CATALOG)
    b_url = f"http://127.0.0.1:{free_port()}"
    upstream = {"poll_interval": 0.1}
    async with serve(a.app) as a_url:
        upstreams = [{"name": "a", "base_url": a_url}, {"name": "b", "base_url": b_url}]
        async with proxy_for(a_url, upstreams=upstreams, upstream=upstream) as proxy:
            async with serve(b.app, port=int(b_url.rsplit(":", 1)[1])):
                await proxy.wait_for(lambda s: all(row["up"] for row in s["upstreams"]))
            await proxy.wait_for(lambda s: not s["upstreams"][1]["up"])
            with anyio.fail_after(5):
                response = await proxy.http.post(
                    "/v1/chat/completions", json={"model": GEMMA, "messages": MESSAGES}
                )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert "retry-after" in response.headers
    assert a.load_count() == 0
