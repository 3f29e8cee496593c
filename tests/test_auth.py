"""Client keys on /v1/*, admin keys (or loopback only) on management, open health checks."""

from __future__ import annotations

import httpx2
import openai
import pytest
from asgi_lifespan import LifespanManager

from proxy.app import create_app
from proxy.emulator import Emulator
from tests.helpers import LLAMA, MESSAGES, QWEN, running, serve, settings_for

API_KEY = "sk-client-0123456789"
ADMIN_KEY = "sk-admin-9876543210"
CHAT = {"model": QWEN, "messages": MESSAGES}


async def test_api_keys_guard_the_openai_routes() -> None:
    emulator = Emulator()
    async with running(emulator, auth={"api_keys": [API_KEY, "another-key"]}) as proxy:
        anonymous = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert anonymous.status_code == 401
        error = anonymous.json()["error"]
        assert error["code"] == "invalid_api_key"
        assert "auth.api_keys" in error["message"]
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert anonymous.headers["x-request-id"]
        with pytest.raises(openai.AuthenticationError):  # proxy.sdk sends "sk-test"
            await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        assert emulator.load_count() == 0
        good = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=API_KEY, max_retries=0)
        async with good:
            reply = await good.chat.completions.create(model=QWEN, messages=MESSAGES)
            assert reply.model == QWEN
            assert [m.id async for m in good.models.list()]


async def test_anthropic_clients_may_send_x_api_key() -> None:
    emulator = Emulator()
    async with running(emulator, auth={"api_keys": [API_KEY]}) as proxy:
        body = {"model": LLAMA, "max_tokens": 16, "messages": MESSAGES}
        ok = await proxy.http.post("/v1/messages", json=body, headers={"x-api-key": API_KEY})
        assert ok.status_code == 200
        bad = await proxy.http.post("/v1/messages", json=body, headers={"x-api-key": "nope"})
        assert bad.status_code == 401
        assert bad.json()["type"] == "error"
        assert bad.json()["error"]["type"] == "authentication_error"
        # x-api-key is Anthropic's header only; OpenAI routes want a Bearer key
        chat = await proxy.http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-api-key": API_KEY}
        )
        assert chat.status_code == 401


async def test_admin_keys_guard_management_and_health_stays_open() -> None:
    emulator = Emulator()
    auth = {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]}
    async with running(emulator, auth=auth) as proxy:
        assert (await proxy.http.get("/api/v1/status")).status_code == 401
        client_key = {"authorization": f"Bearer {API_KEY}"}
        assert (await proxy.http.get("/api/v1/status", headers=client_key)).status_code == 401
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        assert (await proxy.http.get("/api/v1/status", headers=admin)).status_code == 200
        load = await proxy.http.post("/api/v1/models/load", json={"model_id": QWEN}, headers=admin)
        assert load.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await proxy.http.get(path)).status_code == 200


async def test_the_root_and_v1_say_where_things_are_without_keys() -> None:
    """`/` sends a browser to the page, and `/v1` answers where the API is, with every key
    set and none sent (they hold no data); what they point to keeps its keys."""
    emulator = Emulator()
    auth = {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]}
    async with running(emulator, auth=auth) as proxy:
        home = await proxy.http.get("/")
        assert (home.status_code, home.headers["location"]) == (307, "/ui/")
        assert (await proxy.http.get("/", follow_redirects=True)).status_code == 200  # the page
        for path in ("/v1", "/v1/"):
            index = await proxy.http.get(path)
            assert index.status_code == 200, path
            body = index.json()
            assert "/v1/chat/completions" in body["message"]
            assert "/ui/" in body["message"]
            assert "POST /v1/chat/completions" in body["endpoints"]
            assert body["page"] == "/ui/"
        assert (await proxy.http.get("/v1/models")).status_code == 401
        assert (await proxy.http.get("/api/v1/status")).status_code == 401


async def test_without_admin_keys_management_answers_loopback_only() -> None:
    """A client from another machine is refused management, not the OpenAI routes."""
    emulator = Emulator()
    async with serve(emulator.app) as upstream_url:
        app = create_app(settings_for(upstream_url))
        async with LifespanManager(app) as manager:
            remote = httpx2.ASGITransport(app=manager.app, client=("192.168.1.50", 50000))
            local = httpx2.ASGITransport(app=manager.app, client=("127.0.0.1", 50000))
            async with (
                httpx2.AsyncClient(transport=remote, base_url="http://proxy") as outside,
                httpx2.AsyncClient(transport=local, base_url="http://proxy") as inside,
            ):
                denied = await outside.get("/api/v1/status")
                assert denied.status_code == 403
                assert "auth.admin_keys" in denied.json()["error"]["message"]
                assert (await outside.post("/api/v1/models/unload", json={})).status_code == 403
                assert (await outside.get("/v1/models")).status_code == 200
                assert (await inside.get("/api/v1/status")).status_code == 200


async def test_secrets_never_appear_in_operator_answers() -> None:
    token = "sk-lm-abcdefgh:abcdefghijklmnopqrst"
    emulator = Emulator(api_token=token)
    auth = {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]}
    async with running(emulator, auth=auth, upstream={"api_token": token}) as proxy:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        client = {"authorization": f"Bearer {API_KEY}"}
        assert (await proxy.http.post("/v1/chat/completions", json=CHAT, headers=client)).is_success
        texts = [
            (await proxy.http.get(path, headers=admin)).text
            for path in ("/api/v1/status", "/api/v1/models", "/metrics", "/readyz")
        ]
        async with proxy.http.stream("GET", "/api/v1/events", headers=admin) as events:
            texts.append(await anext(events.aiter_text()))
        assert texts[0].startswith("{")
        for text in texts:
            for secret in (token, API_KEY, ADMIN_KEY):
                assert secret not in text
