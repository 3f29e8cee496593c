"""Model names: what a client's `model` means (docs/design.md §3.4).

Pure: `ModelManager.resolve` reads LM Studio's catalogue (refreshing it for an unknown name) and
the scheduler's instances, and asks these functions what they make of a name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.config import ModelsSettings
from proxy.errors import BadRequestError, ModelNotFoundError
from proxy.scheduling import Model


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request's `model` resolved: the model key to lease and the name to send upstream."""

    key: str
    upstream_name: str


def requested(name: object, models: ModelsSettings) -> tuple[str, str]:
    """The name a request asks for (`models.default` if none) and its target once an alias is
    applied; `BadRequestError` if there is none or it is not a non-empty string."""
    if name is None:
        if models.default is None:
            raise BadRequestError(
                "you must provide a model parameter (no models.default is configured)",
                param="model",
                code="missing_model",
            )
        name = models.default
    if not isinstance(name, str) or not name:
        raise BadRequestError("model must be a non-empty string", param="model")
    return name, models.aliases.get(name, name)


def find_key(target: str, catalog: Iterable[str], loaded: Iterable[Model]) -> str | None:
    """A model key, then a loaded instance id (`key:2`) of the models in `loaded`, that
    `target` names; else None."""
    if target in catalog:
        return target
    for model in loaded:
        if target == model.instance_id or target in model.duplicates:
            return model.key
    return None


def not_found(name: str, catalog: Iterable[str]) -> ModelNotFoundError:
    known = ", ".join(sorted(catalog)[:5])
    shown = name if len(name) <= 100 else name[:100] + "..."
    return ModelNotFoundError(
        f"The model {shown!r} does not exist. Known models include: {known}.", param="model"
    )


def routable(catalog: Iterable[str], aliases: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every name a client may use with its model key: the catalogue's keys, then the aliases
    of models in it (an alias that shadows a model key is the model key)."""
    keys = sorted(catalog)
    known = set(keys)
    names = [(key, key) for key in keys]
    names.extend(
        (alias, target)
        for alias, target in sorted(aliases.items())
        if alias not in known and target in known
    )
    return names
