"""Named keys (docs/design.md §4.4, DESIGN §11.3): model scopes answered before any load, the
models listing filtered, admin named keys, `key_sha256`, names (never keys) in access lines,
and each request's record naming its key and priority."""

from __future__ import annotations

import hashlib
from typing import Any

import anyio
import httpx2
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from proxy.access import RequestIdMiddleware, RequestRecord, record_of
from proxy.auth import AuthMiddleware, credentials
from proxy.config import load_settings
from proxy.emulator import Emulator
from proxy.keys import ANONYMOUS, Caller, caller_of, check_name, new_key
from tests.helpers import (
    LLAMA,
    MESSAGES,
    NOMIC,
    QWEN,
    logging_as_serve_does,
    running,
    serve,
    text_access_lines,
)

QWEN_14B = "qwen2.5-14b-instruct"
ALICE_KEY = "sk-alice-TOPSECRET-1111"
BOB_KEY = "sk-bob-TOPSECRET-2222"
ROOT_KEY = "sk-root-TOPSECRET-3333"
CAROL_KEY = "sk-carol-TOPSECRET-4444"
CAROL_SHA256 = hashlib.sha256(CAROL_KEY.encode()).hexdigest()
KEYS: list[dict[str, Any]] = [
    {"name": "alice", "key": ALICE_KEY, "models": ["qwen*"], "priority": 5},
    {"name": "bob", "key": BOB_KEY, "models": ["small", "qwen2.5-7b*"]},
    {"name": "root", "key": ROOT_KEY, "admin": True},
    {"name": "carol", "key_sha256": CAROL_SHA256.upper(), "models": ["*-instruct"]},
]
ALIASES = {"small": LLAMA, "chat": QWEN, "big": QWEN_14B}
SECTIONS: dict[str, Any] = {"auth": {"keys": KEYS}, "models": {"aliases": ALIASES}}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 4}


async def test_a_model_outside_the_keys_patterns_is_refused_before_any_load() -> None:
    """403 `model_not_allowed` in the route's envelope, and LM Studio never loads it."""
    emulator = Emulator()
    async with running(emulator, **SECTIONS) as proxy:
        refused = await proxy.http.post(
            "/v1/chat/completions", json=chat(LLAMA), headers=bearer(ALICE_KEY)
        )
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "model_not_allowed",
            "model",
            "invalid_request_error",
        )
        assert "'alice'" in error["message"]
        assert LLAMA in error["message"]
        messages = await proxy.http.post(
            "/v1/messages",
            json={"model": LLAMA, "max_tokens": 4, "messages": MESSAGES},
            headers={"x-api-key": ALICE_KEY},
        )
        assert messages.status_code == 403
        assert messages.json()["type"] == "error"
        assert messages.json()["error"]["type"] == "permission_error"
        embeddings = await proxy.http.post(
            "/v1/embeddings", json={"model": NOMIC, "input": "hi"}, headers=bearer(ALICE_KEY)
        )
        assert embeddings.status_code == 403
        assert emulator.load_count() == 0  # nothing was loaded for any of them
        allowed = await proxy.http.post(
            "/v1/chat/completions", json=chat(QWEN), headers=bearer(ALICE_KEY)
        )
        assert allowed.status_code == 200
        assert allowed.json()["model"] == QWEN
        assert emulator.load_count() == emulator.load_count(QWEN) == 1


async def test_the_models_listing_shows_only_what_the_key_may_use() -> None:
    """`GET /v1/models` lists the names the key may use; `/v1/models/{id}` is 404 for the
    others, and an unknown model's 404 suggests none of them."""
    emulator = Emulator()
    async with running(emulator, **SECTIONS) as proxy:
        listed = await proxy.http.get("/v1/models", headers=bearer(ALICE_KEY))
        assert listed.status_code == 200
        names = {model["id"] for model in listed.json()["data"]}
        assert names == {QWEN, QWEN_14B, "chat", "big"}  # the aliases of qwen models too
        everything = await proxy.http.get("/v1/models", headers=bearer(ROOT_KEY))
        assert {model["id"] for model in everything.json()["data"]} == {
            *emulator.catalog,
            *ALIASES,
        }
        one = await proxy.http.get(f"/v1/models/{QWEN}", headers=bearer(ALICE_KEY))
        assert (one.status_code, one.json()["id"]) == (200, QWEN)
        for hidden in (LLAMA, "small", NOMIC):
            other = await proxy.http.get(f"/v1/models/{hidden}", headers=bearer(ALICE_KEY))
            assert other.status_code == 404, hidden
            assert other.json()["error"]["code"] == "model_not_found"
        unknown = await proxy.http.get("/v1/models/llama-3.2-1b", headers=bearer(ALICE_KEY))
        assert unknown.status_code == 404
        assert LLAMA not in unknown.json()["error"]["message"]
        close = await proxy.http.post(
            "/v1/chat/completions", json=chat("llama-3.2-1b"), headers=bearer(ALICE_KEY)
        )
        assert close.status_code == 404
        message = close.json()["error"]["message"]
        assert LLAMA not in message
        assert "small" not in message
        assert QWEN in message  # the known models it may use
        assert emulator.load_count() == 0


