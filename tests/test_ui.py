"""The web page (`/ui/`) in a real browser: headless Chromium driven by Playwright.

Debian's `chromium` package is used as it is (Playwright's own browser builds are never
downloaded); the tests skip when /usr/bin/chromium is missing. Each test runs the emulator and
the proxy over loopback and looks at the page the way a person would: by roles and labels. The
pool's tests run two emulators, `desk` and `mac`, behind one proxy.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus
from playwright.async_api import (
    ConsoleMessage,
    Error,
    Locator,
    Page,
    Request,
    async_playwright,
    expect,
)
from starlette.types import ASGIApp

from proxy.app import create_app
from proxy.cli import main
from proxy.emulator import Emulator
from proxy.server import free_port
from tests.helpers import LLAMA, MESSAGES, QWEN, Proxy, proxy_for, running, serve, settings_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 5_000
QWEN_14B = "qwen2.5-14b-instruct"
ADMIN_KEY = "sk-admin-ui-0123456789"
API_KEY = "sk-client-ui-0123456789"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the browser tests need Debian's chromium at /usr/bin/chromium "
    "(apt-get install --no-install-recommends chromium)",
)
expect.set_options(timeout=TIMEOUT_MS)


@dataclass
class Browser:
    """A page on the proxy, with what the browser reported along the way."""

    page: Page
    proxy_url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    loads: list[Any] = field(default_factory=list)  # the bodies the page posted to load models

    def on_request(self, request: Request) -> None:
        self.requests.append(request.url)
        if request.method == "POST" and request.url.endswith("/api/v1/models/load"):
            self.loads.append(request.post_data_json)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def on_page_error(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error}")

    async def open(self) -> None:
        response = await self.page.goto(f"{self.proxy_url}/ui/")
        assert response is not None
        assert response.status == 200, (
            f"GET /ui/ answered {response.status}: the static page must be served without the "
            "admin key (the browser cannot send one when it opens a page); see the auth.py change "
            "that lets /ui/ through"
        )

    def unexpected_errors(self, *statuses: int, refused: bool = False) -> list[str]:
        """Console errors, less the browser's notes on responses a test asked for."""
        expected = tuple(
            f"Failed to load resource: the server responded with a status of {status} "
            for status in statuses
        )
        if refused:
            expected += ("Failed to load resource: net::ERR_",)
        return [error for error in self.errors if not error.startswith(expected)]

    def row(self, model: str) -> Locator:
        return self.page.locator(f'#models-body tr[data-model="{model}"]')

    def state_of(self, model: str) -> Locator:
        return self.row(model).locator(".badge")

    def host(self, name: str) -> Locator:
        """A host's card in the hosts section."""
        return self.page.locator(f'#hosts li[data-host="{name}"]')

    def memory_bar(self, name: str) -> Locator:
        return self.page.get_by_role("meter", name=f"Memory used on {name} against its budget")

    async def horizontal_overflow(self) -> int:
        overflow = await self.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert isinstance(overflow, int)
        return overflow


