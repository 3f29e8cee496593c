"""Response bodies and SSE frames of the emulator's OpenAI Responses and Anthropic Messages APIs.

Pure functions, like `proxy.emulator.replies`, whose `Reply`, `Frame` and framing they use.
"""

from __future__ import annotations

import time

from proxy.emulator.replies import Body, Frame, Reply, random_id, sse

# --- OpenAI Responses --------------------------------------------------------------------------


def _response(reply: Reply, ids: tuple[str, str, int], *, done: bool) -> Body:
    response_id, item_id, created = ids
    status = ("incomplete" if reply.truncated else "completed") if done else "in_progress"
    usage = {
        "input_tokens": reply.prompt_tokens,
        "output_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and reply.truncated else None,
        "model": reply.model,
        "output": [_output_item(reply, item_id)] if done else [],
        "previous_response_id": None,
        "usage": usage if done else None,
    }


def _output_text(text: str) -> Body:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _output_item(reply: Reply, item_id: str, *, done: bool = True) -> Body:
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [_output_text(reply.text)] if done else [],
    }


def response_body(reply: Reply, _extras: Body | None) -> Body:
    """A non-streamed Responses API object."""
    return _response(reply, _response_ids(), done=True)


def _response_ids() -> tuple[str, str, int]:
    return random_id("resp_"), random_id("msg_"), int(time.time())


def response_frames(reply: Reply, _include_usage: bool) -> list[Frame]:
    """Responses API events, `event:` + `data:` framed, `response.created` to `.completed`."""
    ids = _response_ids()
    item_id = ids[1]
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[tuple[str, Body, bool]] = [
        ("response.created", {"response": _response(reply, ids, done=False)}, False),
        ("response.in_progress", {"response": _response(reply, ids, done=False)}, False),
        (
            "response.output_item.added",
            {"output_index": 0, "item": _output_item(reply, item_id, done=False)},
            False,
        ),
        ("response.content_part.added", where | {"part": _output_text("")}, False),
        *(
            ("response.output_text.delta", where | {"delta": piece, "logprobs": []}, True)
            for piece in reply.pieces
        ),
        ("response.output_text.done", where | {"text": reply.text, "logprobs": []}, False),
        ("response.content_part.done", where | {"part": _output_text(reply.text)}, False),
        (
            "response.output_item.done",
            {"output_index": 0, "item": _output_item(reply, item_id)},
            False,
        ),
        ("response.completed", {"response": _response(reply, ids, done=True)}, False),
    ]
    return [
        sse({"type": name, "sequence_number": seq} | payload, event=name, content=content)
        for seq, (name, payload, content) in enumerate(events)
    ]


# --- Anthropic Messages ------------------------------------------------------------------------


def _message(reply: Reply, message_id: str, *, done: bool) -> Body:
    stop_reason = ("max_tokens" if reply.truncated else "end_turn") if done else None
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": reply.text}] if done else [],
        "model": reply.model,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.prompt_tokens,
            "output_tokens": reply.completion_tokens if done else 0,
        },
    }


def message_body(reply: Reply, _extras: Body | None) -> Body:
    """A non-streamed Anthropic `message`."""
    return _message(reply, random_id("msg_", 21), done=True)


def message_frames(reply: Reply, _include_usage: bool) -> list[Frame]:
    """Anthropic events, from `message_start` to `message_stop`."""
    start = _message(reply, random_id("msg_", 21), done=False)
    block = {"type": "text", "text": ""}
    events: list[tuple[str, Body, bool]] = [
        ("message_start", {"message": start}, False),
        ("content_block_start", {"index": 0, "content_block": block}, False),
        *(
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}}, True)
            for p in reply.pieces
        ),
        ("content_block_stop", {"index": 0}, False),
        (
            "message_delta",
            {
                "delta": {
                    "stop_reason": "max_tokens" if reply.truncated else "end_turn",
                    "stop_sequence": None,
                },
                "usage": {"output_tokens": reply.completion_tokens},
            },
            False,
        ),
        ("message_stop", {}, False),
    ]
    return [
        sse({"type": name} | payload, event=name, content=content)
        for name, payload, content in events
    ]
