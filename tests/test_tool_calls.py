"""Tool calls through the proxy: the real openai and anthropic SDKs, the emulator behind it.

Each family calls the tool its request asks for, streamed and not, with arguments built from the
tool's schema, then answers the tool's result in words (docs/design.md §5.5).
"""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from openai.types.responses import FunctionToolParam, ResponseInputParam

from proxy.emulator import Emulator
from tests.helpers import QWEN, Proxy, running

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "hourly": {"type": "boolean"},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": "string"},  # not required: left out
    },
    "required": ["city", "unit", "days", "hourly", "where", "tags"],
}
# What the emulator fills the required properties with, by type.
WEATHER_ARGUMENTS = {
    "city": "example",
    "unit": "celsius",
    "days": 1,
    "hourly": True,
    "where": {"lat": 1, "lon": 1},
    "tags": [],
}
TIME_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
QUESTION = "What is the weather like in Paris?"
RESULT = '{"temperature": 21}'
TOOL_ID = re.compile(r"[0-9]{9}")  # LM Studio's ids: plain numbers

CHAT_TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}},
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
]
RESPONSE_TOOLS: list[FunctionToolParam] = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA, "strict": False},
]
ANTHROPIC_TOOLS: list[anthropic.types.ToolParam] = [
    {"name": "get_weather", "description": "The weather", "input_schema": WEATHER_SCHEMA},
]


def anthropic_client(proxy: Proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key="sk-test", max_retries=0, timeout=10
    )


# --- chat completions --------------------------------------------------------------------------


async def test_chat_completion_calls_the_named_tool_then_answers_its_result() -> None:
    """A named tool_choice gets that tool's call, finish_reason tool_calls; its result, words."""
    async with running(Emulator()) as proxy:
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
        first = await proxy.sdk.chat.completions.create(
            model=QWEN,
            messages=messages,
            tools=CHAT_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls is not None
        [call] = choice.message.tool_calls
        assert call.type == "function"
        assert TOOL_ID.fullmatch(call.id)
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == WEATHER_ARGUMENTS
        assert first.usage is not None
        assert first.usage.completion_tokens > 1

        messages += [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": RESULT},
        ]
        second = await proxy.sdk.chat.completions.create(
            model=QWEN, messages=messages, tools=CHAT_TOOLS
        )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content
    assert not second.choices[0].message.tool_calls


async def test_chat_completion_calls_the_first_tool_when_one_is_required() -> None:
    """tool_choice "required" calls the first tool offered: here one without parameters."""
    async with running(Emulator()) as proxy:
        completion = await proxy.sdk.chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": QUESTION}],
            tools=CHAT_TOOLS,
            tool_choice="required",
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_time", "{}")


async def test_chat_completion_under_auto_calls_the_tool_the_user_names() -> None:
    """Under tool_choice auto (the default), naming a tool calls it; naming none gets words."""
    async with running(Emulator()) as proxy:
        named = await proxy.sdk.chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": "Use get_weather for Paris"}],
            tools=CHAT_TOOLS,
        )
        unnamed = await proxy.sdk.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": QUESTION}], tools=CHAT_TOOLS
        )
    assert named.choices[0].finish_reason == "tool_calls"
    assert named.choices[0].message.tool_calls is not None
    assert named.choices[0].message.tool_calls[0].type == "function"
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert unnamed.choices[0].finish_reason == "stop"
    assert unnamed.choices[0].message.content


async def test_streamed_chat_sends_the_call_in_delta_fragments() -> None:
    """A streamed call: id, type and name with empty arguments first, then argument fragments,
    then finish_reason tool_calls, the usage chunk and the end of the stream."""
    async with running(Emulator()) as proxy:
        stream = await proxy.sdk.chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": QUESTION}],
            tools=CHAT_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    calls = [call for delta in deltas for call in delta.tool_calls or []]
    opening, *pieces = calls
    assert opening.index == 0
    assert opening.id is not None
    assert TOOL_ID.fullmatch(opening.id)
    assert opening.type == "function"
    assert opening.function is not None
    assert (opening.function.name, opening.function.arguments) == ("get_weather", "")
    assert len(pieces) > 1  # the arguments come in pieces
    assert all(piece.index == 0 and piece.id is None for piece in pieces)
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function is not None)
    assert json.loads(arguments) == WEATHER_ARGUMENTS
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "tool_calls"
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(calls)


async def test_the_sdks_stream_helper_accumulates_a_strict_call() -> None:
    """The openai SDK's chat stream helper puts the call together and parses its arguments."""
    strict: ChatCompletionToolParam = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
    async with (
        running(Emulator()) as proxy,
        proxy.sdk.chat.completions.stream(
            model=QWEN,
            messages=[{"role": "user", "content": QUESTION}],
            tools=[strict],
            tool_choice="required",
        ) as stream,
    ):
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.parsed_arguments == {"city": "example", "unit": "celsius"}


