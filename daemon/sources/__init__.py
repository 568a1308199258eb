"""Reference sources: what decides which blobs are in use."""

from __future__ import annotations

import functools

import structlog

from daemon.config import Settings, registry_read_only_now
from daemon.sources.base import ReferenceSource


async def open_source(
    name: str, settings: Settings, log: structlog.typing.FilteringBoundLogger
) -> ReferenceSource:
    """The reference source called ``name`` (storage or openshift)."""
    if name == "openshift":
        from daemon.sources import openshift

        return await openshift.create(
            settings.kubeconfig,
            page_size=settings.api_page_size,
            request_timeout=settings.api_timeout,
            log=log,
        )
    from daemon.sources.storage import StorageSource

    # a delete run reads the registry's read-only flag again, not the one seen at start-up
    return StorageSource(
        concurrency=settings.workers,
        log=log,
        read_only=functools.partial(registry_read_only_now, settings),
        spill_dir=settings.state_dir,
    )
