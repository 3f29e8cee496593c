"""Settings: the `config.yaml` contract (docs/configuration.md), environment overrides and
validation.

Priority: init kwargs > `LMSWITCH_*` environment > YAML file > defaults. Every problem becomes a
`ConfigError` naming the dotted key and why.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from proxy.config_errors import describe_error
from proxy.keys import EVERY_MODEL, check_name, digest
from proxy.units import AUTO, ByteSize, MemoryBudget, MiB, Seconds

ENV_PREFIX = "LMSWITCH_"
CONFIG_ENV_VAR = "LMSWITCH_CONFIG"
DEFAULT_CONFIG_FILE = "config.yaml"
MASK = "********"
DEFAULT_HOST = "default"  # the name of the one host `upstream` stands for when no `upstreams`


class ConfigError(Exception):
    """An invalid configuration; `str()` has one line per problem, each naming the key."""

    def __init__(self, *problems: str) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# --- the sections -----------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoadOptions(_Section):
    """LM Studio's load fields for one model; unset fields are left to LM Studio."""

    context_length: int | None = Field(
        default=None, gt=0, description="Context window in tokens to load the model with."
    )
    flash_attention: bool | None = Field(
        default=None, description="Flash attention on or off (llama.cpp engine only)."
    )
    eval_batch_size: int | None = Field(
        default=None, gt=0, description="Evaluation batch size (llama.cpp engine only)."
    )
    num_experts: int | None = Field(
        default=None, gt=0, description="Experts to use, for mixture-of-experts models."
    )
    offload_kv_cache_to_gpu: bool | None = Field(
        default=None, description="Keep the KV cache in GPU memory (false: in RAM)."
    )

    def as_body(self) -> dict[str, int | bool]:
        """The fields that are set, ready to merge into a load request body."""
        return {
            name: value
            for name in type(self).model_fields
            if (value := getattr(self, name)) is not None
        }


class ServerSettings(_Section):
    """Where the proxy listens, how it bounds connections and request bodies, and shutdown."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on; 0.0.0.0 accepts connections from other machines.",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    max_body_bytes: ByteSize = Field(
        default=10 * MiB, description="Larger request bodies are refused with 413."
    )
    drain_timeout: Seconds = Field(
        default=30.0,
        description="On SIGTERM or Ctrl+C: stop accepting, let running requests finish this long.",
    )
    header_timeout: Seconds = Field(
        default=30.0,
        gt=0,
        description="A connection whose request headers have not all arrived this long after it "
        "opened (or after the next request on it began) is closed.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Open client connections; past it, new ones get 503 and are closed.",
    )


def _check_base_url(value: str) -> str:
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"invalid URL {value!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {value!r} (expected e.g. http://127.0.0.1:1234)")
    return url


_BaseUrl = Annotated[str, AfterValidator(_check_base_url)]


class UpstreamSettings(_Section):
    """LM Studio's server and the deadlines for talking to it."""

    base_url: _BaseUrl = Field(default="http://127.0.0.1:1234", description="LM Studio's server.")
    api_token: SecretStr | None = Field(
        default=None,
        description="LM Studio API token, sent as Bearer (never the client's key).",
    )
    connect_timeout: Seconds = Field(
        default=5.0,
        description="Longest wait to open a connection to LM Studio, and for a whole listing of "
        "its models (LM Studio lists them in milliseconds).",
    )
    read_timeout: Seconds = Field(
        default=600.0, description="Longest wait between bytes of an upstream response."
    )
    load_timeout: Seconds = Field(
        default=300.0, description="Longest one model load may take; then 504."
    )
    poll_interval: Seconds = Field(
        default=10.0, description="Reconcile with LM Studio's real state this often."
    )


_HOST_NAME = re.compile(r"[a-z0-9_-]{1,32}")


class UpstreamHost(_Section):
    """One host of a pool of LM Studio servers, with its own token and capacity."""

    name: str = Field(
        description="The host's label in metrics, status, events and logs; unique, 1 to 32 of "
        "a-z, 0-9, _ and -."
    )
    base_url: _BaseUrl = Field(description="The host's LM Studio server.")
    api_token: SecretStr | None = Field(
        default=None, description="The host's LM Studio API token, sent as Bearer."
    )
    max_loaded: int | None = Field(
        default=None,
        ge=0,
        description="Models loaded at once on this host; 0: no count limit; null: "
        "models.max_loaded.",
    )
    memory_budget: MemoryBudget | None = Field(
        default=None,
        description="The sizes of the models loaded on this host must fit under it; auto: "
        "learned from what its LM Studio accepts and refuses; null: models.memory_budget.",
    )

    @field_validator("name", mode="after")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _HOST_NAME.fullmatch(value):
            raise ValueError(f"invalid name {value!r} (1 to 32 of a-z, 0-9, _ and -)")
        return value


