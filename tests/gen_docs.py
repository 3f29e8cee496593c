"""Writes the generated sections of the pages in docs/, so that they cannot drift from the code.

`uv run python -m tests.gen_docs` rewrites, between `<!-- NAME:start -->` and `<!-- NAME:end -->`
(`GENERATED` says which page holds which): the configuration reference in docs/configuration.md
(from `proxy.config.Settings`), the endpoint reference in docs/endpoints.md and the
old-LM-Studio example in docs/troubleshooting.md (captured by `tests.doc_capture`), and the
metrics reference in docs/metrics.md (from `proxy.metrics.Metrics`, with the PromQL examples
below). tests/test_docs.py fails when a page differs from what this writes.

`doc_page(page)` and `doc_block(page, name)` read a page and one of its example code blocks, for the
tests that check or run them.
"""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import anyio
from annotated_types import Ge, Gt, Le
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from proxy.config import ENV_PREFIX, LoadOptions, NamedKey, Settings, UpstreamHost
from proxy.metrics import Metrics
from proxy.units import ByteSize, MemoryBudget, Seconds
from tests import doc_capture
from tests.helpers import README

ROOT = README.parent
DOCS = ROOT / "docs"
REGENERATE = "uv run python -m tests.gen_docs"

# The pages of docs/ that hold generated sections, and the sections (marker names) each holds.
GENERATED: dict[str, tuple[str, ...]] = {
    "configuration": ("config-reference",),
    "endpoints": ("endpoint-reference",),
    "metrics": ("metrics-reference",),
    "troubleshooting": ("old-lmstudio",),
}

# An example value per key, as YAML. Each is checked to be valid, in the file and in the
# environment variable, by tests/test_docs.py.
EXAMPLES: dict[str, str] = {
    "server.host": "0.0.0.0",
    "server.port": "8080",
    "server.max_body_bytes": "32MiB",
    "server.drain_timeout": "1m",
    "server.header_timeout": "10s",
    "server.max_connections": "4000",
    "upstream.base_url": "http://192.168.1.20:1234",
    "upstream.api_token": "sk-lm-AbCd1234:AbCdEfGhIj0123456789",
    "upstream.connect_timeout": "2s",
    "upstream.read_timeout": "30m",
    "upstream.load_timeout": "10m",
    "upstream.poll_interval": "30s",
    "upstreams": '[{name: desk, base_url: "http://127.0.0.1:1234"}, '
    '{name: gpu, base_url: "http://192.168.1.20:1234"}]',
    "upstreams.*.name": "gpu",
    "upstreams.*.base_url": "http://192.168.1.20:1234",
    "upstreams.*.api_token": "sk-lm-AbCd1234:AbCdEfGhIj0123456789",
    "upstreams.*.max_loaded": "2",
    "upstreams.*.memory_budget": "20GiB",
    "auth.api_keys": "[sk-local-change-me]",
    "auth.admin_keys": "[admin-change-me]",
    "auth.keys": "[{name: alice, key_sha256: "
    '2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b, models: ["qwen*"]}]',
    "auth.keys.*.name": "nightly-batch",
    "auth.keys.*.key": "sk-lmswitch-change-me",
    "auth.keys.*.key_sha256": "68a3eb0a34242561f363680847aa298cc929bf6cd5fd44eb372d7c0af4975b1c",
    "auth.keys.*.models": '["qwen*", small]',
    "auth.keys.*.priority": "10",
    "auth.keys.*.admin": "true",
    "auth.allow_unauthenticated": "true",
    "models.default": "qwen2.5-7b-instruct",
    "models.aliases": "{gpt-4o-mini: qwen2.5-7b-instruct}",
    "models.pinned": "[text-embedding-nomic-embed-text-v1.5]",
    "models.preload": "[qwen2.5-7b-instruct]",
    "models.max_loaded": "2",
    "models.memory_budget": "20GiB",
    "models.idle_ttl": "15m",
    "models.eviction": "cost",
    "models.load_options": "{qwen2.5-7b-instruct: {context_length: 16384}}",
    "models.load_options.*.context_length": "16384",
    "models.load_options.*.flash_attention": "true",
    "models.load_options.*.eval_batch_size": "512",
    "models.load_options.*.num_experts": "4",
    "models.load_options.*.offload_kv_cache_to_gpu": "true",
    "models.replicas": "{qwen2.5-7b-instruct: 2}",
    "scheduler.max_queue": "64",
    "scheduler.queue_timeout": "2m",
    "scheduler.swap_grace": "30s",
    "scheduler.priority_aging": "1m",
    "scheduler.loading_feedback": "reasoning",
    "scheduler.loading_feedback_after": "5s",
    "logging.level": "debug",
    "logging.format": "json",
}
PER_MODEL = "models.load_options.*"  # `*` stands for a model key
PER_HOST = "upstreams.*"  # `*` stands for a host's place in the list
PER_KEY = "auth.keys.*"  # `*` stands for a named key's place in the list