async def test_tool_choice_none_answers_in_words() -> None:
    """tool_choice none never calls a tool, even one the user names."""
    async with running(Emulator()) as proxy:
        completion = await proxy.sdk.chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": "Use get_weather"}],
            tools=CHAT_TOOLS,
            tool_choice="none",
        )
    assert completion.choices[0].finish_reason == "stop"
    assert not completion.choices[0].message.tool_calls


# --- Responses API -----------------------------------------------------------------------------


async def test_responses_api_calls_the_tool_then_answers_its_output() -> None:
    """/v1/responses: a `function_call` output item, then words for its output."""
    async with running(Emulator()) as proxy:
        first = await proxy.sdk.responses.create(
            model=QWEN, input=QUESTION, tools=RESPONSE_TOOLS, tool_choice="required"
        )
        assert first.status == "completed"
        [item] = first.output
        assert item.type == "function_call"
        assert item.name == "get_weather"
        assert TOOL_ID.fullmatch(item.call_id)
        assert json.loads(item.arguments) == WEATHER_ARGUMENTS
        assert first.output_text == ""

        turns: ResponseInputParam = [
            {"role": "user", "content": QUESTION},
            {
                "type": "function_call",
                "call_id": item.call_id,
                "name": item.name,
                "arguments": item.arguments,
            },
            {"type": "function_call_output", "call_id": item.call_id, "output": RESULT},
        ]
        second = await proxy.sdk.responses.create(model=QWEN, input=turns, tools=RESPONSE_TOOLS)
    assert second.output[0].type == "message"
    assert second.output_text


async def test_responses_api_streams_the_call_as_function_call_events() -> None:
    """Streamed: output_item.added, function_call_arguments.delta and .done, output_item.done,
    response.completed; the SDK's stream helper puts the call together."""
    async with running(Emulator()) as proxy:
        stream = await proxy.sdk.responses.create(
            model=QWEN,
            input=QUESTION,
            tools=RESPONSE_TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            stream=True,
        )
        events = [event async for event in stream]
        async with proxy.sdk.responses.stream(
            model=QWEN, input=QUESTION, tools=RESPONSE_TOOLS, tool_choice="required"
        ) as helper:
            final = await helper.get_final_response()
    kinds = [event.type for event in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert len(deltas) > 1
    added, done = events[2], events[-2]
    assert added.type == "response.output_item.added"
    assert done.type == "response.output_item.done"
    assert added.item.type == done.item.type == "function_call"
    assert added.item.id == done.item.id
    assert added.item.call_id == done.item.call_id
    assert (added.item.name, added.item.arguments) == ("get_weather", "")
    assert json.loads("".join(deltas)) == WEATHER_ARGUMENTS
    assert done.item.arguments == "".join(deltas)
    [item] = final.output
    assert item.type == "function_call"
    assert item.name == "get_weather"
    assert json.loads(item.arguments) == WEATHER_ARGUMENTS


# --- Anthropic Messages ------------------------------------------------------------------------


async def test_messages_api_uses_a_tool_then_answers_its_result() -> None:
    """/v1/messages with tool_choice any: a tool_use block, stop_reason tool_use; then words."""
    async with running(Emulator()) as proxy, anthropic_client(proxy) as client:
        first = await client.messages.create(
            model=QWEN,
            max_tokens=256,
            messages=[{"role": "user", "content": QUESTION}],
            tools=ANTHROPIC_TOOLS,
            tool_choice={"type": "any"},
        )
        assert first.stop_reason == "tool_use"
        [block] = first.content
        assert block.type == "tool_use"
        assert TOOL_ID.fullmatch(block.id)
        assert block.name == "get_weather"
        assert block.input == WEATHER_ARGUMENTS

        use: anthropic.types.ToolUseBlockParam = {
            "type": "tool_use",
            "id": block.id,
            "name": block.name,
            "input": block.input,
        }
        result: anthropic.types.ToolResultBlockParam = {
            "type": "tool_result",
            "tool_use_id": block.id,
            "content": RESULT,
        }
        second = await client.messages.create(
            model=QWEN,
            max_tokens=256,
            messages=[
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": [use]},
                {"role": "user", "content": [result]},
            ],
            tools=ANTHROPIC_TOOLS,
            tool_choice={"type": "any"},  # a tool's result is answered in words all the same
        )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"
    assert second.content[0].text


async def test_messages_api_streams_tool_use_as_input_json_deltas() -> None:
    """Streamed: a tool_use block with empty input, input_json_delta fragments, stop_reason
    tool_use; the anthropic SDK's stream puts the input together."""
    async with (
        running(Emulator()) as proxy,
        anthropic_client(proxy) as client,
        client.messages.stream(
            model=QWEN,
            max_tokens=256,
            messages=[{"role": "user", "content": QUESTION}],
            tools=ANTHROPIC_TOOLS,
            tool_choice={"type": "tool", "name": "get_weather"},
        ) as stream,
    ):
        events = [event async for event in stream]
        final = await stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert len(starts) == 1
    assert starts[0].content_block.type == "tool_use"
    assert starts[0].content_block.input == {}
    pieces = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert len(pieces) > 1
    assert json.loads("".join(pieces)) == WEATHER_ARGUMENTS
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert block.input == WEATHER_ARGUMENTS