@asynccontextmanager
async def browse(
    proxy: Proxy | str, *, width: int = 1280, height: int = 800
) -> AsyncIterator[Browser]:
    """Headless Chromium with one page on the proxy, closed before the proxy stops."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(viewport={"width": width, "height": height})
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            seen = Browser(page, proxy if isinstance(proxy, str) else proxy.url)
            page.on("console", seen.on_console)
            page.on("pageerror", seen.on_page_error)
            page.on("request", seen.on_request)
            yield seen
        finally:
            await browser.close()


async def load(proxy: Proxy, model: str, **headers: str) -> None:
    """Load a model from outside the page, as another client would."""
    response = await proxy.http.post(
        "/api/v1/models/load", json={"model_id": model}, headers=headers
    )
    assert response.status_code == 200, response.text


async def unload(proxy: Proxy, model: str) -> None:
    response = await proxy.http.post("/api/v1/models/unload", json={"model_id": model})
    assert response.status_code == 200, response.text


async def chat(proxy: Proxy, model: str) -> None:
    """A streaming chat request, as a client that waits for its model would send it."""
    body = {"model": model, "messages": MESSAGES, "stream": True}
    response = await proxy.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.text.rstrip().endswith("data: [DONE]")


async def switch_to(ui: Browser, model: str) -> None:
    await ui.page.get_by_label("Model", exact=True).select_option(model)
    await ui.page.get_by_role("button", name="Switch", exact=True).click()


async def test_page_loads_lists_models_and_uses_only_the_proxy() -> None:
    emulator = Emulator()
    async with running(emulator, models={"memory_budget": "20GiB"}) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page).to_have_title("lmswitch")
        await expect(page.locator("#live")).to_have_text("connected")
        await expect(page.locator("#upstream")).to_have_text("LM Studio reachable")
        await expect(page.locator("#loaded")).to_have_text("none")
        await expect(page.locator("#memory")).to_have_text("0 GB of 21.5 GB")
        await expect(page.locator("#queue")).to_have_text("0 waiting · 0 running")
        picker = page.get_by_label("Model", exact=True)
        options = picker.locator("option")
        await expect(options).to_have_count(len(emulator.catalog))
        values = [await option.get_attribute("value") for option in await options.all()]
        assert set(values) == set(emulator.catalog)
        await expect(page.locator("#models-body tr")).to_have_count(len(emulator.catalog))
        await expect(ui.row(QWEN).locator("td").nth(1)).to_have_text("4.68 GB")
        await expect(ui.state_of(QWEN)).to_have_text("not loaded")
        await expect(page.get_by_role("switch", name=f"Pin {QWEN}")).not_to_be_checked()
        # One host: its line in the hosts section, and no pool controls anywhere.
        await expect(page.locator("#hosts li")).to_have_count(1)
        await expect(page.get_by_role("heading", name="Host", exact=True)).to_be_visible()
        await expect(ui.host("default")).to_contain_text("up")
        await expect(ui.host("default").locator(".memory-text")).to_have_text("0 GB of 21.5 GB")
        await expect(page.get_by_role("combobox")).to_have_count(1)  # the model picker alone
        assert ui.errors == []
        outside = [url for url in ui.requests if not url.startswith((proxy.url, "data:"))]
        assert outside == []
        # The proxy's address alone brings a browser to the page.
        response = await page.goto(proxy.url)
        assert response is not None
        assert response.status == 200
        assert page.url == f"{proxy.url}/ui/"
        await expect(page.locator("#live")).to_have_text("connected")
        assert ui.errors == []


async def test_switching_shows_progress_then_the_result_everywhere(tmp_path: Path) -> None:
    """Progress while loading, 'Switched to', then the status bar and table from events."""
    emulator = Emulator(load_delay_s=0.6)
    async with running(emulator, models={"memory_budget": "20GiB"}) as proxy, browse(proxy) as ui:
        await load(proxy, LLAMA)
        await ui.open()
        page = ui.page
        await expect(page.locator("#loaded")).to_have_text(LLAMA)
        await switch_to(ui, QWEN)
        progress = page.get_by_role("progressbar", name=f"Loading {QWEN}")
        await expect(progress).to_be_visible()
        await expect(page.locator("#progress")).to_contain_text(" s")  # the time it has taken
        await expect(ui.state_of(QWEN)).to_have_text("loading…")  # a `model` event
        message = page.locator("#message")
        await expect(message).to_contain_text(f"Switched to {QWEN}")
        await expect(progress).to_be_hidden()
        await expect(page.locator("#loaded")).to_have_text(QWEN)
        await expect(ui.state_of(QWEN)).to_have_text("loaded")
        await expect(ui.state_of(LLAMA)).to_have_text("not loaded")
        await expect(page.locator("#memory")).to_have_text("4.68 GB of 21.5 GB")
        assert emulator.load_count(QWEN) == 1

        # Another client's switch reaches the page through the event stream alone.
        await load(proxy, LLAMA)
        await expect(page.locator("#loaded")).to_have_text(LLAMA)
        await expect(ui.state_of(LLAMA)).to_have_text("loaded")
        await expect(ui.state_of(QWEN)).to_have_text("not loaded")
        await switch_to(ui, QWEN)
        await expect(page.locator("#loaded")).to_have_text(QWEN)
        await expect(message).to_contain_text(f"Switched to {QWEN}")

        await page.screenshot(path=tmp_path / "ui-1280x800.png", full_page=True)
        await page.emulate_media(color_scheme="dark")
        await page.screenshot(path=tmp_path / "ui-1280x800-dark.png", full_page=True)
        await page.set_viewport_size({"width": 400, "height": 800})
        assert await ui.horizontal_overflow() <= 0
        await page.screenshot(path=tmp_path / "ui-400-dark.png", full_page=True)
        await page.emulate_media(color_scheme="light")
        await page.screenshot(path=tmp_path / "ui-400.png", full_page=True)
        assert ui.errors == []


async def test_failed_loads_show_lm_studios_reason() -> None:
    emulator = Emulator(memory_bytes=6_000_000_000)
    async with running(emulator) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        message = page.locator("#message")
        emulator.fail_next_loads = 1
        await switch_to(ui, QWEN)
        await expect(message).to_contain_text(f"Could not switch to {QWEN}")
        await expect(message).to_contain_text("the engine process exited unexpectedly")
        await expect(ui.state_of(QWEN)).to_have_text("load failed")
        await expect(page.locator("#loaded")).to_have_text("none")

        await switch_to(ui, QWEN_14B)  # bigger than LM Studio's memory: its guardrail refuses
        await expect(message).to_contain_text(f"Could not switch to {QWEN_14B}")
        await expect(message).to_contain_text("insufficient system resources")
        await expect(ui.row(QWEN_14B).locator(".reason")).to_contain_text("insufficient")

        await switch_to(ui, QWEN)  # the next try works, and clears the failure
        await expect(message).to_contain_text(f"Switched to {QWEN}")
        await expect(ui.state_of(QWEN)).to_have_text("loaded")
        assert ui.unexpected_errors(503) == []


async def test_unload_empties_the_loaded_model() -> None:
    emulator = Emulator()
    async with running(emulator) as proxy, browse(proxy) as ui:
        await load(proxy, QWEN)
        await ui.open()
        page = ui.page
        await expect(page.locator("#loaded")).to_have_text(QWEN)
        await expect(page.get_by_label("Model", exact=True)).to_have_value(QWEN)
        await page.get_by_role("button", name=f"Unload {QWEN}").click()
        await expect(page.locator("#message")).to_have_text(f"Unloaded {QWEN}.")
        await expect(page.locator("#loaded")).to_have_text("none")
        await expect(ui.state_of(QWEN)).to_have_text("not loaded")
        assert emulator.instances == {}
        # By keyboard: a click aims at coordinates, and live updates may still move the layout.
        pin = page.get_by_role("switch", name=f"Pin {LLAMA}")
        await pin.focus()
        await page.keyboard.press("Space")
        await expect(pin).to_be_checked()
        await expect(page.locator("#message")).to_contain_text(f"Pinned {LLAMA}")
        rows = (await proxy.http.get("/api/v1/models")).json()
        assert [row["id"] for row in rows if row["pinned"]] == [LLAMA]
        assert ui.errors == []


async def test_chat_streams_the_reply_token_by_token() -> None:
    emulator = Emulator(token_delay_s=0.05, reply_tokens=16)
    async with running(emulator) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await page.get_by_label("Model", exact=True).select_option(LLAMA)
        await expect(page.locator("#chat-model")).to_have_text(LLAMA)
        await page.get_by_label("Message", exact=True).fill("Say hello")
        await page.get_by_label("Message", exact=True).press("Enter")
        reply = page.locator(".bubble.assistant .text")
        lengths: list[int] = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            lengths.append(len(await reply.text_content() or ""))
            if await page.locator("#chat-status").text_content() == f"Reply from {LLAMA} complete.":
                break
            await anyio.sleep(0.04)
        growth = sorted(set(lengths))
        assert len(growth) >= 4, lengths  # seen part-way at least three times, then whole
        assert lengths == sorted(lengths)
        text = await reply.text_content() or ""
        assert len(text.split()) == 16
        await expect(page.locator("#chat-status")).to_have_text(f"Reply from {LLAMA} complete.")
        await expect(page.locator("#loaded")).to_have_text(LLAMA)  # the chat loaded it
        assert emulator.load_count(LLAMA) == 1
        assert ui.errors == []


async def test_keyboard_alone_switches_models() -> None:
    emulator = Emulator(load_delay_s=0.2)
    async with running(emulator) as proxy, browse(proxy) as ui:
        await load(proxy, LLAMA)
        await ui.open()
        page = ui.page
        picker = page.get_by_label("Model", exact=True)
        await expect(picker).to_have_value(LLAMA)
        for _ in range(12):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.id") == "model-picker":
                break
        else:
            pytest.fail("Tab never reached the model picker")
        assert await page.evaluate("document.activeElement.matches(':focus-visible')")
        await page.keyboard.press("ArrowDown")  # the next model in the list
        chosen = await picker.input_value()
        assert chosen != LLAMA
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "switch-button"
        await page.keyboard.press("Enter")
        await expect(page.locator("#message")).to_contain_text(f"Switched to {chosen}")
        await expect(page.locator("#loaded")).to_have_text(chosen)
        assert ui.errors == []


async def test_narrow_window_has_no_horizontal_scroll(tmp_path: Path) -> None:
    emulator = Emulator(memory_bytes=6_000_000_000)
    async with running(emulator) as proxy, browse(proxy, width=400, height=800) as ui:
        await load(proxy, QWEN)
        await ui.open()
        page = ui.page
        await switch_to(ui, QWEN_14B)  # a long error message must wrap, not widen the page
        await expect(page.locator("#message")).to_contain_text("insufficient system resources")
        await expect(page.locator("#models-body tr")).to_have_count(len(emulator.catalog))
        assert await ui.horizontal_overflow() <= 0
        await page.screenshot(path=tmp_path / "ui-400-failure.png", full_page=True)
        assert ui.unexpected_errors(503) == []


async def test_behind_keys_the_page_asks_for_them() -> None:
    """401 from management asks for the admin key; 401 from /v1 asks for an API key."""
    emulator = Emulator(token_delay_s=0.01, reply_tokens=5)
    auth = {"admin_keys": [ADMIN_KEY], "api_keys": [API_KEY]}
    async with running(emulator, auth=auth) as proxy:
        # A browser cannot send a key when it opens a page: the page's static files must be
        # served without one (they hold no data), and the page then asks for the key itself.
        page_status = (await proxy.http.get("/ui/")).status_code
        if page_status == 200:
            await asks_for_the_keys(proxy, emulator)
    # Checked outside the servers, so that a missing server change fails this test alone.
    assert page_status == 200, (
        f"GET /ui/ answers {page_status} when auth.admin_keys is set: proxy/auth.py must let "
        "/ui/ through without the admin key (the management API keeps needing it)"
    )


async def asks_for_the_keys(proxy: Proxy, emulator: Emulator) -> None:
    async with browse(proxy) as ui:
        await ui.open()
        page = ui.page
        dialog = page.get_by_role("dialog", name="Admin key needed")
        await expect(dialog).to_be_visible()
        key_input = dialog.get_by_label("Admin key")
        await expect(key_input).to_be_focused()
        await key_input.fill("wrong-key")
        await key_input.press("Enter")
        await expect(dialog.get_by_role("alert")).to_have_text(
            "That key was not accepted. Try another."
        )
        await key_input.fill(ADMIN_KEY)
        await dialog.get_by_role("button", name="Use key").click()
        await expect(dialog).to_be_hidden()
        await expect(page.locator("#live")).to_have_text("connected")
        options = page.get_by_label("Model", exact=True).locator("option")
        await expect(options).to_have_count(len(emulator.catalog))
        stored = await page.evaluate("sessionStorage.getItem('lmswitch.adminKey')")
        assert stored == ADMIN_KEY

        await switch_to(ui, QWEN)
        await expect(page.locator("#message")).to_contain_text(f"Switched to {QWEN}")
        await expect(page.locator("#loaded")).to_have_text(QWEN)
        # the authenticated event stream (fetch, not EventSource) delivers others' changes
        await load(proxy, LLAMA, authorization=f"Bearer {ADMIN_KEY}")
        await expect(page.locator("#loaded")).to_have_text(LLAMA)

        await page.get_by_label("Message", exact=True).fill("Say hello")
        await page.get_by_role("button", name="Send").click()
        api_dialog = page.get_by_role("dialog", name="API key needed")
        await expect(api_dialog).to_be_visible()
        await api_dialog.get_by_label("API key").fill(API_KEY)
        await api_dialog.get_by_label("API key").press("Enter")
        # the chat talks to the picker's model, which the page chose: QWEN, loaded again
        await expect(page.locator("#chat-status")).to_have_text(f"Reply from {QWEN} complete.")
        text = await page.locator(".bubble.assistant .text").text_content() or ""
        assert len(text.split()) == 5
        await expect(page.locator("#loaded")).to_have_text(QWEN)
        stored = await page.evaluate("sessionStorage.getItem('lmswitch.apiKey')")
        assert stored == API_KEY
        # The only complaints are the browser's own notes on the 401s that asked for the keys.
        assert ui.unexpected_errors(401) == []


async def test_live_updates_reconnect_when_the_stream_ends() -> None:
    """The proxy goes away and comes back: the page says so, reconnects, and catches up."""
    with socket.socket() as probe:  # a free loopback port, to restart the proxy in place
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    emulator = Emulator()
    async with serve(emulator.app) as upstream_url:
        settings = settings_for(upstream_url)
        async with browse(f"http://127.0.0.1:{port}") as ui:
            live = ui.page.locator("#live")
            async with serve(create_app(settings), port=port):
                await ui.open()
                await expect(live).to_have_text("connected")
                await expect(ui.page.locator("#loaded")).to_have_text("none")
            await expect(live).to_contain_text("reconnecting in")
            emulator.load_instance(QWEN)  # loaded in LM Studio's own UI meanwhile
            async with serve(create_app(settings), port=port):
                await expect(live).to_have_text("connected")
                await expect(ui.page.locator("#loaded")).to_have_text(QWEN)
                await expect(ui.state_of(QWEN)).to_have_text("loaded")
            assert ui.unexpected_errors(refused=True) == []


async def test_one_host_page_has_no_pool_controls() -> None:
    """With one host: no host picker, no host tags, and no bar against a budget there is not."""
    emulator = Emulator()
    async with running(emulator) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        host = ui.host("default")
        await expect(host.locator(".memory-text")).to_have_text("0 GB used, no budget")
        await expect(ui.memory_bar("default")).to_be_hidden()
        await expect(host.locator(".models")).to_have_text("none loaded")
        reply = await proxy.http.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": MESSAGES}
        )
        assert reply.status_code == 200, reply.text
        await expect(host.locator(".models .tag")).to_have_text([QWEN])
        await expect(host.locator(".memory-text")).to_have_text("4.68 GB used, no budget")
        await expect(ui.state_of(QWEN)).to_have_text("loaded")
        request = page.locator("#requests li").first
        await expect(request).to_contain_text(QWEN)
        await expect(request).to_contain_text("200")
        await expect(request.locator(".answered")).to_be_hidden()  # only one host could answer
        await expect(page.get_by_role("combobox")).to_have_count(1)
        await expect(ui.row(QWEN).locator(".holders")).to_be_hidden()
        await expect(page.locator("#upstream")).to_have_text("LM Studio reachable")
        assert ui.errors == []


# --- loads in progress ------------------------------------------------------------------------

HEADER_BOXES = """[...document.querySelectorAll('.statusbar .stat')].map((stat) => {
    const box = stat.getBoundingClientRect();
    return [stat.querySelector('dt').textContent, Math.round(box.x), Math.round(box.y)];
})"""


# The first load line's bar, how full it is (value / max; -1 when indeterminate), and its time
# text; null when there is no line.
BAR_FRACTION = """(() => {
    const bar = document.querySelector('#loads li progress');
    if (bar === null) return null;
    return bar.hasAttribute('value') ? bar.value / bar.max : -1;
})()"""
LOAD_TIME = "document.querySelector('#loads li .load-time')?.textContent ?? null"


async def watch(
    page: Page, script: str, done: Callable[[list[Any]], bool], seconds: float
) -> list[Any]:
    """The values of `script`, read every 20 ms (each at once, so a line that goes between two
    reads is never waited for) until `done(values)`, or for `seconds` at most."""
    values: list[Any] = []
    with anyio.move_on_after(seconds):
        while True:
            values.append(await page.evaluate(script))
            if done(values):
                break
            await anyio.sleep(0.02)
    return values


async def test_a_load_with_an_expected_time_shows_the_time_left() -> None:
    """Three loads teach the proxy how long one takes; the fourth, another client's, shows a bar
    filling up to that time and the time left, and goes once the model is loaded. The header
    keeps its place meanwhile."""
    emulator = Emulator(load_delay_s=1.0)
    async with running(emulator) as proxy, browse(proxy) as ui:
        for _ in range(3):
            await load(proxy, QWEN)
            await unload(proxy, QWEN)
        rows = {row["id"]: row for row in (await proxy.http.get("/api/v1/models")).json()}
        assert rows[QWEN]["expected_load_s"] == pytest.approx(1.0, abs=0.5)
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        idle = await page.evaluate(HEADER_BOXES)
        bar = page.get_by_role("progressbar", name=f"Loading {QWEN}")
        line = page.locator("#loads li")
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, proxy, QWEN)
            await expect(bar).to_be_visible()
            await expect(line.locator(".load-time")).to_have_text(re.compile(r"^about \d s left$"))
            assert await page.evaluate(HEADER_BOXES) == idle
            max_s = await bar.evaluate("(bar) => bar.max")
            assert max_s == pytest.approx(rows[QWEN]["expected_load_s"], abs=0.01)
            fractions = await watch(page, BAR_FRACTION, lambda seen: 0 < (seen[-1] or 0) < 1, 2)
            assert 0 < (fractions[-1] or 0) < 1, fractions
        await expect(bar).to_be_hidden()
        await expect(page.locator("#progress")).to_be_hidden()
        await expect(ui.state_of(QWEN)).to_have_text("loaded")
        assert emulator.load_count(QWEN) == 4
        assert ui.errors == []


async def test_a_load_past_its_expected_time_says_it_takes_longer_than_usual() -> None:
    emulator = Emulator(load_delay_s=0.5)
    async with running(emulator) as proxy, browse(proxy) as ui:
        await load(proxy, QWEN)
        await unload(proxy, QWEN)
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        emulator.load_delay_s = 3.0  # six times what the proxy learned
        bar = page.get_by_role("progressbar", name=f"Loading {QWEN}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, proxy, QWEN)

            def late(seen: list[Any]) -> bool:
                return str(seen[-1]).startswith("taking longer")

            times = [t for t in await watch(page, LOAD_TIME, late, 2) if t is not None]
            assert times, "no load line"
            assert re.fullmatch(r"about \d s left", times[0]), times
            assert re.fullmatch(r"taking longer than usual \(\d+\.\d s so far\)", times[-1]), times
            await expect(bar).to_have_js_property("position", -1)  # indeterminate now
            await expect(page.locator("#loads-status")).to_have_text(
                f"Loading {QWEN} is taking longer than usual."
            )
        await expect(bar).to_be_hidden()
        assert ui.errors == []


async def test_a_load_shows_how_many_requests_wait_for_it() -> None:
    """Requests waiting for a loading model are counted live, from `queue` events alone: the
    page reads nothing from the proxy while the load runs (no polling)."""
    emulator = Emulator(load_delay_s=2.5)
    async with running(emulator) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        read_before = len(ui.requests)
        waiting = page.locator("#loads li .load-waiting")
        async with anyio.create_task_group() as tg:
            tg.start_soon(chat, proxy, QWEN)
            await expect(waiting).to_have_text("1 request waiting")
            tg.start_soon(chat, proxy, QWEN)
            await expect(waiting).to_have_text("2 requests waiting")
            await expect(page.locator("#queue")).to_have_text("2 waiting · 0 running")
            await expect(ui.host("default").locator(".queued")).to_have_text("2")
            await expect(ui.row(QWEN).locator("td").nth(4)).to_have_text("0 (+2 queued)")
            await expect(page.locator("#progress")).to_be_visible()  # the load still runs
            reads = [url for url in ui.requests[read_before:] if "/api/" in url]
            assert reads == []
        await expect(page.locator("#progress")).to_be_hidden()
        assert emulator.load_count(QWEN) == 1
        assert ui.errors == []


async def test_a_first_load_shows_the_time_it_has_taken() -> None:
    """Nothing learned yet: an indeterminate bar and the running time, no time left."""
    emulator = Emulator(load_delay_s=1.5)
    async with running(emulator) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        bar = page.get_by_role("progressbar", name=f"Loading {QWEN}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, proxy, QWEN)
            await expect(bar).to_be_visible()
            await expect(bar).to_have_js_property("position", -1)
            times = await watch(page, LOAD_TIME, lambda seen: seen[-1] is None, 3)
        assert times.pop() is None, times  # gone once loaded
        assert all(re.fullmatch(r"\d\.\d s", text) for text in times), times
        seconds = [float(text.split()[0]) for text in times]
        assert seconds == sorted(seconds)
        assert seconds[-1] - seconds[0] >= 0.5, times  # a running time, seen running
        await expect(bar).to_be_hidden()
        assert ui.errors == []


# --- a pool of two hosts ---------------------------------------------------------------------

DESK_BUDGET = "20GiB"  # 21.5 GB
MAC_BUDGET = "8GiB"  # 8.59 GB


async def _serve_until(
    app: ASGIApp, stop: anyio.Event, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve `app` in a task of its own until `stop` is set: a host a test can take down."""
    async with serve(app) as url:
        task_status.started(url)
        await stop.wait()


