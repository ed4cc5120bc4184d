"""Applying policy versions to the running gateway: from the admin API, from files, on rollback.

Every change goes the same way: the whole bundle is checked off the event loop, and only a
bundle that passes is swapped in, with one assignment; an invalid one leaves the running
version in place and says why (the caller's 422, a log event, a metric). Every action is
recorded in the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from gateway.policy import arm_model_changes
from gateway.policy_store import (
    Bundle,
    BundleError,
    PolicyHistory,
    PolicyVersion,
    load_bundle,
    read_bundle,
)
from gateway.runtime import Configuration, Runtime

log = logging.getLogger("gateway.policy")


class PolicyManager:
    """The running gateway's policy lifecycle: validate, apply, roll back, watch files."""

    def __init__(self, runtime: Runtime, env: Mapping[str, str]) -> None:
        self.runtime = runtime
        self.history = PolicyHistory()
        self._env = env
        self._lock = asyncio.Lock()  # one change at a time; requests never wait on it
        self._disk_hash: str | None = None
        self._on_applied: list[Callable[[PolicyVersion], Awaitable[None]]] = []

    def on_applied(self, hook: Callable[[PolicyVersion], Awaitable[None]]) -> None:
        """Await `hook(version)` after each version is applied (replica sync hooks in)."""
        self._on_applied.append(hook)

    def start_from_disk(self, bundle: Bundle | None = None) -> PolicyVersion:
        """Record the bundle the gateway started with as version 1: `bundle`, read before
        the configuration was loaded (an edit made since is the watcher's to apply), else
        the files now."""
        settings = self.runtime.settings
        if bundle is None:
            bundle = read_bundle(settings.policies_dir, settings.fallbacks_dir)
        self._disk_hash = bundle.content_hash
        return self.history.record(bundle, author="startup", source="files")

    async def validate(self, bundle: Bundle) -> list[str]:
        """Every fault of `bundle`, or none; changes nothing."""
        try:
            await self._load(bundle)
        except BundleError as error:
            return error.faults
        return []

    async def arm_model_changes(self, bundle: Bundle) -> list[dict[str, str]] | None:
        """The arms whose model `bundle` would change (their statistics start afresh), or
        None when the bundle does not load (`validate` lists why)."""
        try:
            config = await self._load(bundle)
        except BundleError:
            return None
        return arm_model_changes(self.runtime.policies.policies, config.policies.policies)

    async def apply(self, bundle: Bundle, author: str, source: str = "api") -> PolicyVersion:
        """Check and swap in `bundle`; BundleError (running version kept) when it fails."""
        async with self._lock:
            current = self.history.current
            if current is not None and current.content_hash == bundle.content_hash:
                return current  # already running: nothing to apply or announce
            try:
                config = await self._load(bundle)
            except BundleError as error:
                await self._refused(bundle.content_hash, author, source, error.faults)
                raise
            self.runtime.swap(config)
            version = self.history.record(bundle, author=author, source=source)
            self.runtime.metrics.policy_reloads.labels("applied").inc()
            log.warning("policy applied", extra={**version.summary()})
            await self._audit("apply", version.summary())
        for hook in self._on_applied:
            await hook(version)
        return version

    async def rollback(self, number: int, author: str) -> PolicyVersion:
        """Apply an earlier version's bundle again, as a new version; KeyError if unknown."""
        earlier = self.history.find(number)
        if earlier is None:
            raise KeyError(number)
        return await self.apply(earlier.bundle, author=author, source=f"rollback:{number}")

    async def watch_files(self, interval_s: float) -> None:
        """Apply what operators change on disk; an invalid change is refused and reported.

        Nothing one poll meets ends the watch: a file that cannot be read is refused as an
        invalid edit is, and anything unexpected is logged, then the next poll runs."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._apply_disk_changes()
            except Exception:
                log.exception("policy files could not be checked; watching on")

    async def _apply_disk_changes(self) -> None:
        settings = self.runtime.settings
        try:
            bundle = await asyncio.to_thread(
                read_bundle, settings.policies_dir, settings.fallbacks_dir
            )
        except BundleError as error:
            unreadable = "unreadable:" + "\n".join(error.faults)
            if unreadable != self._disk_hash:
                self._disk_hash = unreadable  # report it once, not every poll
                await self._refused(None, "files", "files", error.faults)
            return
        if bundle.content_hash == self._disk_hash:
            return
        self._disk_hash = bundle.content_hash  # report a bad edit once, not every poll
        # A refused bundle is already logged, counted and audited by apply().
        with contextlib.suppress(BundleError):
            await self.apply(bundle, author="files", source="files")

    async def _load(self, bundle: Bundle) -> Configuration:
        """`bundle` loaded off the event loop; BundleError for any failure, an unexpected one
        included (logged with its traceback): a bundle that cannot be loaded is refused, never
        a 500 for the operator, never the end of the file watcher."""
        try:
            return await asyncio.to_thread(load_bundle, bundle, self.runtime.settings, self._env)
        except BundleError:
            raise
        except Exception as error:
            log.exception("policy bundle could not be loaded")
            problem = " ".join(f"{type(error).__name__}: {error}".split())[:500]
            raise BundleError([f"(bundle): cannot be loaded: {problem}"]) from None

    async def _refused(
        self, content_hash: str | None, author: str, source: str, faults: list[str]
    ) -> None:
        self.runtime.metrics.policy_reloads.labels("refused").inc()
        details = {"author": author, "source": source, "content_hash": content_hash}
        log.warning("policy refused", extra={**details, "faults": faults})
        await self._audit("refused", {**details, "faults": faults[:50]})

    async def _audit(self, action: str, details: Mapping[str, object]) -> None:
        if self.runtime.audit is not None:
            await self.runtime.audit.append({"type": "admin", "action": action, **details})
