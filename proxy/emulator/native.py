"""Response bodies and SSE frames of the emulator's OpenAI Responses and Anthropic Messages APIs.

Pure functions, like `proxy.emulator.replies`, whose `Reply`, `Frame` and framing they use.
"""

from __future__ import annotations

import time

from proxy.emulator.replies import Body, Frame, Reply, random_id, sse
from proxy.emulator.tools import ToolCall

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
    if reply.call is not None:  # [INFERRED] OpenAI's function_call item, with LM Studio's ids
        return {
            "id": item_id,
            "type": "function_call",
            "status": "completed" if done else "in_progress",
            "call_id": reply.call.id,
            "name": reply.call.name,
            "arguments": reply.call.arguments if done else "",
        }
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [_output_text(reply.text)] if done else [],
    }


def response_body(reply: Reply, _extras: Body | None) -> Body:
    """A non-streamed Responses API object."""
    return _response(reply, _response_ids(reply), done=True)


def _response_ids(reply: Reply) -> tuple[str, str, int]:
    item_id = random_id("fc_" if reply.call is not None else "msg_")
    return random_id("resp_"), item_id, int(time.time())


def response_frames(reply: Reply, _include_usage: bool) -> list[Frame]:
    """Responses API events, `event:` + `data:` framed, `response.created` to `.completed`."""
    ids = _response_ids(reply)
    item_id = ids[1]
    events: list[tuple[str, Body, bool]] = [
        ("response.created", {"response": _response(reply, ids, done=False)}, False),
        ("response.in_progress", {"response": _response(reply, ids, done=False)}, False),
        (
            "response.output_item.added",
            {"output_index": 0, "item": _output_item(reply, item_id, done=False)},
            reply.call is not None,  # a call's name is its first token
        ),
        *(
            _call_events(reply.call, item_id)
            if reply.call is not None
            else _text_events(reply, item_id)
        ),
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


def _text_events(reply: Reply, item_id: str) -> list[tuple[str, Body, bool]]:
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    return [
        ("response.content_part.added", where | {"part": _output_text("")}, False),
        *(
            ("response.output_text.delta", where | {"delta": piece, "logprobs": []}, True)
            for piece in reply.pieces
        ),
        ("response.output_text.done", where | {"text": reply.text, "logprobs": []}, False),
        ("response.content_part.done", where | {"part": _output_text(reply.text)}, False),
    ]


def _call_events(call: ToolCall, item_id: str) -> list[tuple[str, Body, bool]]:
    where = {"item_id": item_id, "output_index": 0}
    done = {"name": call.name, "arguments": call.arguments}
    return [
        *(
            ("response.function_call_arguments.delta", where | {"delta": piece}, True)
            for piece in call.fragments
        ),
        ("response.function_call_arguments.done", where | done, False),
    ]


# --- Anthropic Messages ------------------------------------------------------------------------


def _stop_reason(reply: Reply) -> str:
    if reply.call is not None:
        return "tool_use"
    return "max_tokens" if reply.truncated else "end_turn"


def _block(reply: Reply, *, done: bool) -> Body:
    """The message's one content block: its text, or its `tool_use` (LM Studio's numeric id)."""
    if reply.call is not None:
        call = reply.call
        return {
            "type": "tool_use",
            "id": call.id,
            "name": call.name,
            "input": call.input if done else {},
        }
    return {"type": "text", "text": reply.text if done else ""}


def _message(reply: Reply, message_id: str, *, done: bool) -> Body:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [_block(reply, done=True)] if done else [],
        "model": reply.model,
        "stop_reason": _stop_reason(reply) if done else None,
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
    if reply.call is not None:
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in reply.call.fragments]
    else:
        deltas = [{"type": "text_delta", "text": p} for p in reply.pieces]
    events: list[tuple[str, Body, bool]] = [
        ("message_start", {"message": start}, False),
        (
            "content_block_start",
            {"index": 0, "content_block": _block(reply, done=False)},
            reply.call is not None,  # a call's name is its first token
        ),
        *(("content_block_delta", {"index": 0, "delta": delta}, True) for delta in deltas),
        ("content_block_stop", {"index": 0}, False),
        (
            "message_delta",
            {
                "delta": {"stop_reason": _stop_reason(reply), "stop_sequence": None},
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