async def test_an_alias_is_allowed_by_its_own_name_or_by_its_models() -> None:
    """bob may use `small` (by the alias's name) and `chat` (by its model's key, qwen2.5-7b*),
    but not `small`'s model by its own key, nor `big`, an alias of a model outside his
    patterns."""
    emulator = Emulator()
    async with running(emulator, **SECTIONS) as proxy:
        statuses = {}
        for model in ("small", "chat", QWEN, LLAMA, "big", QWEN_14B):
            response = await proxy.http.post(
                "/v1/chat/completions", json=chat(model), headers=bearer(BOB_KEY)
            )
            statuses[model] = response.status_code
        assert statuses == {
            "small": 200,
            "chat": 200,
            QWEN: 200,
            LLAMA: 403,
            "big": 403,
            QWEN_14B: 403,
        }
        assert emulator.load_count(QWEN_14B) == 0
        listed = await proxy.http.get("/v1/models", headers=bearer(BOB_KEY))
        assert {model["id"] for model in listed.json()["data"]} == {"small", "chat", QWEN}


async def test_a_wildcard_pattern_and_key_sha256() -> None:
    """carol's key is configured by its SHA-256 (in upper case): her key is accepted, others
    are refused; `*-instruct` lets her use every instruct model and nothing else."""
    emulator = Emulator()
    async with running(emulator, **SECTIONS) as proxy:
        listed = await proxy.http.get("/v1/models", headers=bearer(CAROL_KEY))
        assert listed.status_code == 200
        assert {model["id"] for model in listed.json()["data"]} == {
            LLAMA,
            QWEN,
            QWEN_14B,
            *ALIASES,  # each alias's model is an instruct model
        }
        for key in (CAROL_SHA256, CAROL_KEY + "x", CAROL_KEY[:-1], "carol"):
            refused = await proxy.http.get("/v1/models", headers=bearer(key))
            assert refused.status_code == 401, key
        ok = await proxy.http.post(
            "/v1/chat/completions", json=chat(LLAMA), headers=bearer(CAROL_KEY)
        )
        assert ok.status_code == 200
        gemma = await proxy.http.post(
            "/v1/chat/completions", json=chat("google/gemma-3-4b"), headers=bearer(CAROL_KEY)
        )
        assert gemma.status_code == 403
        assert emulator.load_count() == emulator.load_count(LLAMA) == 1


async def test_only_admin_named_keys_may_manage() -> None:
    """A named key with `admin: true` reaches /api/v1/* (and /v1/*); one without gets 403, and
    no key or a wrong one 401."""
    emulator = Emulator()
    async with running(emulator, **SECTIONS) as proxy:
        assert (await proxy.http.get("/api/v1/status", headers=bearer(ROOT_KEY))).status_code == 200
        load = await proxy.http.post(
            "/api/v1/models/load", json={"model_id": QWEN}, headers=bearer(ROOT_KEY)
        )
        assert load.status_code == 200
        denied = await proxy.http.get("/api/v1/status", headers=bearer(ALICE_KEY))
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "forbidden"
        assert "'alice'" in denied.json()["error"]["message"]
        assert (await proxy.http.get("/api/v1/status")).status_code == 401
        wrong = await proxy.http.get("/api/v1/status", headers=bearer("sk-guess"))
        assert wrong.status_code == 401
        as_client = await proxy.http.post(
            "/v1/chat/completions", json=chat(QWEN), headers=bearer(ROOT_KEY)
        )
        assert as_client.status_code == 200
        assert (await proxy.http.get("/v1/models")).status_code == 401  # a key is needed