@dataclass(frozen=True)
class HostSettings:
    """One host as the code that runs it sees it: the limits resolved, the token revealed."""

    name: str
    base_url: str
    api_token: str | None
    max_loaded: int
    memory_budget: int | None  # bytes; None: no limit, or `auto` (learn_capacity)
    learn_capacity: bool = False  # `memory_budget: auto`: learned from LM Studio


def _null_as_empty(value: object) -> object:
    # `pinned:` with every example commented out parses as null; it means "none".
    return () if value is None else value


def _null_as_empty_dict(value: object) -> object:
    return {} if value is None else value


_Keys = Annotated[tuple[SecretStr, ...], BeforeValidator(_null_as_empty)]
_Names = Annotated[tuple[str, ...], BeforeValidator(_null_as_empty)]
_Patterns = Annotated[
    tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_null_as_empty)
]


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class NamedKey(_Section):
    """One client's key with its name, the models it may use, its priority and rights."""

    name: str = Field(
        description="The key's name in access lines, metrics and usage (never the key itself); "
        "unique, 1 to 32 of a-z, 0-9, _ and -, not `anonymous`."
    )
    key: SecretStr | None = Field(
        default=None, description="The key itself; or leave it out and set key_sha256."
    )
    key_sha256: str | None = Field(
        default=None,
        description="The key's SHA-256 in hex (`lmswitch keys new` prints it), so that the "
        "file holds no secret; set it or key, not both.",
    )
    models: _Patterns = Field(
        default=EVERY_MODEL,
        description="Glob patterns (`*`, `?`, `[...]`) over model keys and aliases: a request "
        "is allowed if one matches the name it used or the model key that resolves to; others "
        "get 403 model_not_allowed, and /v1/models lists only these; empty: no model.",
    )
    priority: int = Field(
        default=0, description="Higher is served first when models are contended."
    )
    admin: bool = Field(
        default=False, description="Also an admin key: may use /api/v1/* and the page."
    )

    @field_validator("name", mode="after")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if (problem := check_name(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("key_sha256", mode="after")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_HEX.fullmatch(value):
            raise ValueError("should be 64 hexadecimal digits")  # the value is never echoed
        return value

    @field_validator("key", mode="after")
    @classmethod
    def _check_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> NamedKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("set exactly one of key and key_sha256")
        return self

    def sha256(self) -> bytes:
        """The key's SHA-256, from whichever of key and key_sha256 is set."""
        if self.key is not None:
            return digest(self.key.get_secret_value())
        assert self.key_sha256 is not None  # noqa: S101 - _one_key makes sure of it
        return bytes.fromhex(self.key_sha256)


class AuthSettings(_Section):
    """Bearer keys for clients (/v1/*) and for administrators (/api/v1/*, /ui): unnamed
    (api_keys, admin_keys) and named, with model scopes and priorities (keys)."""

    api_keys: _Keys = Field(
        default=(), description="Bearer keys accepted on /v1/*; empty: no key needed."
    )
    admin_keys: _Keys = Field(
        default=(),
        description="Bearer keys for /api/v1/* and /ui/; empty: loopback clients only.",
    )
    keys: Annotated[tuple[NamedKey, ...], BeforeValidator(_null_as_empty)] = Field(
        default=(),
        description="Named keys: each may use /v1/* (the models its patterns allow) and, if "
        "admin, /api/v1/* and the page; when set, /v1/* needs a key, as with api_keys.",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description=(
            "Let `serve` listen on a non-loopback address with no api_keys or keys (anyone who "
            "can reach it may use it); without it, serve refuses to start that way."
        ),
    )

    @field_validator("keys", mode="after")
    @classmethod
    def _check_unique_keys(cls, keys: tuple[NamedKey, ...]) -> tuple[NamedKey, ...]:
        names: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        problems: list[InitErrorDetails] = []
        for index, named in enumerate(keys):
            if named.name in names:
                problems.append(_problem_at((index, "name"), f"duplicate name {named.name!r}"))
            names.setdefault(named.name, index)
            if (first := digests.setdefault(named.sha256(), index)) != index:
                # Which name a request is must not depend on the order of the list.
                problems.append(_problem_at((index,), f"the same key as auth.keys.{first}"))
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return keys

    @model_validator(mode="after")
    def _named_keys_are_their_own(self) -> AuthSettings:
        unnamed = {digest(key.get_secret_value()) for key in (*self.api_keys, *self.admin_keys)}
        for index, named in enumerate(self.keys):
            if named.sha256() in unnamed:
                raise ValidationError.from_exception_data(
                    type(self).__name__,
                    [_problem_at(("keys", index), "the same key as one in api_keys or admin_keys")],
                )
        return self

    def requires_client_key(self) -> bool:
        """True if /v1/* needs a key: some api_keys or named keys are set."""
        return bool(self.api_keys or self.keys)


def _problem_at(loc: tuple[int | str, ...], message: str) -> InitErrorDetails:
    """A validation problem at `loc` (below the field being validated), saying `message`."""
    return InitErrorDetails(type="value_error", loc=loc, input=None, ctx={"error": message})


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


class ModelsSettings(_Section):
    """Routing (default, aliases) and the loading policy (pins, preloads, capacity, idle TTL)."""

    default: str | None = Field(default=None, description="Model used when a request names none.")
    aliases: Annotated[dict[str, str], BeforeValidator(_null_as_empty_dict)] = Field(
        default_factory=dict, description="Other names clients may use for a model."
    )
    pinned: _Names = Field(default=(), description="Models never evicted.")
    preload: _Names = Field(default=(), description="Models loaded at start, in order.")
    max_loaded: int = Field(
        default=1, ge=0, description="Models loaded at once; 0: no count limit."
    )
    memory_budget: MemoryBudget | None = Field(
        default=None,
        description="The sizes (LM Studio's size_bytes) of loaded models must fit under it; "
        "auto: learned from what LM Studio accepts and refuses (each host its own); null: no "
        "limit.",
    )
    idle_ttl: Seconds | None = Field(
        default=None, description="Unload a model idle this long (not a pinned one); null: never."
    )
    eviction: Annotated[Literal["lru", "cost"], BeforeValidator(_lower)] = Field(
        default="lru",
        description="Which idle models make room first: lru (least recently used) or cost "
        "(those cheapest to reload per byte, by uses and learned load times).",
    )
    load_options: Annotated[dict[str, LoadOptions], BeforeValidator(_null_as_empty_dict)] = Field(
        default_factory=dict, description="Per model key: LM Studio's load fields, each optional."
    )
    replicas: Annotated[
        dict[str, Annotated[int, Field(ge=1)]], BeforeValidator(_null_as_empty_dict)
    ] = Field(
        default_factory=dict,
        description="Per model key: how many hosts may hold it loaded at once (default 1).",
    )

    def replicas_of(self, key: str) -> int:
        """How many hosts may hold the model `key` loaded at once."""
        return self.replicas.get(key, 1)


class SchedulerSettings(_Section):
    """Queueing limits and fair swapping (docs/design.md §2.4)."""

    max_queue: int = Field(
        default=256,
        ge=0,
        description="Requests waiting for a model, all models together; more get 429.",
    )
    queue_timeout: Seconds = Field(
        default=300.0, description="Longest a request waits for its model; then 503."
    )
    swap_grace: Seconds = Field(
        default=10.0,
        description="How long requests waiting for another model let the loaded model keep "
        "taking new requests before it is drained.",
    )
    priority_aging: Seconds = Field(
        default=30.0,
        gt=0,
        description="When models are contended, requests of higher priority (their key's "
        "`priority`) are served first; each this long a request waits counts as one more "
        "priority level, so a low-priority request still gets its turn.",
    )
    loading_feedback: Annotated[
        Literal["off", "comments", "reasoning"], BeforeValidator(_lower)
    ] = Field(
        default="comments",
        description="A streaming request still waiting for its model gets its answer started "
        "and a line of progress every 2 s: off; comments (SSE comments, Anthropic's pings on "
        "/v1/messages); or reasoning (reasoning_content chunks on /v1/chat/completions).",
    )
    loading_feedback_after: Seconds = Field(
        default=1.0,
        description="How long a streaming request waits before its feedback starts.",
    )


class LoggingSettings(_Section):
    """Log level and line format."""

    level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)
    ] = Field(
        default="info",
        description="The least severe messages logged; debug adds the access lines of "
        "management reads (status, model rows, events, health, metrics, the page's files).",
    )
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = Field(
        default="text", description="text, or json: one object per line."
    )