@dataclass
class Pool:
    proxy: Proxy
    desk: Emulator
    mac: Emulator
    stop_mac: anyio.Event


@asynccontextmanager
async def pool() -> AsyncIterator[Pool]:
    """Two emulated LM Studio hosts of different memory behind one proxy, which looks at them
    every 0.2 s; `stop_mac` takes the `mac` host down."""
    desk = Emulator(memory_bytes=32_000_000_000)
    mac = Emulator(memory_bytes=9_000_000_000)
    stop_mac = anyio.Event()
    async with serve(desk.app) as desk_url, anyio.create_task_group() as tg:
        mac_url = await tg.start(_serve_until, mac.app, stop_mac)
        upstreams = [
            {"name": "desk", "base_url": desk_url, "memory_budget": DESK_BUDGET, "max_loaded": 2},
            {"name": "mac", "base_url": mac_url, "memory_budget": MAC_BUDGET},
        ]
        try:
            async with proxy_for(
                desk_url, upstream={"poll_interval": "0.2s"}, upstreams=upstreams
            ) as proxy:
                await proxy.wait_ready()
                yield Pool(proxy, desk, mac, stop_mac)
        finally:
            stop_mac.set()


def hosts_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in status["upstreams"]}


async def test_pool_page_shows_each_host_with_its_memory_and_models(tmp_path: Path) -> None:
    async with pool() as hosts, browse(hosts.proxy) as ui:
        proxy = hosts.proxy
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        await expect(page.get_by_role("heading", name="Hosts", exact=True)).to_be_visible()
        await expect(page.locator("#hosts li")).to_have_count(2)
        await expect(page.locator("#upstream-label")).to_have_text("Hosts")
        await expect(page.locator("#upstream")).to_have_text("2 of 2 up")
        await expect(page.locator("#memory")).to_have_text("0 GB of 30.1 GB")
        status = hosts_of(await proxy.status())
        for name, budget in (("desk", "21.5 GB"), ("mac", "8.59 GB")):
            card = ui.host(name)
            await expect(card.get_by_role("heading", name=name)).to_be_visible()
            await expect(card.locator(".pill")).to_have_text("up")
            await expect(card.locator(".host-url")).to_have_text(status[name]["url"])
            await expect(card.locator(".memory-text")).to_have_text(f"0 GB of {budget}")
            await expect(ui.memory_bar(name)).to_be_visible()
            await expect(ui.memory_bar(name)).to_have_js_property("value", 0)
            await expect(card.locator(".models")).to_have_text("none loaded")
        await expect(ui.host("desk").locator(".instances")).to_have_text("0 of 2")
        await expect(ui.host("mac").locator(".instances")).to_have_text("0 of 1")

        # A request for a model: the host that answered lists it, and its bar grows.
        reply = await proxy.http.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": MESSAGES}
        )
        assert reply.status_code == 200, reply.text
        answered = reply.headers["x-lmswitch-upstream"]
        other = "mac" if answered == "desk" else "desk"
        status = hosts_of(await proxy.status())
        assert status[answered]["loaded"] == [QWEN]
        used = status[answered]["bytes_used"]
        assert used > 0
        card = ui.host(answered)
        await expect(card.locator(".models .tag")).to_have_text([QWEN])
        await expect(ui.memory_bar(answered)).to_have_js_property("value", used)
        await expect(card.locator(".memory-text")).to_contain_text("4.68 GB of")
        await expect(card.locator(".instances")).to_contain_text("1 of")
        await expect(ui.host(other).locator(".models")).to_have_text("none loaded")
        await expect(ui.memory_bar(other)).to_have_js_property("value", 0)
        # The model's row names the host holding it; the request names the host that answered.
        await expect(ui.row(QWEN).locator(".holders .tag")).to_have_text([answered])
        await expect(ui.state_of(QWEN)).to_have_text("loaded")
        request = page.locator("#requests li").first
        await expect(request).to_contain_text(QWEN)
        await expect(request).to_have_attribute("data-upstream", answered)
        await expect(request.locator(".answered")).to_have_text(f"answered by {answered}")

        await page.screenshot(path=tmp_path / "pool-1280.png", full_page=True)
        await page.set_viewport_size({"width": 400, "height": 800})
        await expect(ui.memory_bar(answered)).to_be_visible()
        assert await ui.horizontal_overflow() <= 0
        await page.screenshot(path=tmp_path / "pool-400.png", full_page=True)
        assert ui.errors == []


