"""Config parsing: defaults, duration and size syntax, sources and their priority, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from proxy.cli import main
from proxy.config import (
    ConfigError,
    HostSettings,
    LoadOptions,
    NamedKey,
    Settings,
    UpstreamHost,
    describe_settings,
    load_settings,
)
from proxy.units import ByteSize, Seconds

REPO_ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30

seconds = TypeAdapter(Seconds)
byte_size = TypeAdapter(ByteSize)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None = None, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **overrides)
    return str(info.value)


# --- defaults and the shipped file ------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    s = Settings()
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000)
    assert s.server.max_body_bytes == 10 * 1024 * 1024
    assert s.server.drain_timeout == 30
    assert (s.server.header_timeout, s.server.max_connections) == (30, 1000)
    assert s.upstream.base_url == "http://127.0.0.1:1234"
    assert s.upstream.api_token is None
    assert s.upstreams == ()
    assert (s.upstream.connect_timeout, s.upstream.read_timeout) == (5, 600)
    assert (s.upstream.load_timeout, s.upstream.poll_interval) == (300, 10)
    assert s.auth.api_keys == s.auth.admin_keys == ()
    assert s.models.default is None
    assert s.models.aliases == {}
    assert s.models.pinned == s.models.preload == ()
    assert s.models.max_loaded == 1
    assert s.models.memory_budget is None
    assert s.models.idle_ttl is None
    assert s.models.load_options == {}
    assert s.models.replicas == {}
    assert (s.scheduler.max_queue, s.scheduler.queue_timeout, s.scheduler.swap_grace) == (
        256,
        300,
        10,
    )
    assert s.scheduler.priority_aging == 30
    assert (s.logging.level, s.logging.format) == ("info", "text")


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.server.port = 1  # type: ignore[misc]  # the point: assignment is refused


def test_shipped_config_yaml_equals_defaults() -> None:
    loaded = load_settings(REPO_ROOT / "config.yaml")
    assert loaded == Settings()
    assert type(loaded) is Settings


def test_shipped_config_yaml_documents_every_key() -> None:
    data = yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))
    assert set(data) == set(Settings.model_fields)
    for section, value in data.items():
        model = Settings.model_fields[section].annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            assert set(value) == set(model.model_fields), section
    assert data["upstreams"] == []  # its keys are in the commented-out example


def test_shipped_config_yaml_example_pool_is_valid_and_shows_every_host_key(
    tmp_path: Path,
) -> None:
    text = (REPO_ROOT / "config.yaml").read_text(encoding="utf-8")
    commented = text[text.index("# upstreams:\n") :].splitlines()
    lines = [line.removeprefix("# ") for line in commented[: commented.index("")]]
    example = "\n".join(lines) + "\n"
    hosts = yaml.safe_load(example)["upstreams"]
    assert set().union(*hosts) == set(UpstreamHost.model_fields)
    assert [host.name for host in load_settings(write(tmp_path, example)).hosts()] == [
        "desk",
        "gpu",
    ]


def test_no_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings() == Settings()


@pytest.mark.parametrize("text", ["", "# only comments\n", "---\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    assert load_settings(write(tmp_path, text)) == Settings()


def test_section_with_every_key_commented_out_means_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  # port: 9000\nmodels:\n  aliases:\n  pinned:\n")
    assert load_settings(path) == Settings()


def test_yaml_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
server: {port: 9000, max_body_bytes: 1MiB, header_timeout: 500ms, max_connections: 64}
upstream: {base_url: "https://lmstudio.local:1234/", api_token: tok}
auth: {api_keys: [k1, k2]}
models:
  default: qwen
  aliases: {gpt-4o-mini: qwen}
  pinned: [embed]
  preload: [qwen, embed]
  max_loaded: 0
  memory_budget: 20GiB
  idle_ttl: 15m
  load_options:
    qwen: {context_length: 8192, flash_attention: true}
scheduler: {max_queue: 0, queue_timeout: 1h30m, swap_grace: 250ms, priority_aging: 2m}
logging: {level: DEBUG, format: json}
""",
    )
    s = load_settings(path)
    assert (s.server.port, s.server.max_body_bytes) == (9000, 1024 * 1024)
    assert (s.server.header_timeout, s.server.max_connections) == (0.5, 64)
    assert s.upstream.base_url == "https://lmstudio.local:1234"
    assert s.upstream.api_token is not None
    assert s.upstream.api_token.get_secret_value() == "tok"
    assert [k.get_secret_value() for k in s.auth.api_keys] == ["k1", "k2"]
    assert s.models.default == "qwen"
    assert s.models.aliases == {"gpt-4o-mini": "qwen"}
    assert (s.models.pinned, s.models.preload) == (("embed",), ("qwen", "embed"))
    assert s.models.max_loaded == 0
    assert s.models.memory_budget == 20 * 2**30
    assert s.models.idle_ttl == 900
    assert s.models.load_options["qwen"].as_body() == {
        "context_length": 8192,
        "flash_attention": True,
    }
    assert (s.scheduler.max_queue, s.scheduler.queue_timeout) == (0, 5400)
    assert s.scheduler.swap_grace == pytest.approx(0.25)
    assert s.scheduler.priority_aging == 120
    assert (s.logging.level, s.logging.format) == ("debug", "json")


