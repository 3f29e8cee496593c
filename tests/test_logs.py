"""Access logs (docs/design.md §4.3) as `serve` writes them, in text and JSON, and keys kept
out of them; what the log says while LM Studio is away, and when it is back."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import anyio
import httpx2
import pytest

from proxy import bodies
from proxy.emulator import Emulator
from proxy.errors import ProxyError, UpstreamError, UpstreamUnavailableError
from proxy.events import EventBus
from proxy.metrics import Metrics
from proxy.reporter import UNREADABLE_REPEAT_S, Reporter
from proxy.server import free_port
from tests.helpers import (
    MESSAGES,
    QWEN,
    Captured,
    Proxy,
    json_access_lines,
    logging_as_serve_does,
    pool_for,
    proxy_for,
    running,
    serve,
    text_access_lines,
)

CHAT = "/v1/chat/completions"
ACCESS_FIELDS = {
    "request_id",
    "model",
    "endpoint",
    "key",
    "status",
    "duration_ms",
    "queue_wait_ms",
    "waited_on_load",
    "bytes_out",
}
API_KEY = "sk-client-TOPSECRET-4242"
OTHER_API_KEY = "sk-client-ALSOSECRET-1717"
ADMIN_KEY = "sk-admin-TOPSECRET-5353"
UPSTREAM_TOKEN = "lm-token-TOPSECRET-6464"
WRONG_KEY = "sk-wrong-GUESSED-7878"
SECRETS = (API_KEY, OTHER_API_KEY, ADMIN_KEY, UPSTREAM_TOKEN, WRONG_KEY)

JSON_TYPE = {"content-type": "application/json"}


async def _two_requests(http: httpx2.AsyncClient, tag: str) -> tuple[httpx2.Response, ...]:
    """One request that loads the model, one that finds it loaded."""
    body = {"model": QWEN, "messages": MESSAGES}
    first = await http.post(CHAT, json=body, headers={"x-request-id": f"{tag}-1"})
    second = await http.post(CHAT, json=body, headers={"x-request-id": f"{tag}-2"})
    assert first.status_code == second.status_code == 200
    return first, second


async def test_text_access_line_per_request() -> None:
    """`format: text`: one `key=value` line per request, with every field of docs/design.md §4.3."""
    text: dict[str, Any] = {"logging": {"format": "text"}}
    with logging_as_serve_does(**text) as captured:
        async with running(Emulator(load_delay_s=0.1), **text) as proxy:
            first, second = await _two_requests(proxy.http, "text")
            unknown = await proxy.http.post(
                CHAT, json={"model": "nope", "messages": MESSAGES}, headers={"x-request-id": "t-3"}
            )
            assert unknown.status_code == 404
    lines = {line["request_id"]: line for line in text_access_lines(captured)}
    assert sorted(lines) == ["t-3", "text-1", "text-2"]
    for line in lines.values():
        assert set(line) >= ACCESS_FIELDS
        assert line["endpoint"] == CHAT
        assert float(line["duration_ms"]) >= 0  # the 404 may take under the 0.1 ms shown
        assert float(line["queue_wait_ms"]) >= 0
    assert lines["text-1"]["model"] == lines["text-2"]["model"] == QWEN
    assert lines["text-1"]["status"] == lines["text-2"]["status"] == "200"
    assert lines["text-1"]["waited_on_load"] == "True"
    assert float(lines["text-1"]["queue_wait_ms"]) >= 50  # the load took 0.1 s
    assert float(lines["text-1"]["duration_ms"]) >= 50
    assert lines["text-2"]["waited_on_load"] == "False"
    assert lines["text-1"]["bytes_out"] == str(len(first.content))
    assert lines["text-2"]["bytes_out"] == str(len(second.content))
    assert lines["t-3"]["model"] == "unknown"
    assert lines["t-3"]["status"] == "404"


async def test_json_access_line_per_request() -> None:
    """`format: json`: every line is a JSON object; access lines carry docs/design.md §4.3's
    fields."""
    as_json: dict[str, Any] = {"logging": {"format": "json"}}
    with logging_as_serve_does(**as_json) as captured:
        async with running(Emulator(load_delay_s=0.1), **as_json) as proxy:
            first, second = await _two_requests(proxy.http, "json")
    lines = {line["request_id"]: line for line in json_access_lines(captured)}
    assert sorted(lines) == ["json-1", "json-2"]
    for line, response in ((lines["json-1"], first), (lines["json-2"], second)):
        assert set(line) >= ACCESS_FIELDS
        assert line["level"] == "info"
        assert line["model"] == QWEN
        assert line["endpoint"] == CHAT
        assert line["status"] == 200
        assert line["duration_ms"] >= 0
        assert line["bytes_out"] == len(response.content)
    assert lines["json-1"]["waited_on_load"] is True
    assert lines["json-1"]["queue_wait_ms"] >= 50
    assert lines["json-1"]["duration_ms"] >= 50
    assert lines["json-2"]["waited_on_load"] is False
    # Lines other than access lines (model loads, ...) are JSON objects too.
    assert any(obj["logger"] == "lmswitch.manager" for obj in map(json.loads, captured.lines))


@pytest.mark.parametrize(
    "request_id",
    ['x status=500 model=gpt-4 "quoted"', "x\tstatus=500", "ok-id_1.2:3/4+5=6"],
    ids=["spaces", "tab", "plain"],
)
async def test_client_request_id_cannot_forge_fields_in_a_text_line(request_id: str) -> None:
    """A client's request id is logged as one value (kept, or replaced by the proxy's own)."""
    text: dict[str, Any] = {"logging": {"format": "text"}}
    with logging_as_serve_does(**text) as captured:
        async with running(Emulator(), **text) as proxy:
            response = await proxy.http.post(
                CHAT,
                json={"model": QWEN, "messages": MESSAGES},
                headers={"x-request-id": request_id},
            )
            assert response.status_code == 200
    (line,) = text_access_lines(captured)  # one line, each field once
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["status"] == "200"
    assert line["model"] == QWEN
    if request_id == "ok-id_1.2:3/4+5=6":
        assert line["request_id"] == request_id


async def test_refused_requests_get_an_access_line() -> None:
    """A request refused for its key is a request too: one access line, status 401."""
    sections: dict[str, Any] = {"auth": {"api_keys": [API_KEY]}, "logging": {"format": "json"}}
    with logging_as_serve_does(**sections) as captured:
        async with running(Emulator(), **sections) as proxy:
            for request_id, key in (("no-key", None), ("wrong-key", WRONG_KEY)):
                headers = {"x-request-id": request_id}
                if key is not None:
                    headers["authorization"] = f"Bearer {key}"
                body = {"model": QWEN, "messages": MESSAGES}
                response = await proxy.http.post(CHAT, json=body, headers=headers)
                assert response.status_code == 401
    lines = {line["request_id"]: line for line in json_access_lines(captured)}
    assert sorted(lines) == ["no-key", "wrong-key"]
    for line in lines.values():
        assert line["status"] == 401
        assert line["endpoint"] == CHAT
        assert line["model"] == "unknown"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_keys_never_reach_the_logs(log_format: str) -> None:
    """Client keys (right or wrong), admin keys and LM Studio's token appear in no log record."""
    sections: dict[str, Any] = {
        "auth": {"api_keys": [API_KEY, OTHER_API_KEY], "admin_keys": [ADMIN_KEY]},
        "upstream": {"api_token": UPSTREAM_TOKEN},
        "logging": {"format": log_format, "level": "debug"},
    }
    body = {"model": QWEN, "messages": MESSAGES}
    emulator = Emulator(api_token=UPSTREAM_TOKEN)
    with logging_as_serve_does(**sections) as captured:
        async with running(emulator, **sections) as proxy:
            for key in (API_KEY, OTHER_API_KEY):
                ok = await proxy.http.post(
                    CHAT, json=body, headers={"authorization": f"Bearer {key}"}
                )
                assert ok.status_code == 200
            for headers in (
                {"authorization": f"Bearer {WRONG_KEY}"},
                {"authorization": WRONG_KEY},
                {"x-api-key": WRONG_KEY},
                {},
            ):
                refused = await proxy.http.post(CHAT, json=body, headers=headers)
                assert refused.status_code == 401
            anthropic = {"model": QWEN, "max_tokens": 8, "messages": MESSAGES}
            messages = await proxy.http.post(
                "/v1/messages", json=anthropic, headers={"x-api-key": API_KEY}
            )
            assert messages.status_code == 200
            bad_body = await proxy.http.post(
                CHAT,
                content=API_KEY.encode(),  # a key pasted into the body: quoted in no log line
                headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
            )
            assert bad_body.status_code == 400
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            assert (await proxy.http.get("/api/v1/status", headers=admin)).status_code == 200
            wrong_admin = {"authorization": f"Bearer {WRONG_KEY}"}
            assert (await proxy.http.get("/api/v1/status", headers=wrong_admin)).status_code == 401
            unload = await proxy.http.post(
                "/api/v1/models/unload", json={"model_id": QWEN}, headers=admin
            )
            assert unload.status_code == 200
    assert len([line for line in captured.lines if "lmswitch.access" in line]) >= 4
    everything = "\n".join(captured.lines)
    for record in captured.records:
        everything += "\n" + record.getMessage() + "\n" + repr(record.__dict__)
    for secret in SECRETS:
        assert secret not in everything


