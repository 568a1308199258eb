"""A fixed number of asyncio workers taking items from one shared feed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def each(items: Iterable[T], work: Callable[[T], Awaitable[object]], workers: int) -> None:
    """``work`` on every item, ``workers`` at a time, taking items lazily (a generator of
    chunks is never materialised); the first failure cancels the rest."""
    feed = iter(items)

    async def worker() -> None:
        for item in feed:
            await work(item)

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, workers))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


async def in_parallel(
    items: Iterable[T], work: Callable[[T], Awaitable[R]], workers: int
) -> list[R]:
    """``work`` of each item, ``workers`` at a time; results in the items' order."""
    todo = list(items)
    results: list[R | None] = [None] * len(todo)

    async def one(pair: tuple[int, T]) -> None:
        index, item = pair
        results[index] = await work(item)

    await each(enumerate(todo), one, min(workers, len(todo)))
    return results  # type: ignore[return-value]
