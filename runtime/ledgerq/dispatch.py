"""The only code that talks to Redis: key names and one typed method per operation.

Redis is the dispatcher, never the ledger: it holds task ids waiting for a
worker, and nothing PostgreSQL does not also know. Losing Redis costs latency,
not tasks (the dispatcher re-checks QUEUED tasks against it; reap_stuck
re-dispatches what it cannot account for).

Key layout (``P`` is LEDGERQ_REDIS_PREFIX; the braces are a Redis Cluster hash
tag that puts every key of one deployment in one slot, so multi-queue pops and
Lua scripts work unchanged on a cluster):

- ``{P}:queue:NAME``  sorted set of task ids; the score orders by priority
  (higher first) and then by task id (older first)
- ``{P}:epoch``       random token; a new one means Redis lost its data
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from ledgerq import errors, types

# Priorities take 16 bits above 37 bits of task id: 2^53, the exact range of
# the double Redis stores scores in.
_ID_BITS = 37

# The longest a blocking pop waits in Redis. Every read on a connection may
# take this long plus a margin before it counts as a timeout: a socket timeout
# at or under the pop's own wait (redis-py's default is 5 s) turns an idle
# worker's empty pop into a false "Redis is unavailable".
POP_WAIT_MAX_S = 5.0
SOCKET_TIMEOUT_S = POP_WAIT_MAX_S + 10.0

log = logging.getLogger("ledgerq.dispatch")


def task_score(priority: int, task_id: int) -> int:
    """Lower pops first: higher priority, then lower (older) id."""
    clamped = min(max(priority, types.PRIORITY_MIN), types.PRIORITY_MAX)
    return ((types.PRIORITY_MAX - clamped) << _ID_BITS) + (task_id & ((1 << _ID_BITS) - 1))


def _task_ids(members: Any) -> list[types.TaskId]:
    """Task ids from queue members; anything else someone put there is dropped
    (the ledger, not Redis, says what needs running)."""
    ids: list[types.TaskId] = []
    for member in members:
        try:
            ids.append(types.TaskId(int(member)))
        except (TypeError, ValueError):
            log.warning("dispatch.ignored a queue member that is not a task id: %r", member)
    return ids


def _lua(name: str) -> str:
    return (importlib.resources.files("ledgerq") / "lua" / f"{name}.lua").read_text()


@contextlib.contextmanager
def _translated() -> Any:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise errors.DispatchUnavailable(f"Redis is unavailable: {exc}") from exc
    except redis.exceptions.RedisClusterException as exc:
        # Not a RedisError: raised when no startup node of a cluster answers.
        if "cannot be connected" in str(exc):
            raise errors.DispatchUnavailable(f"Redis is unavailable: {exc}") from exc
        raise errors.DispatchError(f"Redis refused the call: {exc}") from exc
    except redis.exceptions.RedisError as exc:
        if "CLUSTERDOWN" in str(exc) or "MOVED" in str(exc) or "TRYAGAIN" in str(exc):
            raise errors.DispatchUnavailable(f"Redis is unavailable: {exc}") from exc
        raise errors.DispatchError(f"Redis refused the call: {exc}") from exc


class Dispatch:
    """Task ids on their way from the dispatcher to the workers."""

    def __init__(self, client: aioredis.Redis | RedisCluster, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._pop_script = client.register_script(_lua("task_pop"))
        self._epoch_script = client.register_script(_lua("epoch_get"))

    @classmethod
    def connect(
        cls, redis_url: str, prefix: str, *, cluster: bool = False, timeout_s: float = 10
    ) -> Dispatch:
        """A client for redis_url (connections are made lazily, on first use)."""
        client: aioredis.Redis | RedisCluster
        if cluster:
            # No read timeout, as on a single node: the cluster client's default
            # (5 s) cuts BZPOPMIN off before its own timeout and then retries it.
            client = RedisCluster.from_url(
                redis_url, socket_connect_timeout=timeout_s, socket_timeout=None
            )
        else:
            client = aioredis.Redis.from_url(
                redis_url,
                socket_connect_timeout=timeout_s,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_keepalive=True,
                health_check_interval=30,
            )
        return cls(client, prefix)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # keys
    def queue_key(self, queue: str) -> str:
        return f"{{{self.prefix}}}:queue:{queue}"

    def epoch_key(self) -> str:
        return f"{{{self.prefix}}}:epoch"

    def queue_of_key(self, key: str | bytes) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.queue_key("")) :]

    # operations
    async def ping(self) -> None:
        with _translated():
            await self.client.ping()

    async def push(self, tasks: Sequence[types.DueTask]) -> int:
        """Add task ids to their queues; an id already waiting is not added twice."""
        if not tasks:
            return 0
        by_queue: dict[str, dict[str, int]] = defaultdict(dict)
        for task in tasks:
            by_queue[task.queue][str(task.id)] = task_score(task.priority, task.id)
        with _translated():
            if len(by_queue) == 1:
                ((queue, members),) = by_queue.items()
                added_one = await self.client.zadd(self.queue_key(queue), members, nx=True)
                return int(added_one or 0)
            async with self.client.pipeline(transaction=False) as pipe:
                for queue, members in by_queue.items():
                    pipe.zadd(self.queue_key(queue), members, nx=True)
                added = await pipe.execute()
        return sum(int(n) for n in added)

    async def pop(self, queues: Sequence[str], count: int) -> list[types.TaskId]:
        """Take up to count ids at once without waiting, best first across queues."""
        if count < 1:
            return []
        with _translated():
            if len(queues) == 1:
                items: list[Any] = await self.client.zpopmin(self.queue_key(queues[0]), count)
                return _task_ids(item[0] for item in items)
            keys = [self.queue_key(q) for q in queues]
            taken = await self._pop_script(keys=keys, args=[count])
        return _task_ids(taken)

    async def pop_wait(self, queues: Sequence[str], timeout_s: float) -> types.TaskId | None:
        """Block until one id is available (None after timeout_s, at most POP_WAIT_MAX_S)."""
        keys = [self.queue_key(q) for q in queues]
        with _translated():
            item = await self.client.bzpopmin(keys, timeout=min(timeout_s, POP_WAIT_MAX_S))
        if not item:
            return None
        ids = _task_ids([item[1]])
        return ids[0] if ids else None

    async def waiting(self, tasks: Sequence[types.DueTask]) -> list[bool]:
        """For each task, whether its id is waiting in its queue right now."""
        if not tasks:
            return []
        by_queue: dict[str, list[int]] = defaultdict(list)
        for index, task in enumerate(tasks):
            by_queue[task.queue].append(index)
        present = [False] * len(tasks)
        with _translated():
            async with self.client.pipeline(transaction=False) as pipe:
                order = list(by_queue.items())
                for queue, indexes in order:
                    pipe.zmscore(self.queue_key(queue), [str(tasks[i].id) for i in indexes])
                replies = await pipe.execute()
        for (_queue, indexes), scores in zip(order, replies, strict=True):
            for index, score in zip(indexes, scores, strict=True):
                present[index] = score is not None
        return present

    async def epoch(self) -> str:
        """This Redis's dispatch epoch (created if missing)."""
        with _translated():
            value = await self._epoch_script(keys=[self.epoch_key()], args=[uuid.uuid4().hex])
        return value.decode() if isinstance(value, bytes) else str(value)

    async def queue_lengths(self, queues: Sequence[str]) -> dict[str, int]:
        """How many ids wait in each queue."""
        if not queues:
            return {}
        with _translated():
            async with self.client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.zcard(self.queue_key(queue))
                counts = await pipe.execute()
        return {q: int(n) for q, n in zip(queues, counts, strict=True)}


@contextlib.asynccontextmanager
async def connected(
    redis_url: str, prefix: str, *, cluster: bool = False
) -> AsyncIterator[Dispatch]:
    """A Dispatch that is closed when the block exits."""
    dispatch = Dispatch.connect(redis_url, prefix, cluster=cluster)
    try:
        yield dispatch
    finally:
        await dispatch.close()
