"""Usage figures read on the side of a relayed body, whatever the API's shape."""

from __future__ import annotations

import json

from proxy.streaming import UsageScanner


def scan(chunks: list[bytes], *, sse: bool) -> tuple[int | None, int | None]:
    scanner = UsageScanner(sse)
    for chunk in chunks:
        scanner.feed(chunk)
    scanner.finish()
    return scanner.prompt, scanner.completion


def test_openai_usage_chunk_split_across_reads() -> None:
    final = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":11}}\n\n'
    body = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n' + final + b"data: [DONE]\n\n"
    chunks = [body[i : i + 9] for i in range(0, len(body), 9)]
    assert scan(chunks, sse=True) == (7, 11)


def test_anthropic_usage_is_cumulative() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}
    delta = {"type": "message_delta", "usage": {"output_tokens": 9}}
    body = b"".join(
        b"event: x\ndata: " + json.dumps(doc).encode() + b"\n\n" for doc in (start, delta)
    )
    assert scan([body], sse=True) == (5, 9)


def test_responses_api_usage_sits_under_response() -> None:
    done = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 3, "output_tokens": 4}},
    }
    assert scan([b"data: " + json.dumps(done).encode() + b"\n\n"], sse=True) == (3, 4)


def test_whole_answer_usage_without_parsing_the_rest() -> None:
    body = {"data": [{"embedding": [0.1] * 1000}], "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    raw = json.dumps(body).encode()
    assert scan([raw[:100], raw[100:]], sse=False) == (2, None)


def test_garbage_is_ignored() -> None:
    assert scan([b'data: {"usage": nope}\n\n', b"data: [1]\n\n"], sse=True) == (None, None)
    assert scan([b'{"usage": {bad'], sse=False) == (None, None)
    assert scan([b"[]"], sse=False) == (None, None)