async def test_pool_load_picker_loads_on_the_chosen_host() -> None:
    async with pool() as hosts, browse(hosts.proxy) as ui:
        proxy = hosts.proxy
        await ui.open()
        page = ui.page
        picker = page.get_by_role("combobox", name=f"Host to load {LLAMA} on")
        await expect(picker).to_have_value("")  # auto
        await expect(picker.locator("option")).to_have_text(["auto", "desk", "mac"])
        await picker.select_option("mac")
        await page.get_by_role("button", name=f"Load {LLAMA}", exact=True).click()
        await expect(page.locator("#message")).to_contain_text(f"Switched to {LLAMA} on mac")
        status = hosts_of(await proxy.status())
        assert status["mac"]["loaded"] == [LLAMA]
        assert status["desk"]["loaded"] == []
        assert (hosts.mac.load_count(LLAMA), hosts.desk.load_count(LLAMA)) == (1, 0)
        assert ui.loads == [{"model_id": LLAMA, "upstream": "mac"}]
        await expect(ui.row(LLAMA).locator(".holders .tag")).to_have_text(["mac"])
        await expect(ui.host("mac").locator(".models .tag")).to_have_text([LLAMA])
        # The host holding it cannot be chosen again; the other one can, for a second copy.
        await expect(picker.locator("option")).to_have_text(["auto", "desk", "mac (has it)"])
        await expect(picker.locator('option[value="mac"]')).to_be_disabled()
        await expect(picker).to_have_value("")  # back to auto

        # Auto sends no host: the proxy places the model as a request would.
        await page.get_by_role("button", name=f"Load {QWEN}", exact=True).click()
        await expect(page.locator("#message")).to_contain_text(f"Switched to {QWEN} (loaded")
        assert ui.loads[1] == {"model_id": QWEN}
        status = hosts_of(await proxy.status())
        placed = [name for name, row in status.items() if QWEN in row["loaded"]]
        assert len(placed) == 1
        await expect(ui.row(QWEN).locator(".holders .tag")).to_have_text(placed)
        assert ui.errors == []