def test_load_options_as_body_holds_only_set_fields() -> None:
    assert LoadOptions().as_body() == {}
    options = LoadOptions(
        context_length=4096,
        flash_attention=False,
        eval_batch_size=512,
        num_experts=2,
        offload_kv_cache_to_gpu=True,
    )
    assert options.as_body() == {
        "context_length": 4096,
        "flash_attention": False,
        "eval_batch_size": 512,
        "num_experts": 2,
        "offload_kv_cache_to_gpu": True,
    }


# --- durations and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("2.5", 2.5),
        ("250ms", 0.25),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        (" 10S ", 10.0),
    ],
    ids=repr,
)
def test_duration_syntax_accepted(raw: object, expected: float) -> None:
    assert seconds.validate_python(raw) == pytest.approx(expected)


@pytest.mark.parametrize(
    "raw",
    ["", "5 parsecs", "10 minutes", "1h30", "h", "-5s", "-1", -1, True, "inf", "nan", [1]],
    ids=repr,
)
def test_duration_syntax_rejected(raw: object) -> None:
    with pytest.raises(ValidationError):
        seconds.validate_python(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, 0),
        (512, 512),
        (1024.0, 1024),
        ("512", 512),
        ("512B", 512),
        ("100KB", 100_000),
        ("10MB", 10_000_000),
        ("24GB", 24_000_000_000),
        ("2TB", 2 * 10**12),
        ("1KiB", 1024),
        ("512MiB", 512 * 2**20),
        ("20GiB", 20 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1TiB", 2**40),
        ("20 gib", 20 * 2**30),
    ],
    ids=repr,
)
def test_size_syntax_accepted(raw: object, expected: int) -> None:
    assert byte_size.validate_python(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "lots", "20G", "20 GiBs", "GiB", "-1GiB", -1, 1.5, True, "1,024", [1]],
    ids=repr,
)
def test_size_syntax_rejected(raw: object) -> None:
    with pytest.raises(ValidationError):
        byte_size.validate_python(raw)


# --- errors name the key ----------------------------------------------------------------------


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    assert config_error(write(tmp_path, "bogus: 1\n")) == "bogus: unknown key"


