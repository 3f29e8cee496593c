"""Model names: what a client's `model` means (docs/design.md §3.4).

Pure: `ModelManager.resolve` reads LM Studio's catalogue (refreshing it for an unknown name) and
the scheduler's instances, and asks these functions what they make of a name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxy.config import ModelsSettings
from proxy.errors import BadRequestError, ModelNotFoundError
from proxy.scheduling import Model

KNOWN_SHOWN = 10  # known names a 404 lists; past that it says how many more
_SUGGESTED = 3  # "did you mean" names at most
_QUOTED = 100  # characters of the client's name a 404 quotes
_COMPARED = 256  # a longer name (once normalised) is compared with nothing
_MARGIN = 0.05  # suggested names are at most this much less alike than the most alike one
_IGNORED = str.maketrans("", "", "-_./: ")


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


def find(
    target: str,
    catalog: Iterable[str],
    loaded: Iterable[Model],
    aliases: Mapping[str, str],
) -> Resolved | None:
    """What `target` names: a model key; else a loaded instance id (`key:2`) of the models in
    `loaded`; else the one key or alias of a known model it spells but for case (LM Studio's
    keys are lowercase, names copied from Hugging Face are not), sent upstream as the key.
    None if it names none of them, or more than one but for case."""
    if target in catalog:
        return Resolved(target, target)
    for model in loaded:
        if target == model.instance_id or target in model.duplicates:
            return Resolved(model.key, target)
    folded = target.casefold()
    keys = {key for name, key in routable(catalog, aliases) if name.casefold() == folded}
    if len(keys) == 1:
        (key,) = keys
        return Resolved(key, key)
    return None


def normalised(name: str) -> str:
    """`name` as names are compared for suggestions: lowercase, without `-_./: `."""
    return name.lower().translate(_IGNORED)


def suggestions(name: str, known: Iterable[str]) -> list[str]:
    """The known names `name` most likely meant, most alike first (at most three, and none
    much less alike than the first), comparing `normalised` forms: those it equals; else those
    it is part of, or that are part of it; else those `difflib` finds close."""
    wanted = normalised(name)
    if not wanted or len(wanted) > _COMPARED:
        return []
    forms = {known_name: normalised(known_name) for known_name in known}
    found = [known_name for known_name, form in forms.items() if form == wanted]
    if not found and len(wanted) >= 3:
        found = [
            known_name
            for known_name, form in forms.items()
            if wanted in form or (len(form) >= 4 and form in wanted)
        ]
    if not found:
        close = set(difflib.get_close_matches(wanted, set(forms.values()), n=_SUGGESTED))
        found = [known_name for known_name, form in forms.items() if form in close]

    ratios = {
        known_name: difflib.SequenceMatcher(None, wanted, forms[known_name]).ratio()
        for known_name in found
    }
    best = max(ratios.values(), default=0.0)
    closest = [known_name for known_name in found if ratios[known_name] >= best - _MARGIN]
    return sorted(closest, key=lambda known_name: (-ratios[known_name], known_name))[:_SUGGESTED]


def not_found(name: str, known: Sequence[str]) -> ModelNotFoundError:
    """The 404 for `name`: the known names (model keys, then aliases) it may have meant, and
    the first `KNOWN_SHOWN` of them."""
    shown = name if len(name) <= _QUOTED else name[:_QUOTED] + "..."
    message = f"The model {shown!r} does not exist"
    if close := suggestions(name, known):
        quoted = [repr(close_name) for close_name in close]
        either = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        message += f"; did you mean {either}?"
    else:
        message += "."
    if not known:
        message += " LM Studio lists no models."
    else:
        message += " Known models: " + ", ".join(known[:KNOWN_SHOWN])
        more = len(known) - KNOWN_SHOWN
        message += f" (and {more} more: GET /v1/models lists them all)." if more > 0 else "."
    return ModelNotFoundError(message, param="model")


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
