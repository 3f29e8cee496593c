"""Model names (docs/design.md §3.4): the pure functions (no catalogue read, no scheduler run),
then what a client sees end to end (a name that differs in case, an unknown one)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from proxy.config import ModelsSettings
from proxy.emulator import Emulator
from proxy.errors import BadRequestError
from proxy.names import KNOWN_SHOWN, Resolved, find, not_found, requested, routable, suggestions
from proxy.scheduling import Model, Phase
from tests.helpers import LLAMA, MESSAGES, NOMIC, QWEN, running

CATALOG = [QWEN, LLAMA]
QWEN_14B = "qwen2.5-14b-instruct"
# The emulator's catalogue, as `routable` lists it with one alias.
KNOWN = [
    "google/gemma-3-4b",
    LLAMA,
    "openai/gpt-oss-20b",
    QWEN_14B,
    QWEN,
    NOMIC,
    "gpt-4o-mini",
]


def test_requested_applies_the_default_then_the_alias() -> None:
    models = ModelsSettings(default="fast", aliases={"fast": LLAMA})
    assert requested(None, models) == ("fast", LLAMA)
    assert requested(QWEN, models) == (QWEN, QWEN)


@pytest.mark.parametrize("name", [None, "", 42, ["x"]])
def test_requested_refuses_no_name_or_a_name_that_is_not_a_string(name: object) -> None:
    with pytest.raises(BadRequestError) as raised:
        requested(name, ModelsSettings())
    assert raised.value.param == "model"


def test_find_knows_keys_then_loaded_instance_ids() -> None:
    loaded = {
        QWEN: Model(QWEN, phase=Phase.READY, instance_id=f"{QWEN}:2", duplicates=[f"{QWEN}:3"])
    }
    assert find(QWEN, CATALOG, loaded.values(), {}) == Resolved(QWEN, QWEN)
    # The request goes to the instance it names.
    assert find(f"{QWEN}:2", CATALOG, loaded.values(), {}) == Resolved(QWEN, f"{QWEN}:2")
    assert find(f"{QWEN}:3", CATALOG, loaded.values(), {}) == Resolved(QWEN, f"{QWEN}:3")
    assert find(f"{LLAMA}:2", CATALOG, loaded.values(), {}) is None
    assert find("gpt-4o", CATALOG, loaded.values(), {}) is None


def test_find_takes_a_name_that_differs_only_in_case_as_the_model_it_spells() -> None:
    """LM Studio's keys are lowercase; the name sent upstream is the key, not the client's."""
    aliases = {"gpt-4o-mini": LLAMA}
    assert find("Qwen2.5-7B-Instruct", CATALOG, [], aliases) == Resolved(QWEN, QWEN)
    assert find("GPT-4o-Mini", CATALOG, [], aliases) == Resolved(LLAMA, LLAMA)
    # Case is all it forgives: punctuation or a missing part is another name.
    assert find("qwen2.5_7b_instruct", CATALOG, [], aliases) is None
    assert find("qwen2.5-7b", CATALOG, [], aliases) is None


def test_find_takes_a_name_that_spells_two_names_but_for_case_as_neither() -> None:
    aliases = {"Fast": QWEN, "fast": LLAMA}
    assert find("FAST", CATALOG, [], aliases) is None
    assert find("fast", CATALOG, [], aliases) is None  # the alias itself is `requested`'s
    # Two spellings of one model are one model.
    assert find("SLOW", CATALOG, [], {"Slow": QWEN, "slow": QWEN}) == Resolved(QWEN, QWEN)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen2.5-7B-Instruct", [QWEN]),  # case
        ("qwen2.5_7b_instruct", [QWEN]),  # punctuation
        ("qwen2.5-7b", [QWEN]),  # a part of it: not the 14B, which it is not part of
        ("qwen2.5:7b", [QWEN]),  # Ollama's spelling
        ("lmstudio-community/Qwen2.5-7B-Instruct-GGUF", [QWEN]),  # it is part of the name
        ("qwen2.5-7b-instrcut", [QWEN]),  # a typo
        ("qwen2.5", [QWEN, QWEN_14B]),  # two as alike, the more alike first
        ("gemma", ["google/gemma-3-4b"]),  # after a publisher
        ("gpt-4o", ["gpt-4o-mini"]),  # aliases too
        ("nomic", [NOMIC]),  # embedding models too
        ("mistral", []),
        ("x", []),
        ("", []),
        ("q" * 1000, []),  # compared with nothing
    ],
)
def test_suggestions_compare_names_without_case_and_punctuation(
    name: str, expected: list[str]
) -> None:
    assert suggestions(name, KNOWN) == expected


def test_not_found_suggests_and_lists_keys_with_embeddings_then_aliases() -> None:
    error = not_found("qwen2.5-7b", KNOWN)
    assert error.code == "model_not_found"
    assert error.param == "model"
    assert error.message == (
        "The model 'qwen2.5-7b' does not exist; did you mean 'qwen2.5-7b-instruct'? "
        f"Known models: {', '.join(KNOWN)}."
    )
    assert not_found("qwen2.5", KNOWN).message.startswith(
        f"The model 'qwen2.5' does not exist; did you mean {QWEN!r} or {QWEN_14B!r}? "
    )


def test_not_found_lists_the_first_known_names_and_says_how_many_more() -> None:
    known = [f"m{i:02}" for i in range(KNOWN_SHOWN + 4)]
    error = not_found("zzz", known)
    shown = ", ".join(known[:KNOWN_SHOWN])
    assert error.message == (
        f"The model 'zzz' does not exist. Known models: {shown} "
        "(and 4 more: GET /v1/models lists them all)."
    )
    assert not_found("zzz", []).message == (
        "The model 'zzz' does not exist. LM Studio lists no models."
    )


def test_not_found_cuts_a_long_name() -> None:
    error = not_found("x" * 300, ["m0"])
    assert "x" * 100 + "..." in error.message
    assert "x" * 101 not in error.message


def test_routable_lists_keys_then_aliases_of_known_models() -> None:
    aliases = {"fast": LLAMA, "gone": "no-such-model", QWEN: LLAMA}  # the last shadows a key
    assert routable(CATALOG, aliases) == [(LLAMA, LLAMA), (QWEN, QWEN), ("fast", LLAMA)]


# --- end to end -------------------------------------------------------------------------------


async def test_an_unknown_name_gets_a_404_that_suggests_the_closest_and_lists_every_kind() -> None:
    """The 404 says which known name was meant, and lists embedding models and aliases too,
    in OpenAI's envelope on /v1/chat/completions and Anthropic's on /v1/messages."""
    emulator = Emulator()
    async with running(emulator, models={"aliases": {"gpt-4o-mini": QWEN}}) as proxy:
        with pytest.raises(openai.NotFoundError) as caught:
            await proxy.sdk.chat.completions.create(model="qwen2.5-7b", messages=MESSAGES)
        assert caught.value.code == "model_not_found"
        assert caught.value.param == "model"
        message = caught.value.response.json()["error"]["message"]
        assert message.startswith(
            "The model 'qwen2.5-7b' does not exist; did you mean 'qwen2.5-7b-instruct'? "
            "Known models: "
        )
        assert message.endswith(f", {NOMIC}, gpt-4o-mini.")
        async with anthropic.AsyncAnthropic(
            base_url=proxy.url, api_key="unused", max_retries=0
        ) as claude:
            with pytest.raises(anthropic.NotFoundError) as refused:
                await claude.messages.create(model="gpt-4o", max_tokens=8, messages=MESSAGES)
        body = refused.value.response.json()
        assert body == {
            "type": "error",
            "error": {"type": "not_found_error", "message": body["error"]["message"]},
        }
        assert "; did you mean 'gpt-4o-mini'? " in body["error"]["message"]
    assert emulator.load_count() == 0


async def test_a_name_that_differs_only_in_case_is_served_by_its_model() -> None:
    """`Qwen2.5-7B-Instruct` is `qwen2.5-7b-instruct`, and LM Studio is sent the key."""
    emulator = Emulator()
    async with running(emulator) as proxy:
        reply = await proxy.sdk.chat.completions.create(
            model="Qwen2.5-7B-Instruct", messages=MESSAGES
        )
        assert reply.model == QWEN
        status = await proxy.status()
        assert status["loaded"] == [QWEN]
    (sent,) = [call for call in emulator.calls if call.path == "/v1/chat/completions"]
    assert sent.body is not None
    assert sent.body["model"] == QWEN
    assert emulator.load_count(QWEN) == 1