async def test_pool_host_that_goes_down_is_shown_down() -> None:
    async with pool() as hosts, browse(hosts.proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#upstream")).to_have_text("2 of 2 up")
        await expect(ui.host("mac").locator(".pill")).to_have_text("up")
        hosts.stop_mac.set()  # mac's LM Studio goes away; nothing else happens meanwhile
        # The proxy notices at its next look (0.2 s), the page at its next read (3 s at most).
        await expect(ui.host("mac").locator(".pill")).to_have_text("down", timeout=8_000)
        await expect(ui.host("mac")).to_have_attribute("data-up", "false")
        await expect(ui.host("desk").locator(".pill")).to_have_text("up")
        await expect(page.locator("#upstream")).to_have_text("1 of 2 up")
        picker = page.get_by_role("combobox", name=f"Host to load {QWEN} on")
        await expect(picker.locator('option[value="mac"]')).to_have_text("mac (down)")
        await expect(picker.locator('option[value="mac"]')).to_be_disabled()
        assert (await hosts.proxy.status())["upstreams"][1]["up"] is False
        assert ui.errors == []


async def test_pool_load_progress_names_the_host() -> None:
    async with pool() as hosts, browse(hosts.proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#upstream")).to_have_text("2 of 2 up")
        hosts.mac.load_delay_s = 1.0

        async def load_on_mac() -> None:
            body = {"model_id": LLAMA, "upstream": "mac"}
            response = await hosts.proxy.http.post("/api/v1/models/load", json=body)
            assert response.status_code == 200, response.text

        async with anyio.create_task_group() as tg:
            tg.start_soon(load_on_mac)
            bar = page.get_by_role("progressbar", name=f"Loading {LLAMA} on mac", exact=True)
            await expect(bar).to_be_visible()
        await expect(bar).to_be_hidden()
        assert hosts.mac.load_count(LLAMA) == 1
        assert ui.errors == []


# --- messages and actions that follow what happens (issue 16) ---------------------------------


async def test_the_message_follows_loads_asked_for_elsewhere() -> None:
    """'Switched to X' goes stale as soon as something else happens to the models: a load a
    request asks for replaces it, and the load's end, or its failure, are told in turn."""
    emulator = Emulator(load_delay_s=1.0)
    async with running(emulator) as proxy, browse(proxy) as ui:  # max_loaded: 1
        await ui.open()
        page = ui.page
        message = page.locator("#message")
        await switch_to(ui, LLAMA)
        await expect(message).to_contain_text(f"Switched to {LLAMA}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(chat, proxy, QWEN)  # evicts LLAMA, loads QWEN
            await expect(message).to_have_text(
                f"Loading {QWEN}, asked for by a request, another tab or the API."
            )
        await expect(message).to_have_text(
            re.compile(rf"^Loaded {re.escape(QWEN)} in \d+\.\d s\.$")
        )
        await expect(message).to_have_attribute("data-tone", "ok")

        emulator.fail_next_loads = 1
        body = {"model": LLAMA, "messages": MESSAGES}
        failed = await proxy.http.post("/v1/chat/completions", json=body)
        assert failed.status_code == 503, failed.text
        await expect(message).to_have_text(
            f"Loading {LLAMA} failed: {failed.json()['error']['message']}"
        )
        await expect(message).to_have_attribute("data-tone", "error")
        await expect(ui.state_of(LLAMA)).to_have_text("load failed")
        assert ui.errors == []


async def test_actions_are_offered_only_where_they_make_sense_and_never_lock_the_page() -> None:
    """No Unload (nor Load) while a model loads; an Unload waiting for a running request says
    what it waits for, can be left, and leaves every other action usable."""
    emulator = Emulator(load_delay_s=1.0, token_delay_s=0.1, reply_tokens=40)
    async with running(emulator, models={"max_loaded": 2}) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        load_qwen = page.get_by_role("button", name=f"Load {QWEN}", exact=True)
        unload_qwen = page.get_by_role("button", name=f"Unload {QWEN}", exact=True)
        load_llama = page.get_by_role("button", name=f"Load {LLAMA}", exact=True)
        await expect(load_qwen).to_have_attribute("aria-disabled", "false")
        await expect(unload_qwen).to_have_attribute("aria-disabled", "true")
        await expect(unload_qwen).to_have_attribute("title", f"{QWEN} is not loaded")
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, proxy, QWEN)  # another client's load
            await expect(ui.state_of(QWEN)).to_have_text("loading…")
            await expect(unload_qwen).to_have_attribute("aria-disabled", "true")
            await expect(unload_qwen).to_have_attribute(
                "title", f"{QWEN} is loading: it can be unloaded once loaded"
            )
            await expect(load_qwen).to_have_attribute("aria-disabled", "true")
            await expect(load_llama).to_have_attribute("aria-disabled", "false")
        await expect(ui.state_of(QWEN)).to_have_text("loaded")
        await expect(unload_qwen).to_have_attribute("aria-disabled", "false")
        await expect(load_qwen).to_have_attribute("title", f"{QWEN} is loaded")

        body = {"model": QWEN, "messages": MESSAGES, "stream": True}
        async with proxy.http.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.aiter_lines()
            await anext(lines)  # a request runs on QWEN, for 4 s
            await unload_qwen.click()
            line = page.locator("#loads li")
            await expect(line.locator(".load-label")).to_have_text(
                f"Unloading {QWEN} once its running requests finish"
            )
            stop = line.get_by_role("button", name=f"Stop waiting for the unload of {QWEN}")
            await expect(stop).to_be_visible()
            await expect(unload_qwen).to_have_attribute("aria-disabled", "true")
            # The rest of the page stays usable meanwhile.
            await expect(load_llama).to_have_attribute("aria-disabled", "false")
            await page.get_by_label("Model", exact=True).select_option(LLAMA)
            switch = page.get_by_role("button", name="Switch", exact=True)
            await expect(switch).to_have_attribute("aria-disabled", "false")
            await expect(page.get_by_role("button", name="Send")).to_have_attribute(
                "aria-disabled", "false"
            )
            await stop.click()
            await expect(page.locator("#message")).to_have_text(
                f"Stopped waiting for {QWEN} to unload. The proxy still unloads it once its "
                "running requests finish."
            )
            await expect(line).to_have_count(0)
            await expect(ui.state_of(QWEN)).to_have_text("draining")
            await expect(unload_qwen).to_have_attribute("aria-disabled", "true")
            rest = [text async for text in lines]
        assert "data: [DONE]" in rest
        await expect(ui.state_of(QWEN)).to_have_text("not loaded")  # the proxy went on
        await expect(page.locator("#message")).to_have_text(f"{QWEN} was unloaded as asked.")
        assert QWEN not in emulator.instances
        assert ui.errors == []


# Each column's width, from the table's header.
COLUMN_WIDTHS = """[...document.querySelectorAll('#models-table thead th')].map(
    (th) => Math.round(th.getBoundingClientRect().width))"""
# The numbers (sizes, context lengths, counts) that take more than one line.
WRAPPED_NUMBERS = """[...document.querySelectorAll('#models-body td.num')].filter((td) => {
    const range = document.createRange();
    range.selectNodeContents(td);
    return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size > 1;
}).map((td) => td.textContent)"""


async def test_a_load_refused_for_want_of_room_says_so_and_the_columns_stay_put() -> None:
    emulator = Emulator()
    async with running(emulator) as proxy, browse(proxy, width=1024) as ui:  # max_loaded: 1
        await load(proxy, QWEN)
        pinned = await proxy.http.post("/api/v1/models/pin", json={"model_id": QWEN})
        assert pinned.status_code == 200, pinned.text
        await ui.open()
        page = ui.page
        await expect(page.get_by_role("switch", name=f"Pin {QWEN}")).to_be_checked()
        widths = await page.evaluate(COLUMN_WIDTHS)
        assert await page.evaluate(WRAPPED_NUMBERS) == []
        await page.get_by_role("button", name=f"Load {LLAMA}", exact=True).click()
        message = page.locator("#message")
        await expect(message).to_contain_text(f"No room for {LLAMA}: ")
        await expect(message).to_contain_text("pinned models fill every slot")
        await expect(message).to_contain_text("Unpinning a model makes room.")
        badge = ui.state_of(LLAMA)
        await expect(badge).to_have_text("no room")
        await expect(badge).to_have_attribute("title", re.compile("pinned models fill every slot"))
        await expect(ui.row(LLAMA).locator(".reason")).to_contain_text("pinned models")
        assert await page.evaluate(COLUMN_WIDTHS) == widths
        assert await page.evaluate(WRAPPED_NUMBERS) == []
        assert ui.unexpected_errors(503) == []


async def test_the_page_shows_the_limits_the_aliases_and_the_context_lengths() -> None:
    emulator = Emulator()
    models = {
        "max_loaded": 2,
        "memory_budget": "20GiB",
        "aliases": {"fast": LLAMA, "quick": LLAMA, "smart": QWEN},
    }
    async with running(emulator, models=models) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#limits")).to_have_text(
            "Limits: at most 2 models loaded at once, within 21.5 GB "
            "(models.max_loaded, models.memory_budget)."
        )
        await expect(ui.row(LLAMA).locator(".aliases")).to_have_text("also: fast, quick")
        await expect(ui.row(QWEN).locator(".aliases")).to_have_text("also: smart")
        await expect(ui.row(QWEN_14B).locator(".aliases")).to_be_hidden()
        context = ui.row(QWEN).locator("td.context")
        await expect(context).to_have_text("up to 32k")
        await expect(context).to_have_attribute("title", "The model takes up to 32,768 tokens")
        await load(proxy, QWEN)
        await expect(context).to_have_text("4k of 32k")
        await expect(context).to_have_attribute(
            "title", "Loaded with a context of 4,096 tokens; the model takes up to 32,768 tokens"
        )
        assert ui.errors == []


async def test_when_lm_studio_is_unreachable_the_page_says_so_and_turns_off_what_cannot_work() -> (
    None
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    emulator = Emulator()
    async with proxy_for(url) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        await expect(page.locator("#upstream")).to_have_text("LM Studio unreachable")
        note = page.locator("#upstream-note")
        await expect(note).to_contain_text(f"LM Studio is unreachable at {url}")
        await expect(note).to_contain_text("nothing can be loaded or answered until it is back")
        switch = page.get_by_role("button", name="Switch", exact=True)
        send = page.get_by_role("button", name="Send")
        await expect(switch).to_have_attribute("aria-disabled", "true")
        await expect(send).to_have_attribute("aria-disabled", "true")
        chat_status = page.locator("#chat-status")
        await expect(chat_status).to_have_text(
            "LM Studio is unreachable: the chat can answer once it is back."
        )
        await switch.focus()  # a click on a button that says it is off is not even tried
        await page.keyboard.press("Enter")
        await expect(page.locator("#message")).to_have_text("LM Studio is unreachable.")
        # LM Studio comes up: the proxy sees it at its next try, the page at the `upstream` event.
        async with serve(emulator.app, port=port):
            await expect(note).to_be_hidden(timeout=8_000)
            await expect(page.locator("#upstream")).to_have_text("LM Studio reachable")
            await expect(switch).to_have_attribute("aria-disabled", "false")
            await expect(send).to_have_attribute("aria-disabled", "false")
            await expect(chat_status).to_have_text("")
            await expect(page.locator("#models-body tr")).to_have_count(len(emulator.catalog))
        assert ui.unexpected_errors(503) == []


async def test_the_usage_table_follows_requests_without_polling() -> None:
    """The usage table appears with the first request and is read again after each burst of
    `request` events, never on a timer."""
    emulator = Emulator(reply_tokens=5)
    async with running(emulator) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        card = page.locator("#usage-card")
        await expect(card).to_be_hidden()  # nothing used yet
        body = {"model": QWEN, "messages": MESSAGES}
        for _ in range(2):
            ok = await proxy.http.post("/v1/chat/completions", json=body)
            assert ok.status_code == 200
        prompt = ok.json()["usage"]["prompt_tokens"]
        unknown = await proxy.http.post("/v1/chat/completions", json={**body, "model": "nope"})
        assert unknown.status_code == 404
        await expect(card).to_be_visible()
        table = page.get_by_role("table", name=re.compile("per key since the proxy started"))
        row = table.locator('tbody tr[data-key="anonymous"]')
        await expect(row.get_by_role("rowheader")).to_have_text("anonymous")
        cells = row.locator("td")
        # Requests, errors, tokens in, tokens out, busy, queue wait.
        await expect(cells).to_have_text(
            ["3", "1", str(2 * prompt), "10", re.compile(r"s$"), re.compile(r"s$")]
        )
        await expect(cells.nth(1)).to_have_attribute("data-tone", "warn")
        reads = sum(url.endswith("/api/v1/usage") for url in ui.requests)
        assert 2 <= reads <= 4  # the snapshot's, then at most one per burst of requests
        await anyio.sleep(1.5)  # idle: no request, no read
        assert sum(url.endswith("/api/v1/usage") for url in ui.requests) == reads
        await page.set_viewport_size({"width": 360, "height": 800})
        assert await ui.horizontal_overflow() == 0  # the table scrolls, not the page
        assert ui.errors == []


async def test_a_named_key_that_is_not_an_admin_key_may_be_replaced() -> None:
    """A named key without `admin` gets 403 from management: the page says the key is not an
    admin key and offers to enter another, and an admin named key then connects."""
    emulator = Emulator()
    keys = [
        {"name": "alice", "key": API_KEY},
        {"name": "root", "key": ADMIN_KEY, "admin": True},
    ]
    async with running(emulator, auth={"keys": keys}) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        dialog = page.get_by_role("dialog", name="Admin key needed")
        await expect(dialog).to_contain_text("admin: true")
        await dialog.get_by_label("Admin key").fill(API_KEY)
        await dialog.get_by_label("Admin key").press("Enter")
        await expect(page.locator("#live")).to_have_text("the key is not an admin key")
        await expect(page.locator("#message")).to_contain_text("'alice' is not an admin key")
        await page.locator("#admin-key-button").click()
        await dialog.get_by_label("Admin key").fill(ADMIN_KEY)
        await dialog.get_by_label("Admin key").press("Enter")
        await expect(page.locator("#live")).to_have_text("connected")
        assert ui.unexpected_errors(401, 403) == []


async def test_simulate_page_shows_one_lane_per_policy_without_errors(tmp_path: Path) -> None:
    """`lmswitch simulate --html`: a self-contained page, one lane (a timeline of loaded models
    and the queue) per run, opened from a file with no console error and no network."""
    page_file = tmp_path / "simulate.html"
    argv = ["simulate", "--generate", "zipf", "--duration", "2h", "--max-loaded", "0"]
    assert main([*argv, "--memory-budget", "24GB", "--html", str(page_file)]) == 0
    async with browse(page_file.as_uri()) as ui:
        await ui.page.goto(page_file.as_uri())
        lanes = ui.page.locator(".lane")
        await expect(lanes).to_have_count(2)
        await expect(lanes.nth(0).locator("h2")).to_contain_text("lru, budget 24GB")
        await expect(lanes.nth(1).locator("h2")).to_contain_text("cost, budget 24GB")
        for n in range(2):
            assert await lanes.nth(n).locator("svg rect").count() > 10  # models' spans
            await expect(lanes.nth(n).locator("svg polyline")).to_have_count(1)  # the queue
        await expect(ui.page.locator("tbody tr")).to_have_count(2)
        assert ui.errors == []
        assert all(url.startswith("file://") for url in ui.requests)


async def test_the_memory_meter_shows_the_capacity_learned_from_lm_studio() -> None:
    """With `memory_budget: auto`, no bar until LM Studio refuses a load; then the bar is drawn
    against the capacity learned, marked as learned, and says how it was learned."""
    emulator = Emulator(memory_bytes=10_000_000_000)  # the 14B (8.99 GB) fits alone
    models = {"max_loaded": 0, "memory_budget": "auto"}
    async with running(emulator, models=models) as proxy, browse(proxy) as ui:
        await ui.open()
        page = ui.page
        await expect(page.locator("#live")).to_have_text("connected")
        host = ui.host("default")
        await expect(host.locator(".memory-text")).to_have_text("0 GB used, no budget")
        await expect(ui.memory_bar("default")).to_be_hidden()
        await expect(page.locator("#limits")).to_contain_text("nothing refused yet")
        await chat(proxy, QWEN)
        await chat(proxy, LLAMA)
        await chat(proxy, QWEN_14B)  # refused beside both: room is made, and it is served
        assert emulator.refusals == 1
        learned = "8.99 GB"  # the largest set that fitted: the 14B alone, once room was made
        await expect(host.locator(".memory-text")).to_have_text(f"8.99 GB of {learned} (learned)")
        meter = ui.memory_bar("default")
        await expect(meter).to_be_visible()
        await expect(meter).to_have_attribute("data-learned", "true")
        await expect(meter).to_have_attribute("title", re.compile("learned from LM Studio"))
        await expect(page.locator("#memory")).to_have_text(f"8.99 GB of {learned} (learned)")
        await expect(page.locator("#limits")).to_contain_text(f"within {learned} (learned")
        assert ui.unexpected_errors() == []
