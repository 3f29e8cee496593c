"""Model names (docs/design.md §3.4), as pure functions: no catalogue read, no scheduler run."""

from __future__ import annotations

import pytest

from proxy.config import ModelsSettings
from proxy.errors import BadRequestError
from proxy.names import find_key, not_found, requested, routable
from proxy.scheduling import Model, Phase
from tests.helpers import LLAMA, QWEN

CATALOG = [QWEN, LLAMA]


def test_requested_applies_the_default_then_the_alias() -> None:
    models = ModelsSettings(default="fast", aliases={"fast": LLAMA})
    assert requested(None, models) == ("fast", LLAMA)
    assert requested(QWEN, models) == (QWEN, QWEN)


@pytest.mark.parametrize("name", [None, "", 42, ["x"]])
def test_requested_refuses_no_name_or_a_name_that_is_not_a_string(name: object) -> None:
    with pytest.raises(BadRequestError) as raised:
        requested(name, ModelsSettings())
    assert raised.value.param == "model"


def test_find_key_knows_keys_then_loaded_instance_ids() -> None:
    loaded = {
        QWEN: Model(QWEN, phase=Phase.READY, instance_id=f"{QWEN}:2", duplicates=[f"{QWEN}:3"])
    }
    assert find_key(QWEN, CATALOG, loaded.values()) == QWEN
    assert find_key(f"{QWEN}:2", CATALOG, loaded.values()) == QWEN  # the proxy's instance
    assert find_key(f"{QWEN}:3", CATALOG, loaded.values()) == QWEN  # a duplicate
    assert find_key(f"{LLAMA}:2", CATALOG, loaded.values()) is None
    assert find_key("gpt-4o", CATALOG, loaded.values()) is None


def test_not_found_names_a_few_known_models_and_cuts_a_long_name() -> None:
    error = not_found("x" * 300, [f"m{i}" for i in range(9)])
    assert error.code == "model_not_found"
    assert "Known models include: m0, m1, m2, m3, m4." in error.message
    assert "x" * 100 + "..." in error.message
    assert "x" * 101 not in error.message


def test_routable_lists_keys_then_aliases_of_known_models() -> None:
    aliases = {"fast": LLAMA, "gone": "no-such-model", QWEN: LLAMA}  # the last shadows a key
    assert routable(CATALOG, aliases) == [(LLAMA, LLAMA), (QWEN, QWEN), ("fast", LLAMA)]