# A PromQL example per metric (the exposed name): the query and what it shows.
PROMQL: dict[str, tuple[str, str]] = {
    "lmswitch_requests_total": (
        "sum by (model, status) (rate(lmswitch_requests_total[5m]))",
        "requests per second by model and status",
    ),
    "lmswitch_request_duration_seconds": (
        "histogram_quantile(0.95, sum by (le, model) "
        "(rate(lmswitch_request_duration_seconds_bucket[5m])))",
        "95th percentile of the whole request, queueing and loading included",
    ),
    "lmswitch_time_to_first_byte_seconds": (
        "histogram_quantile(0.5, sum by (le, model) "
        "(rate(lmswitch_time_to_first_byte_seconds_bucket[5m])))",
        "median time until a client sees the first byte",
    ),
    "lmswitch_queue_wait_seconds": (
        "sum by (model) (rate(lmswitch_queue_wait_seconds_sum[5m])) "
        "/ sum by (model) (rate(lmswitch_queue_wait_seconds_count[5m]))",
        "mean wait for the model, per model",
    ),
    "lmswitch_model_loads_total": (
        'sum by (model) (increase(lmswitch_model_loads_total{result!="ok"}[1h]))',
        "failed and timed-out loads in the last hour",
    ),
    "lmswitch_model_load_duration_seconds": (
        "max by (model) (rate(lmswitch_model_load_duration_seconds_sum[1h]) "
        "/ rate(lmswitch_model_load_duration_seconds_count[1h]))",
        "mean load time per model",
    ),
    "lmswitch_model_unloads_total": (
        'sum by (model) (increase(lmswitch_model_unloads_total{reason="evicted"}[1h]))',
        "evictions per model in the last hour (swaps)",
    ),
    "lmswitch_model_loaded": (
        "sum(lmswitch_model_loaded)",
        "models loaded now",
    ),
    "lmswitch_in_flight_requests": (
        "sum by (model) (lmswitch_in_flight_requests)",
        "requests running now, per model",
    ),
    "lmswitch_queued_requests": (
        "sum(lmswitch_queued_requests) > 0",
        "requests waiting now (empty when none)",
    ),
    "lmswitch_tokens_total": (
        'sum by (model) (rate(lmswitch_tokens_total{kind="completion"}[5m]))',
        "generated tokens per second",
    ),
    "lmswitch_client_disconnects_total": (
        "sum by (model) (increase(lmswitch_client_disconnects_total[1h]))",
        "clients that went away before their answer ended",
    ),
    "lmswitch_upstream_up": (
        "min_over_time(lmswitch_upstream_up[5m]) == 0",
        "LM Studio was unreachable in the last 5 minutes (an alert rule)",
    ),
    "lmswitch_key_requests_total": (
        'sum by (key) (increase(lmswitch_key_requests_total{status=~"4..|5.."}[1h]))',
        "refused and failed requests per key in the last hour",
    ),
    "lmswitch_key_tokens_total": (
        "sum by (key, kind) (increase(lmswitch_key_tokens_total[1d]))",
        "prompt and completion tokens per key in the last day",
    ),
    "lmswitch_key_busy_seconds_total": (
        "sum by (key) (rate(lmswitch_key_busy_seconds_total[5m]))",
        "models held per key (1 is one model busy all the time)",
    ),
    "lmswitch_key_queue_wait_seconds_total": (
        "sum by (key) (rate(lmswitch_key_queue_wait_seconds_total[5m])) "
        "/ sum by (key) (rate(lmswitch_key_requests_total[5m]))",
        "mean wait for a model per request, per key",
    ),
}


# --- pages and their sections -----------------------------------------------------------------


def doc_path(page: str) -> Path:
    """docs/PAGE.md."""
    return DOCS / f"{page}.md"


def doc_page(page: str) -> str:
    """The text of docs/PAGE.md."""
    return doc_path(page).read_text(encoding="utf-8")


def example_block(text: str, name: str) -> str | None:
    """The code block after `<!-- example: name -->` in `text`, or None."""
    match = re.search(rf"<!-- example: {name} -->\n```\w*\n(.*?)```", text, re.DOTALL)
    return None if match is None else match[1]