def test_unknown_nested_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  prot: 9000\nmodels:\n  load_options: {q: {flash: true}}\n")
    assert config_error(path).splitlines() == [
        "server.prot: unknown key; did you mean server.port?",
        "models.load_options.q.flash: unknown key; did you mean "
        "models.load_options.q.flash_attention?",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {max_load: 2}", "models.max_load: unknown key; did you mean models.max_loaded?"),
        (
            "models: {Max_Loaded: 2}",
            "models.Max_Loaded: unknown key; did you mean models.max_loaded?",
        ),
        ("modles: {max_loaded: 2}", "modles: unknown key; did you mean models?"),
        (  # a key of another section
            "models: {queue_timeout: 5s}",
            "models.queue_timeout: unknown key; did you mean scheduler.queue_timeout?",
        ),
        (
            "upstreams: [{name: desk, base_url: 'http://a:1234', max_load: 1}]",
            "upstreams.0.max_load: unknown key; did you mean upstreams.0.max_loaded?",
        ),
        ("server: {colour: blue}", "server.colour: unknown key"),  # nothing close
    ],
)
def test_unknown_key_names_the_key_it_most_likely_meant(
    tmp_path: Path, text: str, message: str
) -> None:
    assert config_error(write(tmp_path, text)) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models: {pinned: qwen2.5-7b-instruct}",
            "models.pinned: should be a list of model names, e.g. [qwen2.5-7b-instruct] "
            "(got 'qwen2.5-7b-instruct')",
        ),
        ("models: {preload: 3}", "models.preload: should be a list of model names (got 3)"),
        ("models: {preload: {a: 1}}", "models.preload: should be a list of model names"),
        (
            "upstreams: 'http://a:1234'",
            "upstreams: should be a list of hosts, each a mapping with name and base_url "
            "(got 'http://a:1234')",
        ),
        ("models: {aliases: [fast]}", "models.aliases: should be a mapping of names to model keys"),
        (
            "models: {load_options: 3}",
            "models.load_options: should be a mapping of model keys to load options (got 3)",
        ),
        ("auth: {api_keys: sk-hidden}", "auth.api_keys: should be a list of keys"),  # not echoed
    ],
)
def test_a_list_or_mapping_of_the_wrong_shape_says_what_it_should_hold(
    tmp_path: Path, text: str, message: str
) -> None:
    assert config_error(write(tmp_path, text)) == message


def test_check_config_exits_2_with_the_key_meant_and_the_shape_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "models:\n  max_load: 2\n  pinned: qwen2.5-7b-instruct\n")
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[1:] == [
        "models.pinned: should be a list of model names, e.g. [qwen2.5-7b-instruct] "
        "(got 'qwen2.5-7b-instruct')",
        "models.max_load: unknown key; did you mean models.max_loaded?",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models: {idle_ttl: 5 parsecs}",
            "models.idle_ttl: invalid duration '5 parsecs' (use seconds or e.g. 90s, 15m, 2h)",
        ),
        (
            "models: {memory_budget: lots}",
            "models.memory_budget: invalid memory budget 'lots' (use auto, bytes or e.g. "
            "512MiB, 20GiB, 24GB)",
        ),
        (
            "upstreams: [{name: a, base_url: 'http://h:1', memory_budget: automatic}]",
            "upstreams.0.memory_budget: invalid memory budget 'automatic' (use auto, bytes or "
            "e.g. 512MiB, 20GiB, 24GB)",
        ),
        ("models: {max_loaded: -1}", "models.max_loaded: must be >= 0"),
        ("server: {drain_timeout: -1}", "server.drain_timeout: must be >= 0"),
        ("server: {header_timeout: 0}", "server.header_timeout: must be > 0.0"),
        (
            "server: {header_timeout: soon}",
            "server.header_timeout: invalid duration 'soon' (use seconds or e.g. 90s, 15m, 2h)",
        ),
        ("server: {max_connections: 0}", "server.max_connections: must be >= 1"),
        ("server: {port: 70000}", "server.port: must be <= 65535"),
        ("scheduler: {max_queue: -3}", "scheduler.max_queue: must be >= 0"),
        ("scheduler: {priority_aging: 0s}", "scheduler.priority_aging: must be > 0.0"),
        (
            "models: {load_options: {q: {context_length: 0}}}",
            "models.load_options.q.context_length: must be > 0",
        ),
        (
            "logging: {level: loud}",
            "logging.level: must be one of 'debug', 'info', 'warning', 'error' or 'critical'",
        ),
        (
            "server: {port: abc}",
            "server.port: input should be a valid integer, "
            "unable to parse string as an integer (got 'abc')",
        ),
        (
            "upstream: {base_url: 'ftp://x'}",
            "upstream.base_url: invalid URL 'ftp://x' (expected e.g. http://127.0.0.1:1234)",
        ),
        (
            "upstream: {base_url: 'http://'}",
            "upstream.base_url: invalid URL 'http://' (expected e.g. http://127.0.0.1:1234)",
        ),
        (
            "upstream: {base_url: 'http://h:99999'}",
            "upstream.base_url: invalid URL 'http://h:99999': Port out of range 0-65535",
        ),
        (
            "server: 5",
            "server: should be a mapping of keys (got 5)",
        ),
        (
            "upstreams: [{name: Desk!, base_url: 'http://a:1234'}]",
            "upstreams.0.name: invalid name 'Desk!' (1 to 32 of a-z, 0-9, _ and -)",
        ),
        (
            f"upstreams: [{{name: {'a' * 33}, base_url: 'http://a:1234'}}]",
            f"upstreams.0.name: invalid name '{'a' * 33}' (1 to 32 of a-z, 0-9, _ and -)",
        ),
        (
            "upstreams: [{name: desk, base_url: 'ftp://x'}]",
            "upstreams.0.base_url: invalid URL 'ftp://x' (expected e.g. http://127.0.0.1:1234)",
        ),
        (
            "upstreams: [{name: desk, base_url: 'http://a:1234', foo: 1}]",
            "upstreams.0.foo: unknown key",
        ),
        (
            "upstreams: [{name: desk, base_url: 'http://a:1234', max_loaded: -1}]",
            "upstreams.0.max_loaded: must be >= 0",
        ),
        ("upstreams: [{name: desk}]", "upstreams.0.base_url: field required"),
        ("models: {replicas: {q: 0}}", "models.replicas.q: must be >= 1"),
    ],
)
def test_invalid_value_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert config_error(write(tmp_path, text)) == message


