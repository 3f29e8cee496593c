"""The model side of the LM Studio emulator: loaded instances, loads, JIT, TTLs, change events
(docs/design.md §5.1, §5.3).

`proxy.emulator.Emulator` builds the HTTP surface on top; its handlers call the methods here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio

from proxy.emulator import replies
from proxy.emulator.catalog import CatalogModel, Instance, instance_config
from proxy.emulator.checks import RejectError, check_kind
from proxy.emulator.replies import Kind

JIT_DEFAULT_TTL_S = 3600.0  # "By default, JIT-loaded models have a TTL of 60 minutes." (§5.3)


class LoadFailedError(Exception):
    """A load the guardrail refused or the engine could not finish."""


class EmulatorState:
    """The catalogue, the loaded instances and the loads of an emulated LM Studio.

    The base of `proxy.emulator.Emulator`, which documents the knobs and records; use that.
    """

    def __init__(
        self,
        catalog: Iterable[CatalogModel],
        *,
        load_delay_s: float,
        load_bytes_per_s: float | None,
        memory_bytes: int | None,
        jit: bool,
        auto_evict: bool,
    ) -> None:
        self.catalog: dict[str, CatalogModel] = {model.key: model for model in catalog}
        self.load_delay_s = load_delay_s
        self.load_bytes_per_s = load_bytes_per_s  # if set, a load also takes size / this
        self.memory_bytes = memory_bytes
        self.jit = jit
        self.auto_evict = auto_evict
        self.fail_next_loads = 0
        # Concurrent JIT requests for one model share its load (True), or each loads an instance
        # of its own, as some LM Studio versions do (`key:2`, `key:3`... §4).
        self.jit_shares_loads = True
        self.most_loads_at_once = 0  # the most loads (REST or JIT) that ever ran together
        self.refusals = 0  # loads (REST or JIT) the memory guardrail refused
        self.instances: dict[str, Instance] = {}
        self._loads: list[str] = []
        self._unloads: list[str] = []
        self._loading: dict[str, CatalogModel] = {}
        self._jit_pending: dict[str, anyio.Event] = {}
        self._changed: anyio.Event | None = None  # created lazily, inside the event loop

    # --- records and notification ---------------------------------------------------------------

    def load_count(self, key: str | None = None) -> int:
        """Loads started over REST or by JIT, optionally for one key.

        Engine failures (`fail_next_loads`) count; guardrail refusals never start, so do not.
        """
        return sum(1 for k in self._loads if key is None or k == key)

    def unload_count(self, key: str | None = None) -> int:
        """REST unloads, auto-evictions and TTL expiries, optionally for one key."""
        return sum(1 for k in self._unloads if key is None or k == key)

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - public interface; applied with fail_after below
    ) -> None:
        """Wait until `predicate()` holds, re-checking on every state change; TimeoutError after
        `timeout` seconds."""
        with anyio.fail_after(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # --- state ---------------------------------------------------------------------------------

    def load_instance(self, key: str, *, jit: bool = False) -> Instance:
        """Load `key` instantly, as from LM Studio's UI (no delay, no guardrail, not counted)."""
        model = self.catalog[key]
        ttl_s = JIT_DEFAULT_TTL_S if jit else None
        return self._add(model, self._next_id(key), jit=jit, ttl_s=ttl_s, options={})

    def unload_instance(self, instance_id: str) -> None:
        """Unload instantly, as from LM Studio's UI; KeyError if not loaded."""
        self._unload(instance_id, counted=False)

    def _instances_of(self, key: str) -> list[Instance]:
        return [instance for instance in self.instances.values() if instance.key == key]

    def _next_id(self, key: str) -> str:
        taken = self.instances.keys() | self._loading.keys()
        if key not in taken:
            return key
        number = 2
        while f"{key}:{number}" in taken:
            number += 1
        return f"{key}:{number}"

    def _add(
        self,
        model: CatalogModel,
        instance_id: str,
        *,
        jit: bool,
        ttl_s: float | None,
        options: dict[str, Any],
    ) -> Instance:
        config = instance_config(model, options)
        instance = Instance(
            instance_id, model.key, config["context_length"], jit, ttl_s, time.monotonic(), config
        )
        self.instances[instance_id] = instance
        self._notify()
        return instance

    def _unload(self, instance_id: str, *, counted: bool) -> None:
        instance = self.instances.pop(instance_id)
        if counted:
            self._unloads.append(instance.key)
        self._notify()

    def _reap_expired(self) -> None:
        now = time.monotonic()
        for instance in list(self.instances.values()):
            if instance.ttl_s is not None and now - instance.last_used > instance.ttl_s:
                self._unload(instance.id, counted=True)

    def _check_memory(self, model: CatalogModel) -> None:
        if self.memory_bytes is None:
            return
        loaded = sum(self.catalog[i.key].size_bytes for i in self.instances.values())
        loading = sum(m.size_bytes for m in self._loading.values())
        if loaded + loading + model.size_bytes > self.memory_bytes:
            self.refusals += 1
            raise LoadFailedError(replies.guardrail_message(model))

    def load_time_s(self, model: CatalogModel) -> float:
        """How long a load of `model` takes: LM Studio reads the model's file from disk."""
        speed = self.load_bytes_per_s
        return self.load_delay_s + (model.size_bytes / speed if speed else 0.0)

    async def _load(
        self, model: CatalogModel, *, jit: bool, ttl_s: float | None, options: dict[str, Any]
    ) -> Instance:
        """Reserve an id, take `load_delay_s` (plus the model's size over `load_bytes_per_s`,
        if set), then list the instance.

        The delay is shielded: a client that goes away does not stop a load LM Studio would
        finish. The instance counts toward memory from the start but is listed only at the end.
        """
        self._check_memory(model)
        instance_id = self._next_id(model.key)
        fail = self.fail_next_loads > 0
        if fail:
            self.fail_next_loads -= 1
        self._loading[instance_id] = model
        self.most_loads_at_once = max(self.most_loads_at_once, len(self._loading))
        self._loads.append(model.key)
        self._notify()
        try:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(self.load_time_s(model))
        finally:
            # A load dies with its server: uvicorn's shutdown cancels handlers with asyncio's
            # own `Task.cancel`, which the shield does not hold off.
            del self._loading[instance_id]
            self._notify()
        if fail:
            raise LoadFailedError(
                f'Failed to load model "{model.key}". Error: model_load_failed '
                "(the engine process exited unexpectedly)"
            )
        return self._add(model, instance_id, jit=jit, ttl_s=ttl_s, options=options)

    # --- model resolution for inference ----------------------------------------------------------

    def _invalid_model(self, requested: str) -> RejectError:
        valid = list(self.catalog) if self.jit else list(self.instances)
        message = (
            f'Invalid model identifier "{requested}". Please specify a valid downloaded model '
            f"(e.g., {', '.join(valid[:3])})."
        )
        return RejectError(
            replies.openai_error(400, message, param="model", code="model_not_found")
        )

    async def _resolve(self, payload: dict[str, Any], kind: Kind) -> Instance:
        """The instance that answers: named by instance id or model key, JIT-loaded if needed."""
        requested = payload.get("model")
        if requested is None and self.instances:
            requested = next(iter(self.instances))  # LM Studio answers with what is loaded (§5.3)
        if requested is None or (not self.jit and not self.instances):
            raise RejectError(replies.openai_error(400, replies.NO_MODELS, param="model"))
        name = str(requested)
        instance = self.instances.get(name)
        model = self.catalog.get(instance.key if instance is not None else name)
        if model is None:
            raise self._invalid_model(name)
        check_kind(model, kind, name)
        if instance is not None:
            return instance
        return await self._loaded_or_jit(model, payload.get("ttl"))

    async def _loaded_or_jit(self, model: CatalogModel, ttl: object) -> Instance:
        """A loaded instance of `model`, loading one by JIT if there is none.

        Concurrent requests for the same model share one JIT load: latecomers wait on its event.
        """
        while not (loaded := self._instances_of(model.key)):
            if not self.jit:
                raise self._invalid_model(model.key)
            pending = self._jit_pending.get(model.key) if self.jit_shares_loads else None
            if pending is None:
                return await self._jit_load(model, ttl)
            await pending.wait()
        return loaded[0]

    async def _jit_load(self, model: CatalogModel, ttl: object) -> Instance:
        done = anyio.Event()
        if self.jit_shares_loads:
            self._jit_pending[model.key] = done
        try:
            if self.auto_evict:
                for instance in [i for i in self.instances.values() if i.jit]:
                    self._unload(instance.id, counted=True)
            ttl_s = JIT_DEFAULT_TTL_S
            if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
                ttl_s = float(ttl)  # `ttl` in the body applies to the load it triggers (§5.3)
            return await self._load(model, jit=True, ttl_s=ttl_s, options={})
        except LoadFailedError as exc:
            response = replies.openai_error(
                500, str(exc), param="model", code="model_load_failed", error_type="server_error"
            )
            raise RejectError(response) from exc
        finally:
            if self._jit_pending.get(model.key) is done:
                del self._jit_pending[model.key]
            done.set()