def doc_block(page: str, name: str) -> str:
    """The code block after `<!-- example: name -->` in docs/PAGE.md."""
    block = example_block(doc_page(page), name)
    assert block is not None, f"no example {name!r} in docs/{page}.md"
    return block


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def section(text: str, name: str) -> str:
    """What `text` (a page) holds between the `name` markers."""
    start, end = markers(name)
    begin = text.index(start) + len(start)
    return text[begin : text.index(end, begin)]


def replace_section(text: str, name: str, body: str) -> str:
    start, end = markers(name)
    begin = text.index(start) + len(start)
    return text[:begin] + body + text[text.index(end, begin) :]


# --- the configuration reference --------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One configuration key, as the reference shows it."""

    key: str  # dotted, e.g. models.memory_budget; `*` for a model key or a host's place
    env: str | None  # None under load_options and upstreams: set the whole value as JSON instead
    type: str
    default: str | None  # None: required
    example: str
    description: str


_DURATION, _SIZE = get_args(Seconds)[1], get_args(ByteSize)[1]  # their BeforeValidators
_BUDGET = get_args(MemoryBudget)[1]


def _unit(metadata: Sequence[Any]) -> str | None:
    if _DURATION in metadata:
        return "duration"
    if _SIZE in metadata:
        return "size"
    if _BUDGET in metadata:
        return "size or `auto`"
    return None


def type_name(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A reader's name for a settings type: `duration`, `list of strings`, `size or null`, ..."""
    if (unit := _unit(metadata)) is not None:
        return unit
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0], annotation.__metadata__)
    if origin in (Union, types.UnionType):
        names = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join([*names, "null"] if type(None) in args else names)
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}s"
    if origin is dict:
        value = "load options" if args[1] is LoadOptions else f"{type_name(args[1])}s"
        return f"mapping of names to {value}"
    simple = {
        str: "string",
        int: "integer",
        bool: "boolean",
        float: "number",
        SecretStr: "secret",
        UpstreamHost: "host",
        NamedKey: "named key",
    }
    return simple[annotation]


def _bounds(field: FieldInfo) -> str:
    if field.annotation is not int:
        return ""
    low = next((f"≥ {m.ge}" for m in field.metadata if isinstance(m, Ge)), None)
    low = next((f"> {m.gt}" for m in field.metadata if isinstance(m, Gt)), low)
    high = next((m.le for m in field.metadata if isinstance(m, Le)), None)
    if low is not None and high is not None:
        return f", {low.removeprefix('≥ ')} to {high}"
    return f", {low}" if low is not None else ""