def test_every_problem_is_reported_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "models: {max_loaded: -1, idle_ttl: soon}\nbogus: 1\n")
    lines = config_error(path).splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {
        "models.max_loaded",
        "models.idle_ttl",
        "bogus",
    }


def test_invalid_secret_is_not_echoed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "upstream: {api_token: [hunter2]}\nauth: {api_keys: [[sk-hidden]]}\n"
        "upstreams: [{name: desk, base_url: 'http://a:1234', api_token: [lm-hidden]}]\n",
    )
    message = config_error(path)
    assert "upstream.api_token" in message
    assert "auth.api_keys.0" in message
    assert "upstreams.0.api_token" in message
    assert "hunter2" not in message
    assert "sk-hidden" not in message
    assert "lm-hidden" not in message


def test_yaml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: [8000\n")
    message = config_error(path)
    assert message.startswith(f"{path}: invalid YAML")
    assert "\n" not in message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: the top level must be a mapping of keys, not {kind}"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"server: \xff\xfe\n")
    assert config_error(path).startswith(f"{path}: cannot read")


def test_missing_explicit_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert config_error(missing) == f"{missing}: no such file"


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    assert config_error(tmp_path) == f"{tmp_path}: is not a file"


# --- where the file comes from ----------------------------------------------------------------


def test_config_yaml_in_working_directory_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "server: {port: 9001}\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().server.port == 9001


def test_lmswitch_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "server: {port: 9001}\n")  # ignored: $LMSWITCH_CONFIG wins over ./config.yaml
    other = write(tmp_path, "server: {port: 9002}\n", name="other.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMSWITCH_CONFIG", str(other))
    assert load_settings().server.port == 9002


def test_explicit_path_wins_over_lmswitch_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMSWITCH_CONFIG", str(write(tmp_path, "server: {port: 1}\n", "a.yaml")))
    assert load_settings(write(tmp_path, "server: {port: 2}\n", "b.yaml")).server.port == 2


def test_missing_lmswitch_config_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "gone.yaml"
    monkeypatch.setenv("LMSWITCH_CONFIG", str(missing))
    assert config_error() == f"LMSWITCH_CONFIG={missing}: no such file"


