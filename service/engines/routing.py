"""Which adapter serves a request, kept in step with the registry: the hot-swap.

Every replica runs one ``AdapterRouter``. It polls the registry's active versions (a promotion
made by another replica, the CLI or the scheduler shows up within ``adapter_poll_seconds``) and
swaps in three steps:

1. load the new version into the engine under its own immutable id (``default@v7``), while the
   old one keeps serving;
2. flip the route: requests that start from now on get the new version;
3. unload the old version once no request holds it: a request takes a ``Lease`` on its adapter
   when it is planned and gives it back when its generation is over, so no request ever finds
   its adapter gone.

A version that fails to load keeps the old route (and is retried on the next poll): a broken
promotion degrades to "nothing changed", never to failed requests.

What the client names in ``model``: the base model's name serves the ``default`` segment's
active version (the base model itself while there is none); a segment's name serves that
segment's active version; a version id (``default@v3``) or a static adapter from
``PREFLOOP_LORA_ADAPTERS`` pins it, while it is loaded.

Live canaries (`service.loop.live_watch`, stored in `service.storage.experiments`): while a
segment runs an experiment, its candidate version is loaded too (and unloaded once the
experiment ends and no request holds it), and requests that name the segment are split per end
user: `adapters.canary.assign(experiment, subject, share)` sends a sticky share of subjects to
the candidate, the rest to the incumbent. A request without a subject, or one that pins a
version by name, is not split. A head-to-head turn
(`rival`) holds a second lease, on the arm the subject is not assigned to, for its other answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from adapters import canary
from adapters.registry import DEFAULT_SEGMENT, AdapterVersion, Registry
from service.core.errors import ModelNotFoundError
from service.engines.base import Engine
from service.storage.experiments import running as running_experiments
from service.storage.tables import Experiment

log = logging.getLogger(__name__)


class Lease:
    """One request's hold on an adapter (None: the base model). Released exactly once."""

    def __init__(self, router: AdapterRouter | None, adapter: str | None, segment: str):
        self.adapter = adapter
        self.segment = segment  # the adapter line the request belongs to (for its feedback)
        self._router = router

    def release(self) -> None:
        router, self._router = self._router, None
        if router is not None and self.adapter is not None:
            router._release(self.adapter)

    def __del__(self) -> None:  # a request dropped before it ran still gives its hold back
        self.release()


@dataclass(frozen=True)
class Split:
    """A running experiment as the router applies it."""

    experiment: str
    candidate: str
    incumbent: str | None  # the route it splits; another route (a promotion): no split
    share: float