async def test_requests_not_routed_to_a_model_get_an_access_line_too() -> None:
    """Listings, management, metrics, health and unknown paths: one line each (reads of
    management, health and metrics at DEBUG: docs/design.md §4.3)."""
    as_json: dict[str, Any] = {"logging": {"format": "json", "level": "debug"}}
    asked = [("/v1/models", 200), ("/api/v1/status", 200), ("/metrics", 200), ("/nope", 404)]
    with logging_as_serve_does(**as_json) as captured:
        async with running(Emulator(), **as_json) as proxy:
            answers = {
                path: await proxy.http.get(path, headers={"x-request-id": f"other-{n}"})
                for n, (path, _) in enumerate(asked)
            }
    lines = {line["request_id"]: line for line in json_access_lines(captured)}
    assert sorted(lines) == [f"other-{n}" for n in range(len(asked))]
    for n, (path, status) in enumerate(asked):
        line = lines[f"other-{n}"]
        assert set(line) >= ACCESS_FIELDS
        assert (line["endpoint"], line["status"], line["model"]) == (path, status, "-")
        assert answers[path].status_code == status
        assert line["bytes_out"] == len(answers[path].content)


async def test_a_path_cannot_forge_fields_or_lines_in_a_text_line() -> None:
    """The path is logged decoded: spaces, quotes and newlines in it are quoted as one value."""
    text: dict[str, Any] = {"logging": {"format": "text"}}
    with logging_as_serve_does(**text) as captured:
        async with running(Emulator(), **text) as proxy:
            forged = '/x status=200 "q"\nlmswitch.access: request_id=forged'
            raw = "/x%20status=200%20%22q%22%0Almswitch.access:%20request_id=forged"
            response = await proxy.http.get(raw)
            assert response.status_code == 404
    (line,) = text_access_lines(captured)
    assert line["endpoint"] == forged
    assert line["status"] == "404"
    assert line["request_id"] == response.headers["x-request-id"]