# --- priority: init kwargs > environment > YAML > defaults ------------------------------------


def test_env_overrides_nested_keys_over_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        "upstream: {base_url: 'http://yaml:1234', read_timeout: 1m}\nmodels: {max_loaded: 3}\n",
    )
    monkeypatch.setenv("LMSWITCH_UPSTREAM__BASE_URL", "http://env:1234/")
    monkeypatch.setenv("LMSWITCH_MODELS__MAX_LOADED", "2")
    s = load_settings(path)
    assert s.upstream.base_url == "http://env:1234"
    assert s.upstream.read_timeout == 60  # the rest of the YAML section survives
    assert s.models.max_loaded == 2


def test_env_accepts_durations_sizes_json_lists_and_null(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSWITCH_MODELS__IDLE_TTL", "15m")
    monkeypatch.setenv("LMSWITCH_MODELS__MEMORY_BUDGET", "24GB")
    monkeypatch.setenv("LMSWITCH_MODELS__PINNED", '["a", "b"]')
    monkeypatch.setenv("LMSWITCH_AUTH__API_KEYS", '["k1"]')
    monkeypatch.setenv("LMSWITCH_MODELS__DEFAULT", "null")
    s = load_settings()
    assert s.models.idle_ttl == 900
    assert s.models.memory_budget == 24 * 10**9
    assert s.models.pinned == ("a", "b")
    assert [k.get_secret_value() for k in s.auth.api_keys] == ["k1"]
    assert s.models.default is None


def test_env_bad_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSWITCH_MODELS__IDLE_TTL", "soon")
    assert config_error().startswith(
        "models.idle_ttl (LMSWITCH_MODELS__IDLE_TTL): invalid duration 'soon'"
    )


def test_env_unknown_nested_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSWITCH_SERVER__PROT", "1")
    assert config_error() == (
        "server.prot (LMSWITCH_SERVER__PROT): unknown key; did you mean LMSWITCH_SERVER__PORT?"
    )


def test_env_unknown_section_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSWITCH_SERVR__PORT", "1")
    assert config_error().startswith("LMSWITCH_SERVR__PORT: unknown key 'servr'")


def test_env_unknown_key_names_the_variable_it_most_likely_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMSWITCH_MODELS__MAX_LOAD", "2")
    assert config_error() == (
        "models.max_load (LMSWITCH_MODELS__MAX_LOAD): unknown key; "
        "did you mean LMSWITCH_MODELS__MAX_LOADED?"
    )


def test_env_unknown_key_inside_a_json_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = [{"name": "desk", "base_url": "http://a:1234", "max_load": 1}]
    monkeypatch.setenv("LMSWITCH_UPSTREAMS", json.dumps(hosts))
    assert config_error() == (
        "upstreams.0.max_load (in LMSWITCH_UPSTREAMS): unknown key; "
        "did you mean upstreams.0.max_loaded?"
    )


def test_env_unknown_section_names_the_variable_it_most_likely_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMSWITCH_MODLES__MAX_LOADED", "2")
    assert config_error().startswith(
        "LMSWITCH_MODLES__MAX_LOADED: unknown key 'modles'; "
        "did you mean LMSWITCH_MODELS__MAX_LOADED? (sections: "
    )


def test_env_list_of_names_given_one_name_says_it_should_be_a_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMSWITCH_MODELS__PINNED", '"qwen"')  # JSON, but a string
    assert config_error() == (
        'models.pinned (LMSWITCH_MODELS__PINNED): should be a list of model names, e.g. ["qwen"] '
        "(got 'qwen')"
    )


def test_env_list_that_is_not_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSWITCH_AUTH__API_KEYS", "sk-plain")
    message = config_error()
    assert message.startswith("environment: ")
    assert "JSON" in message
    assert "sk-plain" not in message


def test_init_overrides_beat_env_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "server: {port: 9001, host: 0.0.0.0}\n")
    monkeypatch.setenv("LMSWITCH_SERVER__PORT", "9002")
    s = load_settings(path, server={"port": 9003})
    assert s.server.port == 9003
    assert s.server.host == "0.0.0.0"  # merged with the YAML section, not replacing it