# --- the settings -----------------------------------------------------------------------------


class _YamlSource(YamlConfigSettingsSource):
    """The YAML file as a source; syntax errors and a non-mapping top level become ConfigError."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:
            with file_path.open(encoding=self.yaml_file_encoding or "utf-8") as file:
                data = yaml.safe_load(file)
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(f"{file_path}: invalid YAML: {detail}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file_path}: cannot read: {exc}") from exc
        if data is None:
            return {}  # an empty file means defaults
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ConfigError(f"{file_path}: the top level must be a mapping of keys, not {kind}")
        # A section whose keys are all commented out parses as null: it means "all defaults".
        return {key: value for key, value in data.items() if value is not None}


class Settings(BaseSettings):
    """Every setting of lmswitch. `Settings()` is defaults plus environment; see `load_settings`."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_parse_none_str="null",
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    upstreams: Annotated[tuple[UpstreamHost, ...], BeforeValidator(_null_as_empty)] = Field(
        default=(),
        description="Several LM Studio hosts; when set, upstream.base_url and upstream.api_token "
        "are not used (upstream's timeouts and poll_interval still apply to every host).",
    )
    auth: AuthSettings = Field(default_factory=AuthSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets directory: the contract is config.yaml plus LMSWITCH_* variables.
        # The YAML source reads nothing unless a subclass sets `yaml_file` (see load_settings).
        return init_settings, env_settings, _YamlSource(settings_cls)

    @field_validator("upstreams", mode="after")
    @classmethod
    def _check_unique_names(cls, hosts: tuple[UpstreamHost, ...]) -> tuple[UpstreamHost, ...]:
        seen: set[str] = set()
        duplicates: list[InitErrorDetails] = []
        for index, host in enumerate(hosts):
            if host.name in seen:
                duplicates.append(
                    InitErrorDetails(
                        type="value_error",
                        loc=(index, "name"),  # pydantic prefixes it with `upstreams`
                        input=host.name,
                        ctx={"error": f"duplicate name {host.name!r}"},
                    )
                )
            seen.add(host.name)
        if duplicates:
            raise ValidationError.from_exception_data(cls.__name__, duplicates)
        return hosts

    def hosts(self) -> tuple[HostSettings, ...]:
        """The LM Studio hosts: `upstreams`, or else `upstream` as one host named `default`;
        a host's unset limits are the `models` ones."""
        pool = self.upstreams or (
            UpstreamHost(
                name=DEFAULT_HOST,
                base_url=self.upstream.base_url,
                api_token=self.upstream.api_token,
            ),
        )
        hosts = []
        for host in pool:
            budget = self.models.memory_budget if host.memory_budget is None else host.memory_budget
            hosts.append(
                HostSettings(
                    name=host.name,
                    base_url=host.base_url,
                    api_token=_revealed(host.api_token),
                    max_loaded=(
                        self.models.max_loaded if host.max_loaded is None else host.max_loaded
                    ),
                    memory_budget=budget if isinstance(budget, int) else None,
                    learn_capacity=budget == AUTO,
                )
            )
        return tuple(hosts)


def _revealed(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


# --- loading ----------------------------------------------------------------------------------


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read the settings: `overrides` > environment > the YAML file > defaults.

    `path` None means `$LMSWITCH_CONFIG` if set, else `./config.yaml` if it exists, else no file.
    Raises ConfigError for a missing named file, bad YAML, or any invalid or unknown key.
    """
    file = _config_file(path)
    _check_env_keys()

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=file)

    try:
        loaded = _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(
            *(describe_error(error, Settings, ENV_PREFIX) for error in exc.errors())
        ) from exc
    except SettingsError as exc:  # e.g. LMSWITCH_AUTH__API_KEYS='key' rather than '["key"]'
        hint = "lists and mappings in LMSWITCH_* variables are JSON, e.g. '[\"key\"]'"
        raise ConfigError(f"environment: {exc} ({hint})") from exc
    # Hand back a plain Settings (already validated), so it compares equal to Settings(...).
    values = {name: getattr(loaded, name) for name in Settings.model_fields}
    return Settings.model_construct(_fields_set=loaded.model_fields_set, **values)


def _config_file(path: str | os.PathLike[str] | None) -> Path | None:
    if path is None:
        from_env = os.environ.get(CONFIG_ENV_VAR)
        if not from_env:
            default = Path(DEFAULT_CONFIG_FILE)
            return default if default.is_file() else None
        file, origin = Path(from_env), f"{CONFIG_ENV_VAR}={from_env}"
    else:
        file, origin = Path(path), str(path)
    file = file.expanduser()
    if not file.is_file():
        why = "is not a file" if file.exists() else "no such file"
        raise ConfigError(f"{origin}: {why}")
    return file


def _check_env_keys() -> None:
    """A LMSWITCH_* variable naming no section is a typo; nested typos fail validation."""
    sections = list(Settings.model_fields)
    problems = []
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV_VAR:
            continue
        section, *rest = name[len(ENV_PREFIX) :].split("__")
        if section.lower() in sections:
            continue
        problem = f"{name}: unknown key {section.lower()!r}"
        if close := difflib.get_close_matches(section.lower(), sections, n=1):
            meant = "__".join([ENV_PREFIX + close[0].upper(), *(part.upper() for part in rest)])
            problem += f"; did you mean {meant}?"
        problems.append(f"{problem} (sections: {', '.join(sorted(sections))})")
    if problems:
        raise ConfigError(*sorted(problems))


def describe_settings(settings: Settings) -> str:
    """The effective settings as YAML (for `lmswitch check-config`), secrets shown as ********."""
    return yaml.safe_dump(
        _plain(settings.model_dump()), sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 30 rather than 30.0
    return value
