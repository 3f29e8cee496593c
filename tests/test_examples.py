"""The README's client examples, run as written against the emulator behind the proxy.

Each example is taken from README.md, its `http://127.0.0.1:8000` replaced by the proxy's real
address, and run in a process of its own, as a user would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest

from proxy.emulator import Emulator
from tests.doc_capture import SETTINGS, SHOWN_URL
from tests.helpers import Proxy, readme, readme_block, running

REPLY = "Hello from the LM Studio emulator, a deterministic reply made of plain words that streams"
TOKENS = len(REPLY.split())  # the emulator's reply length (reply_tokens)


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


async def test_python_example_prints_the_reply(proxy: Proxy) -> None:
    output = await run([sys.executable, "-c", readme_block("python")], proxy)
    assert output == f"{REPLY}\n"


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
    """The first example in the README ("Point the openai SDK at it") streams from both."""
    match = re.search(r"## Point the openai SDK at it\n.*?```python\n(.*?)```", readme(), re.DOTALL)
    assert match is not None
    output = await run([sys.executable, "-c", match[1]], proxy)
    assert output == f"{REPLY}\n{REPLY}\n"