def test_invalid_init_override_is_a_config_error() -> None:
    assert config_error(server={"port": -1}) == "server.port: must be >= 0"


def test_settings_without_load_settings_read_env_but_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "server: {port: 9001}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMSWITCH_LOGGING__LEVEL", "WARNING")
    s = Settings()
    assert s.server.port == 8000
    assert s.logging.level == "warning"


# --- a pool of hosts --------------------------------------------------------------------------


def test_without_upstreams_upstream_is_one_host_named_default() -> None:
    assert Settings().hosts() == (
        HostSettings(
            name="default",
            base_url="http://127.0.0.1:1234",
            api_token=None,
            max_loaded=1,
            memory_budget=None,
        ),
    )
    s = load_settings(
        upstream={"base_url": "http://10.0.0.5:1234/", "api_token": "tok"},
        models={"max_loaded": 2, "memory_budget": "8GiB"},
    )
    assert s.hosts() == (HostSettings("default", "http://10.0.0.5:1234", "tok", 2, 8 * GiB),)


TWO_HOSTS = """
upstream: {base_url: "http://ignored:1234", read_timeout: 1m}
upstreams:
  - name: desk
    base_url: http://127.0.0.1:1234/
    max_loaded: 0
    memory_budget: 8GiB
  - name: gpu-box_2
    base_url: http://192.168.1.20:1234
    api_token: lm-token
models: {max_loaded: 3, memory_budget: 20GiB}
"""


def test_upstreams_are_the_hosts_with_the_models_limits_as_fallback(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, TWO_HOSTS))
    assert s.hosts() == (
        HostSettings("desk", "http://127.0.0.1:1234", None, 0, 8 * GiB),
        HostSettings("gpu-box_2", "http://192.168.1.20:1234", "lm-token", 3, 20 * GiB),
    )
    assert s.upstream.read_timeout == 60  # every host's


def test_upstreams_round_trip_through_describe_settings(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, TWO_HOSTS.replace("api_token: lm-token", "")))
    text = describe_settings(s)
    assert yaml.safe_load(text)["upstreams"][0] == {
        "name": "desk",
        "base_url": "http://127.0.0.1:1234",
        "api_token": None,
        "max_loaded": 0,
        "memory_budget": 8 * GiB,
    }
    assert load_settings(write(tmp_path, text, "described.yaml")) == s


def test_describe_settings_masks_host_tokens(tmp_path: Path) -> None:
    text = describe_settings(load_settings(write(tmp_path, TWO_HOSTS)))
    assert "lm-token" not in text
    assert yaml.safe_load(text)["upstreams"][1]["api_token"] == "********"


def test_lmswitch_upstreams_takes_the_list_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = [{"name": "env", "base_url": "http://10.0.0.7:1234", "memory_budget": "4GiB"}]
    monkeypatch.setenv("LMSWITCH_UPSTREAMS", json.dumps(hosts))
    s = load_settings(write(tmp_path, TWO_HOSTS))  # the variable replaces the file's list
    assert s.hosts() == (HostSettings("env", "http://10.0.0.7:1234", None, 3, 4 * GiB),)
    monkeypatch.setenv("LMSWITCH_UPSTREAMS", "null")
    assert [host.name for host in load_settings().hosts()] == ["default"]


def test_lmswitch_upstreams_that_is_not_json_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMSWITCH_UPSTREAMS", "name=desk,api_token=lm-plain")
    message = config_error()
    assert message.startswith("environment: ")
    assert "lm-plain" not in message