# --- bytes out, and which lines are at DEBUG --------------------------------------------------


async def test_error_answers_log_the_bytes_they_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error's access line counts its body's bytes, whoever made it: the route, the auth
    middleware, the router, or an internal error (answered in the envelope, with its id)."""
    original = bodies.check_fields

    def check_fields(payload: dict[str, Any]) -> None:
        if "boom" in payload:
            raise RuntimeError("a bug")
        original(payload)

    monkeypatch.setattr("proxy.openai_routes.check_fields", check_fields)
    sections: dict[str, Any] = {"auth": {"api_keys": [API_KEY]}, "logging": {"format": "json"}}
    key = {"authorization": f"Bearer {API_KEY}"}
    asked: dict[str, tuple[str, str, dict[str, Any]]] = {
        "unknown-model": ("POST", CHAT, {"json": {"model": "qwen2.5-7b", "messages": MESSAGES}}),
        "anthropic": ("POST", "/v1/messages", {"json": {"model": "x", "messages": MESSAGES}}),
        "bad-json": ("POST", CHAT, {"content": b'{"model": ', "headers": JSON_TYPE}),
        "no-key": ("POST", CHAT, {"json": {"model": QWEN, "messages": MESSAGES}}),
        "wrong-method": ("GET", CHAT, {}),
        "internal": ("POST", CHAT, {"json": {"model": QWEN, "boom": 1, "messages": MESSAGES}}),
    }
    with logging_as_serve_does(**sections) as captured:
        async with running(Emulator(), **sections) as proxy:
            answers = {}
            for request_id, (method, path, options) in asked.items():
                headers = {"x-request-id": request_id, **options.pop("headers", {})}
                if request_id != "no-key":
                    headers.update(key)
                answers[request_id] = await proxy.http.request(
                    method, path, headers=headers, **options
                )
    lines = {line["request_id"]: line for line in json_access_lines(captured)}
    statuses = {request_id: answer.status_code for request_id, answer in answers.items()}
    assert statuses == {
        "unknown-model": 404,
        "anthropic": 404,
        "bad-json": 400,
        "no-key": 401,
        "wrong-method": 405,
        "internal": 500,
    }
    for request_id, answer in answers.items():
        assert (lines[request_id]["status"], lines[request_id]["bytes_out"]) == (
            answer.status_code,
            len(answer.content),
        ), request_id
        assert int(answer.headers["content-length"]) == len(answer.content) > 0
        assert answer.headers["x-request-id"] == request_id
    assert answers["internal"].json()["error"]["code"] == "internal_error"
    (failure,) = [record for record in captured.records if record.name == "lmswitch.server"]
    assert failure.getMessage() == "request internal failed"
    assert failure.exc_info is not None


async def test_a_head_request_logs_no_bytes_out() -> None:
    """The server sends no body for HEAD: the line says 0, not the length of the GET's."""
    as_json: dict[str, Any] = {"logging": {"format": "json"}}
    with logging_as_serve_does(**as_json) as captured:
        async with running(Emulator(), **as_json) as proxy:
            response = await proxy.http.head("/v1/models", headers={"x-request-id": "head"})
            assert response.status_code == 200
            assert int(response.headers["content-length"]) > 0
            assert response.content == b""
    (line,) = json_access_lines(captured)
    assert (line["request_id"], line["bytes_out"]) == ("head", 0)


