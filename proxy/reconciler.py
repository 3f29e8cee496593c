"""Reconciler: what lmswitch knows of LM Studio, and the calls that change it.

It makes the load and unload calls the manager decides and reads LM Studio's catalogue and loaded
instances, and returns every outcome as a value (`LoadSucceeded`, `LoadFailed`, `Observation`,
an error). It never touches the scheduler or the event bus: `ModelManager` feeds what it returns to
the scheduler and publishes the events (docs/design.md §3.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config import Settings
from proxy.errors import InsufficientMemoryError, ProxyError, UpstreamUnavailableError
from proxy.lmstudio import Loaded, ModelInfo


class LMStudioCalls(Protocol):
    """The calls the reconciler makes to LM Studio (`proxy.lmstudio.LMStudioClient`'s, or a
    scripted stand-in's in tests)."""

    base_url: str

    async def catalog(self) -> list[ModelInfo]: ...

    async def load(
        self, key: str, options: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> Loaded: ...

    async def unload(self, instance_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadSucceeded:
    """A load that succeeded: the instance LM Studio holds now (an existing one, or a new one)."""

    instance_id: str
    elapsed_s: float
    existing: bool = False  # LM Studio had it loaded already: no load call was made


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """A load that failed (or timed out), with the error every waiting request gets."""

    error: ProxyError

    @property
    def refused(self) -> bool:
        """LM Studio's memory guardrail refused it: room may be made (docs/design.md §2.8)."""
        return isinstance(self.error, InsufficientMemoryError)


@dataclass(frozen=True, slots=True)
class Observation:
    """LM Studio's catalogue as one listing read it: sizes, and loaded instances per model."""

    sizes: Mapping[str, int]
    instances: Mapping[str, tuple[str, ...]]
    started: float  # when the listing was asked for: the state is at least this recent


class Reconciler:
    """LM Studio's catalogue, reachability and loaded context lengths; load, unload and listing
    calls whose outcomes it returns."""

    def __init__(
        self, client: LMStudioCalls, settings: Settings, *, clock: Callable[[], float]
    ) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self.catalog: dict[str, ModelInfo] = {}
        self.catalog_known = False
        self.reachable = False
        self.last_error: ProxyError | None = None  # why the last catalogue read failed
        self.last_refresh = -math.inf  # when the listing whose outcome is current was started
        self.context_overrides: dict[str, int] = {}  # from operators' load requests
        self.context_lengths: dict[str, int | None] = {}  # of loaded instances, as last seen

    @property
    def current(self) -> bool:
        """Whether LM Studio's last listing was read (its state is known, not stale)."""
        return self.catalog_known and self.last_error is None

    def require_catalog(self) -> None:
        """Raise why LM Studio's models are unknown, if they are."""
        if self.catalog_known:
            return
        if self.last_error is None or isinstance(self.last_error, UpstreamUnavailableError):
            raise UpstreamUnavailableError(
                f"LM Studio is not reachable at {self._client.base_url}", retry_after_s=5
            )
        raise self.last_error

    def note(self, error: ProxyError | None) -> None:
        """The outcome of a call: LM Studio is reachable unless the call could not reach it."""
        self.reachable = error is None or not isinstance(error, UpstreamUnavailableError)

    # -- loads and unloads --------------------------------------------------------------------

    async def load(self, key: str, *, timeout_s: float) -> LoadSucceeded | LoadFailed:
        """Load `key`, unless LM Studio holds it already; never raises a `ProxyError`.

        The caller guarantees no other load or unload runs meanwhile. The call stays open for
        `timeout_s` at most (docs/design.md §3.2: twice `load_timeout`).
        """
        started = self._clock()
        try:
            instance = await self._existing_instance(key)
            existing = instance is not None
            if instance is None:
                loaded = await self._client.load(key, self._load_options(key), timeout_s=timeout_s)
                instance = loaded.instance_id
                self.context_lengths[key] = loaded.context_length
        except ProxyError as exc:
            self.note(exc)
            return LoadFailed(exc)
        self.note(None)
        return LoadSucceeded(instance, self._clock() - started, existing)

    async def _existing_instance(self, key: str) -> str | None:
        """LM Studio's real state first: loading a loaded model would add a second instance."""
        catalog = await self._client.catalog()
        for info in catalog:
            if info.key == key and info.instances:
                self.context_lengths[key] = info.context_length
                return key if key in info.instances else info.instances[0]
        return None

    def _load_options(self, key: str) -> dict[str, Any]:
        options = self._settings.models.load_options.get(key)
        body: dict[str, Any] = dict(options.as_body()) if options is not None else {}
        if (context_length := self.context_overrides.get(key)) is not None:
            body["context_length"] = context_length
        return body

    async def unload(self, instance_id: str) -> ProxyError | None:
        """Unload one instance; the error if LM Studio did not, else None. Never raises."""
        try:
            await self._client.unload(instance_id)
        except ProxyError as exc:
            self.note(exc)
            return exc
        self.note(None)
        return None

    # -- reading LM Studio's state ------------------------------------------------------------

    async def observe(self) -> Observation | ProxyError | None:
        """Read LM Studio's catalogue and loaded instances; the error if it could not be read,
        or None if a listing started later has already been read (this one is stale).

        What was read becomes the catalogue (for names, sizes and context lengths) at once.
        Listings may overlap (a stuck one is not waited for, §3.3): only the latest started
        one that has ended counts.
        """
        started = self._clock()
        try:
            catalog = await self._client.catalog()
        except ProxyError as exc:
            if started < self.last_refresh:
                return None
            self.last_refresh = started
            self.note(exc)
            self.last_error = exc
            return exc
        if started < self.last_refresh:
            return None
        self.last_refresh = started
        self.note(None)
        self.last_error = None
        self.catalog = {info.key: info for info in catalog}
        self.context_lengths.update(
            {info.key: info.context_length for info in catalog if info.instances}
        )
        self.catalog_known = True
        return Observation(
            sizes={info.key: info.size_bytes for info in catalog},
            instances={info.key: info.instances for info in catalog if info.instances},
            started=started,
        )