def test_duplicate_host_names_are_an_error_naming_each_repeat(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
upstreams:
  - {name: desk, base_url: "http://a:1234"}
  - {name: desk, base_url: "http://b:1234"}
  - {name: gpu, base_url: "http://c:1234"}
  - {name: desk, base_url: "http://d:1234"}
""",
    )
    assert config_error(path).splitlines() == [
        "upstreams.1.name: duplicate name 'desk'",
        "upstreams.3.name: duplicate name 'desk'",
    ]


def test_two_names_for_one_url_are_allowed() -> None:
    s = load_settings(
        upstreams=[
            {"name": "a", "base_url": "http://h:1234"},
            {"name": "b", "base_url": "http://h:1234/"},
        ]
    )
    assert [(host.name, host.base_url) for host in s.hosts()] == [
        ("a", "http://h:1234"),
        ("b", "http://h:1234"),
    ]


def test_replicas_default_to_one(tmp_path: Path) -> None:
    models = load_settings(write(tmp_path, "models:\n  replicas:\n    qwen: 2\n")).models
    assert (models.replicas_of("qwen"), models.replicas_of("other")) == (2, 1)
    assert load_settings(write(tmp_path, "models:\n  replicas:\n")).models.replicas == {}


# --- describe_settings ------------------------------------------------------------------------


def test_describe_settings_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSWITCH_UPSTREAM__API_TOKEN", "tok-very-secret")
    sha256 = hashlib.sha256(b"sk-bob-secret").hexdigest()
    named = [
        {"name": "alice", "key": "sk-alice-secret", "models": ["qwen*"]},
        {"name": "bob", "key_sha256": sha256, "priority": 5, "admin": True},
    ]
    s = load_settings(
        auth={
            "api_keys": ["sk-client-secret"],
            "admin_keys": ["sk-admin-secret"],
            "keys": named,
        }
    )
    text = describe_settings(s)
    for secret in ("tok-very-secret", "sk-client-secret", "sk-admin-secret", "sk-alice-secret"):
        assert secret not in text
    data = yaml.safe_load(text)
    assert data["upstream"]["api_token"] == "********"
    alice = {"name": "alice", "key": "********", "key_sha256": None, "models": ["qwen*"]}
    bob = {"name": "bob", "key": None, "key_sha256": sha256, "models": ["*"]}  # no secret
    assert data["auth"] == {
        "api_keys": ["********"],
        "admin_keys": ["********"],
        "keys": [alice | {"priority": 0, "admin": False}, bob | {"priority": 5, "admin": True}],
        "allow_unauthenticated": False,
    }


def test_describe_settings_shows_every_key_and_reloads(tmp_path: Path) -> None:
    s = load_settings(
        models={
            "idle_ttl": "15m",
            "memory_budget": "1GiB",
            "load_options": {"q": {"num_experts": 2}},
        }
    )
    text = describe_settings(s)
    data = yaml.safe_load(text)
    assert data["upstream"]["api_token"] is None
    assert data["models"]["idle_ttl"] == 900
    assert data["models"]["memory_budget"] == 2**30
    assert data["models"]["load_options"] == {
        "q": {
            "context_length": None,
            "flash_attention": None,
            "eval_batch_size": None,
            "num_experts": 2,
            "offload_kv_cache_to_gpu": None,
        }
    }
    assert load_settings(write(tmp_path, text)) == s  # no secrets set, so it round-trips


# --- named keys (auth.keys) -------------------------------------------------------------------

SHA256 = hashlib.sha256(b"sk-alice-secret").hexdigest()


def test_named_keys_take_their_defaults(tmp_path: Path) -> None:
    text = f"auth:\n  keys:\n    - name: alice\n      key_sha256: {SHA256}\n"
    (alice,) = load_settings(write(tmp_path, text)).auth.keys
    assert (alice.name, alice.key, alice.key_sha256) == ("alice", None, SHA256)
    assert (alice.models, alice.priority, alice.admin) == (("*",), 0, False)
    assert alice.sha256() == hashlib.sha256(b"sk-alice-secret").digest()
    text += "      models:\n"  # every pattern commented out: no model
    assert load_settings(write(tmp_path, text)).auth.keys[0].models == ()
    assert load_settings(auth={"keys": [{"name": "a", "key": "sk-alice-secret"}]}).auth.keys[
        0
    ].sha256() == bytes.fromhex(SHA256)
    assert Settings().auth.keys == ()
    assert load_settings(write(tmp_path, "auth:\n  keys:\n")).auth.keys == ()


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ([{"name": "alice", "key_sha256": "12ab"}], "auth.keys.0.key_sha256: should be 64 hex"),
        ([{"name": "alice", "key_sha256": "g" * 64}], "auth.keys.0.key_sha256: should be 64 hex"),
        ([{"name": "alice"}], "auth.keys.0: set exactly one of key and key_sha256"),
        (
            [{"name": "alice", "key": "sk-alice-secret", "key_sha256": SHA256}],
            "auth.keys.0: set exactly one of key and key_sha256",
        ),
        ([{"name": "alice", "key": " "}], "auth.keys.0.key: must not be empty"),
        ([{"name": "Alice", "key": "sk-alice-secret"}], "auth.keys.0.name: invalid name 'Alice'"),
        ([{"name": "anonymous", "key": "sk-alice-secret"}], "auth.keys.0.name: 'anonymous' is"),
        ([{"key": "sk-alice-secret"}], "auth.keys.0.name: field required"),
        (
            [{"name": "a", "key": "sk-alice-secret"}, {"name": "a", "key": "sk-bob-secret"}],
            "auth.keys.1.name: duplicate name 'a'",
        ),
        (
            [{"name": "a", "key": "sk-alice-secret"}, {"name": "b", "key_sha256": SHA256.upper()}],
            "auth.keys.1: the same key as auth.keys.0",
        ),
        ([{"name": "a", "key": "sk-alice-secret", "models": "qwen*"}], "e.g. [qwen*]"),
        ([{"name": "a", "key": "sk-alice-secret", "models": [""]}], "auth.keys.0.models.0: "),
        ([{"name": "a", "key": "sk-alice-secret", "priority": "high"}], "auth.keys.0.priority: "),
        (
            [{"name": "a", "key": "sk-alice-secret", "admni": True}],
            "did you mean auth.keys.0.admin",
        ),
        ("sk-alice-secret", "auth.keys: should be a list of keys, each a mapping"),
    ],
)
def test_named_key_problems_name_the_key_and_never_show_a_key(keys: Any, problem: str) -> None:
    message = config_error(auth={"keys": keys})
    assert problem in message
    assert "sk-alice-secret" not in message
    assert SHA256 not in message.lower()


def test_a_named_key_may_not_repeat_an_unnamed_one() -> None:
    message = config_error(
        auth={"keys": [{"name": "a", "key_sha256": SHA256}], "admin_keys": ["sk-alice-secret"]}
    )
    assert message == "auth.keys.0: the same key as one in api_keys or admin_keys"


def test_lmswitch_auth_keys_takes_the_list_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [{"name": "ci", "key_sha256": SHA256, "models": ["qwen*"], "priority": -1}]
    monkeypatch.setenv("LMSWITCH_AUTH__KEYS", json.dumps(keys))
    (ci,) = load_settings().auth.keys
    assert (ci.name, ci.models, ci.priority, ci.admin) == ("ci", ("qwen*",), -1, False)
    monkeypatch.setenv("LMSWITCH_AUTH__KEYS", json.dumps([{"name": "ci", "key_sha256": "x"}]))
    assert config_error() == (
        "auth.keys.0.key_sha256 (in LMSWITCH_AUTH__KEYS): should be 64 hexadecimal digits"
    )


def test_shipped_config_yaml_example_keys_are_valid_and_show_every_key_field(
    tmp_path: Path,
) -> None:
    text = (REPO_ROOT / "config.yaml").read_text(encoding="utf-8")
    commented = text[text.index("  # keys:\n") :].splitlines()
    ends = next(i for i, line in enumerate(commented) if not line.startswith("  # "))
    example = "\n".join(["auth:", *(line.replace("# ", "", 1) for line in commented[:ends])])
    keys = yaml.safe_load(example)["auth"]["keys"]
    assert set().union(*keys) == set(NamedKey.model_fields)
    assert [key.name for key in load_settings(write(tmp_path, example + "\n")).auth.keys] == [
        "alice",
        "nightly-batch",
    ]
