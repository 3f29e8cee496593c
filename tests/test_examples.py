"""The README's client examples, run as written against the emulator behind the proxy.

Each example is taken from README.md, its `http://127.0.0.1:8000` replaced by the proxy's real
address, and run in a process of its own, as a user would run it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import httpx2
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from proxy.emulator import Emulator
from proxy.server import free_port
from tests.doc_capture import SETTINGS, SHOWN_URL
from tests.helpers import MESSAGES, Proxy, readme_block, running

REPLY = "Hello from the LM Studio emulator, a deterministic reply made of plain words that streams"
TOKENS = len(REPLY.split())  # the emulator's reply length (reply_tokens)
CHAT = {"model": "qwen2.5-7b-instruct", "messages": MESSAGES}


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    async with running(Emulator(reply_tokens=TOKENS), **SETTINGS) as proxy:
        yield proxy


def clean_env() -> dict[str, str]:
    """This process's environment without OpenAI or lmswitch settings, and this Python first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LMSWITCH_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


async def run(command: Sequence[str], proxy: Proxy) -> str:
    """Run `command` with the README's address replaced by the proxy's; its standard output."""
    command = [arg.replace(SHOWN_URL, proxy.url) for arg in command]
    with anyio.fail_after(20):
        result = await anyio.run_process(command, env=clean_env(), check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_ollama_example_lists_the_models_and_prints_the_reply(proxy: Proxy) -> None:
    """The ollama Python library, pointed at lmswitch, lists LM Studio's models and chats."""
    output = await run([sys.executable, "-c", readme_block("ollama")], proxy)
    names, reply = output.splitlines()
    assert "'qwen2.5-7b-instruct'" in names
    assert reply == REPLY


async def test_python_streaming_example_prints_the_reply_and_its_token_count(proxy: Proxy) -> None:
    output = await run([sys.executable, "-c", readme_block("python-stream")], proxy)
    assert output == f"{REPLY}\n({TOKENS} tokens)\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_example_answers_a_chat_completion(proxy: Proxy) -> None:
    output = await run(["sh", "-c", readme_block("curl")], proxy)
    assert f'"content": "{REPLY}"' in output.replace('":"', '": "')


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
async def test_openai_base_url_alone_points_the_sdk_at_the_proxy(proxy: Proxy) -> None:
    """`OpenAI()` with only OPENAI_BASE_URL and OPENAI_API_KEY set talks to lmswitch."""
    output = await run(["bash", "-c", readme_block("env")], proxy)
    assert "qwen2.5-7b-instruct" in output
    assert "gpt-4o-mini" in output  # one of the proxy's aliases: it was lmswitch that answered


async def test_readme_sdk_example_alternates_two_models(proxy: Proxy) -> None:
    """The first example of "Client examples" streams from two models in turn."""
    output = await run([sys.executable, "-c", readme_block("python-alternate")], proxy)
    assert output == f"{REPLY}\n{REPLY}\n"


async def test_anthropic_example_prints_the_reply(proxy: Proxy) -> None:
    """The anthropic SDK, its base URL without `/v1`, gets LM Studio's `/v1/messages` answer."""
    output = await run([sys.executable, "-c", readme_block("anthropic")], proxy)
    assert output == f"{REPLY}\n"


# The import names of the development group's packages (pyproject.toml), none of them needed by
# the README's demo command, `uv run --no-dev lmswitch demo`.
_DEV_ONLY = [
    *("openai", "anthropic", "pytest", "_pytest", "pytest_timeout", "coverage", "asgi_lifespan"),
    *("mypy", "ruff", "hypothesis", "playwright", "dockerfile_parse", "ollama"),
]
_WITHOUT_DEV = """
import sys

class NoDevPackages:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"{{name}} is a development package")
        return None

sys.meta_path.insert(0, NoDevPackages())
from proxy.cli import main
sys.exit(main(["demo", "--port", "{port}", "--load-delay", "0"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C cannot target one child on Windows")
async def test_the_demo_runs_without_the_development_packages() -> None:
    """`uv run --no-dev lmswitch demo` installs the runtime dependencies only: the demo must
    greet and answer with every development package unimportable."""
    port = free_port()
    script = _WITHOUT_DEV.format(blocked=set(_DEV_ONLY), port=port)
    async with await anyio.open_process([sys.executable, "-c", script], env=clean_env()) as process:
        assert process.stdout is not None
        with anyio.fail_after(15):
            greeting = await BufferedByteReceiveStream(process.stdout).receive_until(
                b"Press Ctrl+C to stop.", max_bytes=2**16
            )
        assert b"lmswitch demo: the proxy at" in greeting
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            response = await http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await process.wait() == 0