async def test_access_lines_name_the_key_and_nothing_shows_a_key() -> None:
    """`key=alice` on alice's requests (refusals included), `key=anonymous` without a named key;
    no key, raw or as its SHA-256, in the log, /metrics, status or events."""
    sections: dict[str, Any] = {**SECTIONS, "logging": {"format": "text", "level": "debug"}}
    texts = []
    with logging_as_serve_does(**sections) as captured:
        async with running(Emulator(), **sections) as proxy:
            async with proxy.http.stream(
                "GET", "/api/v1/events", headers=bearer(ROOT_KEY)
            ) as events:
                for request_id, model, key in (
                    ("a-ok", QWEN, ALICE_KEY),
                    ("a-refused", LLAMA, ALICE_KEY),
                    ("c-ok", QWEN, CAROL_KEY),
                    ("nobody", QWEN, "sk-wrong"),
                ):
                    headers = {**bearer(key), "x-request-id": request_id}
                    await proxy.http.post("/v1/chat/completions", json=chat(model), headers=headers)
                with anyio.fail_after(5):
                    async for chunk in events.aiter_text():
                        texts.append(chunk)
                        if "nobody" in chunk:
                            break
            texts += [
                (await proxy.http.get(path, headers=bearer(ROOT_KEY))).text
                for path in ("/metrics", "/api/v1/status", "/api/v1/models")
            ]
    lines = {line["request_id"]: line for line in text_access_lines(captured)}
    assert (lines["a-ok"]["key"], lines["a-ok"]["status"]) == ("alice", "200")
    assert (lines["a-refused"]["key"], lines["a-refused"]["status"]) == ("alice", "403")
    assert lines["a-refused"]["model"] == LLAMA
    assert lines["c-ok"]["key"] == "carol"
    assert (lines["nobody"]["key"], lines["nobody"]["status"]) == (ANONYMOUS, "401")
    assert '"key": "alice"' in "".join(texts)  # the request events carry the name
    everything = "\n".join([*captured.lines, *texts])
    for key in (ALICE_KEY, BOB_KEY, ROOT_KEY, CAROL_KEY, "sk-wrong"):
        for form in (key, hashlib.sha256(key.encode()).hexdigest()):
            assert form not in everything
            assert form.upper() not in everything


async def test_the_record_names_the_key_and_its_priority() -> None:
    """The auth middleware leaves the caller on the scope and its name and priority on the
    request's record, for the scheduler and the usage counts."""
    settings = load_settings(
        auth={"keys": KEYS, "api_keys": ["sk-plain"], "admin_keys": ["sk-plain", "sk-admin"]}
    )
    seen: list[tuple[Caller, str, int]] = []
    finished: list[RequestRecord] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan: nothing to set up
            return
        record = record_of(scope)
        seen.append((caller_of(scope), record.key, record.priority))
        await PlainTextResponse("ok")(scope, receive, send)

    app = RequestIdMiddleware(
        AuthMiddleware(inner, keys=credentials(settings.auth)), log=finished.append
    )
    async with serve(app) as url, httpx2.AsyncClient(base_url=url) as http:
        for key in (ALICE_KEY, "sk-plain", ROOT_KEY):
            assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200
        assert (await http.get("/api/v1/status", headers=bearer("sk-plain"))).status_code == 200
    assert [(caller.name, name, priority) for caller, name, priority in seen] == [
        ("alice", "alice", 5),
        (ANONYMOUS, ANONYMOUS, 0),
        ("root", "root", 0),
        (ANONYMOUS, ANONYMOUS, 0),
    ]
    alice, plain, root, plain_admin = (caller for caller, _, _ in seen)
    assert alice.models == ("qwen*",)
    assert (plain.client, plain.admin) == (True, True)  # in both unnamed lists: both rights
    assert (root.client, root.admin) == (True, True)
    assert plain_admin == plain
    assert [record.key for record in finished] == ["alice", ANONYMOUS, "root", ANONYMOUS]
    # One entry per distinct key: a key in both unnamed lists is checked once.
    assert len(credentials(settings.auth)) == len(KEYS) + 2


def test_names_and_new_keys() -> None:
    assert check_name("nightly-batch_2") is None
    for bad in ("", "Alice", "a" * 33, "a b", ANONYMOUS):
        assert check_name(bad) is not None, bad
    first, second = new_key(), new_key()
    assert first != second
    assert first.startswith("sk-lmswitch-")
    assert len(first) >= len("sk-lmswitch-") + 43  # 32 random bytes, base64url


@pytest.mark.parametrize(
    ("patterns", "name", "key", "allowed"),
    [
        (("*",), "anything", "anything", True),
        (("qwen*",), "qwen2.5-7b-instruct", "qwen2.5-7b-instruct", True),
        (("qwen*",), "chat", "qwen2.5-7b-instruct", True),  # an alias, by its model
        (("chat",), "chat", "qwen2.5-7b-instruct", True),  # an alias, by its own name
        (("chat",), "qwen2.5-7b-instruct", "qwen2.5-7b-instruct", False),
        (("qwen*",), "QWEN2.5-7B-INSTRUCT", "qwen2.5-7b-instruct", True),  # resolved by case
        (("google/*",), "google/gemma-3-4b", "google/gemma-3-4b", True),
        (("qwen2.5-?b-instruct",), "qwen2.5-14b-instruct", "qwen2.5-14b-instruct", False),
        ((), "qwen2.5-7b-instruct", "qwen2.5-7b-instruct", False),
    ],
)
def test_patterns_match_the_name_used_or_the_model_key(
    patterns: tuple[str, ...], name: str, key: str, allowed: bool
) -> None:
    assert Caller("alice", models=patterns).may_use(name, key) is allowed