QUIET_READS = [
    "/api/v1/status",
    "/api/v1/models",
    "/api/v1/models/loaded",
    "/api/v1/usage",
    "/healthz",
    "/readyz",
    "/metrics",
    "/ui/",
    "/ui/app.js",
]


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_management_reads_log_at_debug_and_the_rest_at_info(level: str) -> None:
    """The page and scrapers read status, models, health and metrics over and over: their
    lines are at DEBUG. Requests for models, listings, management writes, unknown paths and
    refused keys stay at INFO."""
    sections: dict[str, Any] = {
        "auth": {"admin_keys": [ADMIN_KEY]},
        "logging": {"format": "json", "level": level},
    }
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    loud: dict[str, tuple[str, str, dict[str, Any]]] = {
        "chat": ("POST", CHAT, {"json": {"model": QWEN, "messages": MESSAGES}}),
        "list": ("GET", "/v1/models", {}),
        "load": ("POST", "/api/v1/models/load", {"json": {"model_id": QWEN}, "headers": admin}),
        "pin": ("POST", "/api/v1/models/pin", {"json": {"model_id": QWEN}, "headers": admin}),
        "unload": ("POST", "/api/v1/models/unload", {"json": {"model_id": QWEN}, "headers": admin}),
        "nowhere": ("GET", "/nope", {}),
        "refused": ("GET", "/api/v1/status", {"headers": {"authorization": f"Bearer {WRONG_KEY}"}}),
    }
    with logging_as_serve_does(**sections) as captured:
        async with running(Emulator(), **sections) as proxy:
            await proxy.wait_ready()
            for n, path in enumerate(QUIET_READS):
                headers = {"x-request-id": f"read-{n}", **admin}
                assert (await proxy.http.get(path, headers=headers)).status_code == 200
            for request_id, (method, path, options) in loud.items():
                headers = {"x-request-id": request_id, **options.pop("headers", {})}
                response = await proxy.http.request(method, path, headers=headers, **options)
                assert response.status_code < 500, request_id
    reads = {f"read-{n}": "debug" for n in range(len(QUIET_READS))}
    levels = {
        line["request_id"]: line["level"]
        for line in json_access_lines(captured)
        if line["request_id"] in reads or line["request_id"] in loud  # not wait_ready's
    }
    expected = dict.fromkeys(loud, "info")
    if level == "debug":
        expected.update(reads)
    assert levels == expected


# --- LM Studio away, and back ------------------------------------------------------------------

START_SERVER = (
    "Start LM Studio's server (in LM Studio: Developer > Start server, or `lms server start`)"
)


def manager_lines(captured: Captured, host: str) -> list[str]:
    """The manager's lines about `host` (its name in the pool) about reading its models."""
    lines = [line.split(" lmswitch.manager: ", 1)[-1] for line in captured.lines]
    return [
        line
        for line in lines
        if line.startswith(
            (
                f"cannot read LM Studio's models on {host}:",
                f"still cannot read LM Studio's models on {host},",
                f"LM Studio on {host} answers",
            )
        )
    ]


