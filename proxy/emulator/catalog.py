"""The emulator's data: the model catalogue, loaded instances, recorded calls
(docs/design.md §5.2).

Also how the native listings describe them: the rows of `/api/v0/models` and `/api/v1/models`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_CONTEXT_LENGTH = 4096  # what LM Studio loads LLMs with unless told otherwise (§5.3)


@dataclass(frozen=True)
class CatalogModel:
    """A downloaded model, as `GET /api/v1/models` describes it."""

    key: str
    type: Literal["llm", "embedding"]
    publisher: str
    display_name: str
    architecture: str | None
    quantization: str
    bits_per_weight: int
    size_bytes: int
    params_string: str | None
    max_context_length: int
    vision: bool = False
    trained_for_tool_use: bool = False


DEFAULT_CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel("llama-3.2-1b-instruct", "llm", "hugging-quants", "Llama 3.2 1B Instruct",
                 "llama", "Q4_K_M", 4, 807_694_464, "1B", 131072, trained_for_tool_use=True),
    CatalogModel("qwen2.5-7b-instruct", "llm", "lmstudio-community", "Qwen2.5 7B Instruct",
                 "qwen2", "Q4_K_M", 4, 4_683_073_184, "7B", 32768, trained_for_tool_use=True),
    CatalogModel("google/gemma-3-4b", "llm", "google", "Gemma 3 4B", "gemma3", "Q4_K_M", 4,
                 3_341_081_600, "4B", 131072, vision=True),
    CatalogModel("qwen2.5-14b-instruct", "llm", "lmstudio-community", "Qwen2.5 14B Instruct",
                 "qwen2", "Q4_K_M", 4, 8_988_110_976, "14B", 32768, trained_for_tool_use=True),
    CatalogModel("openai/gpt-oss-20b", "llm", "openai", "gpt-oss 20B", "gpt-oss", "MXFP4", 4,
                 12_109_566_560, "20B", 131072, trained_for_tool_use=True),
    CatalogModel("text-embedding-nomic-embed-text-v1.5", "embedding", "nomic-ai",
                 "Nomic Embed Text v1.5", "nomic-bert", "Q4_K_M", 4, 84_106_624, None, 2048),
)  # fmt: skip


@dataclass
class Instance:
    """A loaded copy of a model; `last_used` is a `time.monotonic()` reading."""

    id: str
    key: str
    context_length: int
    jit: bool
    ttl_s: float | None
    last_used: float
    config: dict[str, Any] = field(default_factory=dict)  # `loaded_instances[].config` (§5.2)


@dataclass(frozen=True)
class Call:
    """One request the emulator received; `body` is the parsed JSON, or None."""

    method: str
    path: str
    body: Any | None


def _default_context(model: CatalogModel) -> int:
    if model.type == "embedding":
        return model.max_context_length
    return min(DEFAULT_CONTEXT_LENGTH, model.max_context_length)


def instance_config(model: CatalogModel, options: dict[str, Any]) -> dict[str, Any]:
    context_length = options.get("context_length", _default_context(model))
    if model.type == "embedding":
        return {"context_length": context_length}
    config = {
        "context_length": context_length,
        "eval_batch_size": options.get("eval_batch_size", 512),
        "parallel": 4,
        "flash_attention": options.get("flash_attention", True),
        "offload_kv_cache_to_gpu": options.get("offload_kv_cache_to_gpu", True),
    }
    if "num_experts" in options:
        config["num_experts"] = options["num_experts"]
    return config


# --- Model listings ----------------------------------------------------------------------------


def v0_row(model: CatalogModel, instance: Instance | None) -> dict[str, Any]:
    """One `/api/v0/models` entry: a loaded instance, or the model when not loaded (§5.2)."""
    kind = "embeddings" if model.type == "embedding" else "vlm" if model.vision else "llm"
    row: dict[str, Any] = {
        "id": instance.id if instance is not None else model.key,
        "object": "model",
        "type": kind,
        "publisher": model.publisher,
        "arch": model.architecture,
        "compatibility_type": "gguf",
        "quantization": model.quantization,
        "state": "loaded" if instance is not None else "not-loaded",
        "max_context_length": model.max_context_length,
    }
    if instance is not None:
        row["loaded_context_length"] = instance.context_length
    row["capabilities"] = ["tool_use"] if model.trained_for_tool_use else []
    return row


def v1_row(model: CatalogModel, instances: list[Instance]) -> dict[str, Any]:
    """One `/api/v1/models` entry with its `loaded_instances` (§5.2)."""
    row: dict[str, Any] = {
        "type": model.type,
        "publisher": model.publisher,
        "key": model.key,
        "display_name": model.display_name,
    }
    if model.type == "llm":
        row["architecture"] = model.architecture
    row |= {
        "quantization": {"name": model.quantization, "bits_per_weight": model.bits_per_weight},
        "size_bytes": model.size_bytes,
        "params_string": model.params_string,
        "loaded_instances": [{"id": i.id, "config": dict(i.config)} for i in instances],
        "max_context_length": model.max_context_length,
        "format": "gguf",
    }
    if model.type == "llm":
        variant = f"{model.key}@{model.quantization.lower()}"
        row |= {
            "capabilities": {
                "vision": model.vision,
                "trained_for_tool_use": model.trained_for_tool_use,
            },
            "description": None,
            "variants": [variant],
            "selected_variant": variant,
        }
    return row