def show_value(value: Any, unit: str | None) -> str:
    """A default as one would write it in config.yaml."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return "[]" if not value else json.dumps(list(value))
    if isinstance(value, dict):
        return "{}" if not value else json.dumps(value)
    if unit == "duration":
        for suffix, seconds in (("h", 3600), ("m", 60)):
            if value >= seconds and value % seconds == 0:
                return f"{int(value // seconds)}{suffix}"
        return f"{value:g}s"
    if unit == "size":
        for suffix, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= size and value % size == 0:
                return f"{value // size}{suffix}"
    return str(value)


def _section_of(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a section (`server`, `models`, ...), or None for a key of its own."""
    model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _item_of(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a list's items or a mapping's values (hosts, load options), or None."""
    return next(
        (
            arg
            for arg in get_args(field.annotation)
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        ),
        None,
    )


def _rows(key: str, field: FieldInfo, env: str | None) -> list[Setting]:
    """`key`'s row, then, for a list or mapping of models, one per key of an item (`*`)."""
    metadata = field.metadata
    default = (
        None
        if field.is_required()
        else show_value(field.get_default(call_default_factory=True), _unit(metadata))
    )
    example = EXAMPLES.get(key, default)
    assert example is not None, f"add an example for {key}, which has no default"
    row = Setting(
        key=key,
        env=env,
        type=type_name(field.annotation, metadata) + _bounds(field),
        default=default,
        example=example,
        description=field.description or "",
    )
    item = _item_of(field)
    return [row] if item is None else [row, *_settings_of(item, f"{key}.*", None)]


def _settings_of(model: type[BaseModel], prefix: str, env: str | None) -> list[Setting]:
    return [
        row
        for name, field in model.model_fields.items()
        for row in _rows(
            f"{prefix}.{name}", field, None if env is None else f"{env}__{name.upper()}"
        )
    ]


def _top_level(name: str, field: FieldInfo) -> list[Setting]:
    """The rows of a key of `Settings`: a section's keys, or the key itself (`upstreams`)."""
    env = f"{ENV_PREFIX}{name.upper()}"
    section = _section_of(field)
    return _rows(name, field, env) if section is None else _settings_of(section, name, env)


def settings_reference() -> list[Setting]:
    """Every key of `Settings`, section by section, in declaration order."""
    return [row for name, field in Settings.model_fields.items() for row in _top_level(name, field)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# "(DESIGN.md §5.4, §5.5)" or "(docs/design.md §2.4)" at the end of a settings docstring.
_DESIGN_POINTER = re.compile(r"\s*\((?:DESIGN(?:\.md)?|docs/design\.md) §[^)]*\)")


def config_reference() -> str:
    """The configuration reference's Markdown: one table per section (or list of hosts)."""
    parts = []
    for name, field in Settings.model_fields.items():
        model = _section_of(field) or _item_of(field)
        assert model is not None
        # The section's (or list item's) docstring, less its pointers into the design notes.
        about = _DESIGN_POINTER.sub("", (model.__doc__ or "").strip())
        parts.append(
            f"**`{name}`**: {about}\n\n"
            "| key, environment variable | type | default | example | meaning |\n"
            "| --- | --- | --- | --- | --- |\n"
        )
        for row in _top_level(name, field):
            env = f"<br>`{row.env}`" if row.env else ""
            default = "required" if row.default is None else f"`{row.default}`"
            parts[-1] += (
                f"| `{row.key}`{env} | {_cell(row.type)} | {default} | "
                f"`{_cell(row.example)}` | {_cell(row.description)} |\n"
            )
    return "\n".join(parts)


# --- the metrics reference --------------------------------------------------------------------


@dataclass(frozen=True)
class MetricDoc:
    name: str  # as exposed: counters end in _total
    type: str
    labels: tuple[str, ...]
    help: str


def metric_docs() -> list[MetricDoc]:
    """Every instrument of `Metrics`, in the order it creates them."""
    docs = []
    for instrument in vars(Metrics()).values():
        if isinstance(instrument, MetricWrapperBase):  # read its private fields: no getters
            kind = str(instrument._type)
            name = instrument._name
            docs.append(
                MetricDoc(
                    name=f"{name}_total" if kind == "counter" else name,
                    type=kind,
                    labels=tuple(instrument._labelnames),
                    help=instrument._documentation,
                )
            )
    return docs


def metrics_reference() -> str:
    parts = []
    for doc in metric_docs():
        labels = ", ".join(f"`{label}`" for label in doc.labels) or "no labels"
        query, shows = PROMQL.get(doc.name, ("", "no example yet"))
        parts.append(
            f"- **`{doc.name}`** ({doc.type}; {labels}): {doc.help}\n  - `{query}`: {shows}.\n"
        )
    return "".join(parts)


# --- all together -----------------------------------------------------------------------------


async def generated_sections() -> dict[str, str]:
    """Every generated section's Markdown, by marker name, made afresh (the captures run here)."""
    examples = doc_capture.render_endpoints(await doc_capture.capture_endpoints())
    old = await doc_capture.capture_old_lmstudio()
    return {
        "config-reference": config_reference(),
        "metrics-reference": metrics_reference(),
        "endpoint-reference": examples,
        "old-lmstudio": f"```text\n{old}\n```\n",
    }


def pages() -> dict[str, str]:
    """The text of every page that holds generated sections, by page name."""
    return {page: doc_page(page) for page in GENERATED}


async def update(texts: Mapping[str, str]) -> dict[str, str]:
    """`texts` (page name -> its text) with every generated section written afresh."""
    sections = await generated_sections()
    fresh = {}
    for page, text in texts.items():
        for name in GENERATED[page]:
            text = replace_section(text, name, sections[name])
        fresh[page] = text
    return fresh


async def main() -> None:  # pragma: no cover - rewrites the pages; the tests check their parts
    texts = pages()
    for page, text in (await update(texts)).items():
        # A page whose new text differs only in ids and times is left as it is.
        changed = doc_capture.mask(text) != doc_capture.mask(texts[page])
        if changed:
            doc_path(page).write_text(text, encoding="utf-8")
        print(f"docs/{page}.md", "rewritten" if changed else "unchanged", file=sys.stderr)  # noqa: T201


if __name__ == "__main__":  # pragma: no cover - run by hand
    anyio.run(main)