@pytest.mark.parametrize("pool", [False, True], ids=["upstream", "pool"])
async def test_lm_studio_away_is_said_once_with_what_to_do_then_its_return(pool: bool) -> None:
    """With nothing listening at LM Studio's URL, the log says so once, with what to do, however
    many listings and requests fail; once LM Studio answers there, it says that too. In a pool,
    per host: the hint names that host's setting, and a host that answers says nothing."""
    port = free_port()  # LM Studio's, closed until the emulator is started on it
    away = f"http://127.0.0.1:{port}"
    sections: dict[str, Any] = {"upstream": {"poll_interval": 0.05}}  # many failed listings
    body = {"model": QWEN, "messages": MESSAGES}
    with logging_as_serve_does(**sections) as captured:
        async with serve(Emulator().app) as other_url:
            proxy: Proxy
            async with (
                pool_for({"desk": away, "laptop": other_url}, **sections)
                if pool
                else proxy_for(away, **sections)
            ) as proxy:
                host = "desk" if pool else "default"
                with anyio.fail_after(5):
                    for _ in range(5):
                        response = await proxy.http.post(CHAT, json=body)
                        assert response.status_code == (200 if pool else 503)
                    await anyio.sleep(0.3)  # the poll fails a few more times
                away_lines = manager_lines(captured, host)
                (warning,) = away_lines  # once, however many failures
                async with serve(Emulator().app, port=port):
                    with anyio.fail_after(5):  # the next listing finds it
                        while manager_lines(captured, host) == away_lines:  # noqa: ASYNC110
                            await anyio.sleep(0.02)  # (a log has no event to wait on)
                    back = manager_lines(captured, host)[len(away_lines) :]
                    if not pool:
                        response = await proxy.http.post(CHAT, json=body)
                        assert response.status_code == 200
    assert warning.startswith(
        f"cannot read LM Studio's models on {host}: LM Studio is not reachable at {away}: "
    )
    setting = (
        "the base_url of desk in upstreams"
        if pool
        else "upstream.base_url (LMSWITCH_UPSTREAM__BASE_URL)"
    )
    assert f"{START_SERVER}, or set {setting} to where it listens." in warning
    assert f"repeats this warning every {UNREADABLE_REPEAT_S:.0f} s until it answers" in warning
    (answers,) = back
    match = re.fullmatch(
        rf"LM Studio on {host} answers at {re.escape(away)}, after (\d+) s and (\d+) failed "
        "attempts",
        answers,
    )
    assert match is not None, answers
    assert int(match[2]) > 5  # every request, and the poll's
    assert f"INFO lmswitch.manager: {answers}" in "\n".join(captured.lines)
    if pool:
        assert manager_lines(captured, "laptop") == []  # up all along: nothing said


def test_lm_studio_away_is_said_again_rarely_saying_for_how_long() -> None:
    """While listings keep failing, the warning comes back once every UNREADABLE_REPEAT_S with
    how long and how many; a new kind of failure is said at once; after LM Studio answers
    again (said so, with "again"), a new outage starts over with the hint."""
    now = [0.0]
    report = Reporter(
        Metrics(),
        EventBus(),
        upstream="desk",
        is_loaded=lambda key: False,
        url="http://desk:1234",
        in_pool=True,
        clock=lambda: now[0],
    )
    away = UpstreamUnavailableError("LM Studio is not reachable at http://desk:1234: refused")
    old = UpstreamError("LM Studio at http://desk:1234 does not serve /api/v1/models")

    with logging_as_serve_does() as captured:

        def said(*failures: tuple[float, ProxyError]) -> list[str]:
            captured.records.clear()
            for at, error in failures:
                now[0] = at
                report.unreadable(error)
            return [record.getMessage() for record in captured.records]

        report.readable()  # read at start: nothing to say
        assert captured.records == []
        (first,) = said(*((float(at), away) for at in range(100, 160, 2)))
        assert first.startswith("cannot read LM Studio's models on desk: LM Studio is not")
        assert START_SERVER in first
        assert "the base_url of desk in upstreams" in first
        (again,) = said((160.0, away), (170.0, away), (219.0, away))
        assert again == (
            "still cannot read LM Studio's models on desk, for 60 s (31 failed attempts): "
            f"{away.message}"
        )
        assert said((200.0, away), (219.0, away)) == []
        (later,) = said((220.0, away), (250.0, away), (279.0, away))
        assert later.startswith("still cannot read LM Studio's models on desk, for 120 s (36 ")
        (changed,) = said((280.0, old), (290.0, old))  # another failure: at once, no hint
        assert changed == f"cannot read LM Studio's models on desk: {old.message}"
        assert said((339.0, old)) == []
        (still,) = said((340.0, old))
        assert still.startswith("still cannot read LM Studio's models on desk, for 240 s (42 ")
        captured.records.clear()
        now[0] = 400.0
        report.readable()
        (back,) = captured.records
        assert back.getMessage() == (
            "LM Studio on desk answers again at http://desk:1234, after 300 s and 42 failed "
            "attempts"
        )
        assert back.levelno == logging.INFO
        report.readable()  # read again: nothing more
        assert len(captured.records) == 1
        (anew,) = said((500.0, away), (501.0, away))
        assert START_SERVER in anew