class AdapterRouter:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        poll_seconds: float = 0.5,
        segments: tuple[str, ...] = (DEFAULT_SEGMENT,),
    ):
        self.engine = engine
        self.segments = segments  # names clients may use, with or without an active version
        self.registry = registry
        self.poll_seconds = poll_seconds
        self.routes: dict[str, str] = {}  # segment -> the version id new requests get
        self.splits: dict[str, Split] = {}  # segment -> its running canary, candidate loaded
        self.synced = False  # the first sync ran: the active versions are loaded
        self.load_errors: dict[str, str] = {}  # version id -> why it could not be loaded
        self._managed: set[str] = set()  # versions this router loaded (and may unload)
        self._unloading: set[str] = set()
        self._inflight: Counter[str] = Counter()
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()  # one sync at a time

    # --- requests ----------------------------------------------------------------------------
    def lease(self, model: str | None, subject: str | None = None) -> Lease:
        """The adapter for a request's ``model``, held until the lease is released. `subject`:
        the end user a running canary assigns to an arm (the same one every time)."""
        adapter, segment = self.resolve(model)
        split = self.splits.get(segment)
        if (
            split is not None
            and subject
            and adapter == split.incumbent  # the route it split: no promotion since
            and not self._pinned(model)
            and canary.assign(split.experiment, subject, split.share)
        ):
            adapter = split.candidate
        if adapter is not None:
            self._inflight[adapter] += 1
        return Lease(self, adapter, segment)

    def rival(self, model: str | None, lease: Lease) -> tuple[str, Lease] | None:
        """(experiment id, a lease on the other arm) when `lease` is one arm of its segment's
        running canary (a head-to-head turn answers once from each); else None."""
        split = self.splits.get(lease.segment)
        if split is None or self._pinned(model):
            return None
        arms = (split.candidate, split.incumbent)
        if self.resolve(model)[0] != split.incumbent or lease.adapter not in arms:
            return None  # the route changed (a promotion) since the split was made
        other = arms[1] if lease.adapter == split.candidate else arms[0]
        if other is not None:
            self._inflight[other] += 1
        return split.experiment, Lease(self, other, lease.segment)

    def _pinned(self, model: str | None) -> bool:
        """Does ``model`` name a version (not the base model's or a segment's name)?"""
        named = (None, "", self.engine.model_name, *self.segments, *self.routes)
        return model not in named

    def resolve(self, model: str | None) -> tuple[str | None, str]:
        """(the adapter to use, its segment) for a request's ``model``."""
        if model in (None, "", self.engine.model_name):
            return self.routes.get(DEFAULT_SEGMENT), DEFAULT_SEGMENT
        if model in self.routes or model in self.segments:
            return self.routes.get(model), model
        if model in self.engine.adapters() and model not in self._unloading:
            segment = model.split("@")[0] if "@" in model else DEFAULT_SEGMENT
            return model, segment
        raise ModelNotFoundError(
            f"the model {model!r} does not exist; GET /v1/models lists the available ones",
            param="model",
        )

    def _release(self, adapter: str) -> None:
        self._inflight[adapter] -= 1
        if self._inflight[adapter] <= 0:
            del self._inflight[adapter]
            if adapter in self._managed and adapter not in self._routed():
                self._kick.set()  # the last holder of a replaced version: unload it now

    def models(self) -> list[str]:
        """Names a client may use besides the base model's: segments, then loaded versions."""
        segments = sorted((set(self.routes) | set(self.segments)) - {DEFAULT_SEGMENT})
        if DEFAULT_SEGMENT in self.routes:
            segments.insert(0, DEFAULT_SEGMENT)
        return segments + sorted(set(self.engine.adapters()) - self._unloading)

    # --- keeping in step with the registry ---------------------------------------------------
    def kick(self) -> None:
        """Sync now (this process just promoted or rolled back)."""
        self._kick.set()

    async def sync(self) -> None:
        async with self._lock:
            active = await asyncio.to_thread(self.registry.active)
            experiments = await asyncio.to_thread(running_experiments, self.registry.db)
            await self._apply(active)
            await self._split(experiments)
            await self._unload_idle()
            self.synced = True

    async def _apply(self, active: dict[str, AdapterVersion]) -> None:
        for segment, version in active.items():
            if self.routes.get(segment) == version.id:
                continue
            if version.id not in self.engine.adapters():
                try:
                    await self.engine.load_adapter(version.id, version.path)
                except Exception as exc:  # noqa: BLE001 - keep serving the old route
                    if self.load_errors.get(version.id) is None:
                        log.error("cannot load %s from %s: %s", version.id, version.path, exc)
                    self.load_errors[version.id] = f"{type(exc).__name__}: {exc}"
                    continue
                self._managed.add(version.id)
                self.load_errors.pop(version.id, None)
            old = self.routes.get(segment)
            self.routes[segment] = version.id  # the flip: new requests get the new version
            log.info("segment %s now served by %s (was %s)", segment, version.id, old or "base")
        for segment in set(self.routes) - set(active):
            log.info(
                "segment %s now served by the base model (was %s)", segment, self.routes[segment]
            )
            del self.routes[segment]

    async def _split(self, experiments: list[Experiment]) -> None:
        """Load each running experiment's candidate, then split its segment."""
        splits = {}
        for exp in experiments:
            if exp.candidate not in self.engine.adapters():
                try:
                    version = await asyncio.to_thread(self.registry.get, exp.candidate)
                    await self.engine.load_adapter(version.id, version.path)
                except Exception as exc:  # noqa: BLE001 - no split: everyone gets the incumbent
                    if self.load_errors.get(exp.candidate) is None:
                        log.error("cannot load canary %s: %s", exp.candidate, exc)
                    self.load_errors[exp.candidate] = f"{type(exc).__name__}: {exc}"
                    continue
                self._managed.add(exp.candidate)
                self.load_errors.pop(exp.candidate, None)
            splits[exp.segment] = Split(exp.id, exp.candidate, exp.incumbent, exp.share)
        for segment in set(splits) - set(self.splits):
            log.info(
                "segment %s: canary %s on %s",
                segment,
                splits[segment].candidate,
                f"{splits[segment].share:.0%}",
            )
        self.splits = splits

    def _routed(self) -> set[str]:
        return set(self.routes.values()) | {s.candidate for s in self.splits.values()}

    async def _unload_idle(self) -> None:
        routed = self._routed()
        for name in sorted(self._managed - routed):
            if self._inflight[name] > 0:
                continue  # still finishing requests; the last release kicks another sync
            self._unloading.add(name)
            try:
                await self.engine.unload_adapter(name)
            except Exception as exc:  # noqa: BLE001 - still loaded: the next sync retries
                log.warning("could not unload %s (will retry): %s", name, exc)
                continue
            finally:
                self._unloading.discard(name)
            self._managed.discard(name)
            log.info("unloaded %s", name)

    async def release_all(self) -> None:
        """Unload every version this router loaded (an engine shared with another app)."""
        self.routes.clear()
        self.splits.clear()
        self._inflight.clear()
        await self._unload_idle()

    async def run(self) -> None:
        """Poll until cancelled; a kick syncs at once."""
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=self.poll_seconds)
            except TimeoutError:
                pass
            self._kick.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be briefly unavailable
                log.warning("adapter sync failed (retrying): %s", exc)
