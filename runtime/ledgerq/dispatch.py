"""The only code that talks to Redis: key names and one typed method per operation.

Redis is the dispatcher, never the ledger: it holds task ids waiting for a
worker, and nothing PostgreSQL does not also know. Losing Redis costs latency,
not tasks (the dispatcher re-checks QUEUED tasks against it; reap_stuck
re-dispatches what it cannot account for).

Key layout (``P`` is LEDGERQ_REDIS_PREFIX; the braces are a Redis Cluster hash
tag that puts every key of one deployment in one slot, so multi-queue pops and
Lua scripts work unchanged on a cluster):

- ``{P}:queue:NAME``  sorted set of tasks waiting for a worker, in the order
  they must run: the score is minus the priority (higher first); among equal
  scores Redis compares members byte by byte, and a member is
  ``TURN|RUN_AT|ID`` (``task_member``), three fixed-width lowercase hex
  fields, so ties go to the lower flow-control turn, then the earlier run_at,
  then the older id. Workers read the id from the member's last field.
- ``{P}:epoch``       random token; a new one means Redis lost its data
- ``{P}:quarantine:NAME:TOKEN``  a key found under a queue's (or the epoch's)
  name holding another type of value, moved aside so it cannot stop dispatch
  (``dispatch.quarantined`` in the log says where it went)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from ledgerq import errors, types

TASK_ID_MAX = 2**63 - 1
# A member's fields: 16 hex digits each (64 bits), so byte order is numeric
# order. The turn is a signed bigint, shifted to be unsigned; run_at is
# counted in microseconds from the first instant the ledger accepts.
_FIELD_MAX = 2**64 - 1
_TURN_BIAS = 2**63
_RUN_AT_ORIGIN = datetime(1, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MEMBER_LENGTH = 16 * 3 + 2

# The longest a blocking pop waits in Redis. Every read on a connection may
# take this long plus a margin before it counts as a timeout: a socket timeout
# at or under the pop's own wait (redis-py's default is 5 s) turns an idle
# worker's empty pop into a false "Redis is unavailable".
POP_WAIT_MAX_S = 5.0
SOCKET_TIMEOUT_S = POP_WAIT_MAX_S + 10.0

log = logging.getLogger("ledgerq.dispatch")
T = TypeVar("T")


def task_score(priority: int) -> int:
    """Lower pops first: minus the priority (bounded to the ledger's range)."""
    return -min(max(priority, types.PRIORITY_MIN), types.PRIORITY_MAX)


def task_member(task: types.DueTask) -> str:
    """The task's member in its queue: ``TURN|RUN_AT|ID``, fixed-width lowercase
    hex, so that among equal priorities Redis's byte order is the contract's
    order (turn, then run_at, then id)."""
    turn = min(max(task.turn + _TURN_BIAS, 0), _FIELD_MAX)
    run_at = 0
    if task.run_at is not None:
        run_at = min(max((task.run_at - _RUN_AT_ORIGIN) // _MICROSECOND, 0), _FIELD_MAX)
    return f"{turn:016x}|{run_at:016x}|{task.id:016x}"


def _member_id(member: Any) -> int:
    """The task id a member names; 0 when it names none."""
    text = member.decode() if isinstance(member, bytes) else str(member)
    if len(text) == _MEMBER_LENGTH and text[16] == "|" and text[33] == "|":
        try:
            return int(text[34:], 16)
        except ValueError:
            return 0
    # A bare decimal id: what a dispatcher of an earlier version pushed.
    return int(text) if text.isdigit() and text.isascii() else 0


def _task_ids(members: Any) -> list[types.TaskId]:
    """Task ids from queue members; anything else someone put there is dropped
    (the ledger, not Redis, says what needs running)."""
    ids: list[types.TaskId] = []
    for member in members:
        task_id = _member_id(member)
        if 1 <= task_id <= TASK_ID_MAX:
            ids.append(types.TaskId(task_id))
        else:
            # Past bigint, an id would reach claim_tasks as numeric[] and fail
            # the whole claim: drop it here, with the member in the log.
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


def _wrong_type(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and "WRONGTYPE" in str(exc)


def queue_key(prefix: str, queue: str) -> str:
    return f"{{{prefix}}}:queue:{queue}"


def _members_by_queue(tasks: Sequence[types.DueTask]) -> dict[str, dict[str, int]]:
    by_queue: dict[str, dict[str, int]] = defaultdict(dict)
    for task in tasks:
        by_queue[task.queue][task_member(task)] = task_score(task.priority)
    return by_queue


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
        return queue_key(self.prefix, queue)

    def epoch_key(self) -> str:
        return f"{{{self.prefix}}}:epoch"

    def queue_of_key(self, key: str | bytes) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.queue_key("")) :]

    async def _call(
        self, keys: Sequence[str], expected: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """call(), translated; if one of keys holds another type than expected
        (WRONGTYPE: something else wrote under our prefix), move it aside and try
        once more, so one junk key cannot stop dispatch for every queue."""
        with _translated():
            try:
                return await call()
            except redis.exceptions.ResponseError as exc:
                if not _wrong_type(exc):
                    raise
                await self._quarantine(keys, expected)
                return await call()

    async def _quarantine(self, keys: Sequence[str], expected: str) -> None:
        for key in keys:
            kind = await self.client.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind in (expected, "none"):
                continue
            name = key[len(f"{{{self.prefix}}}:") :]
            aside = f"{{{self.prefix}}}:quarantine:{name}:{uuid.uuid4().hex[:8]}"
            await self.client.rename(key, aside)
            log.warning(
                "dispatch.quarantined %s holds a %s, not a %s: moved to %s",
                key,
                kind,
                expected,
                aside,
            )

    # operations
    async def ping(self) -> None:
        with _translated():
            await self.client.ping()

    async def push(self, tasks: Sequence[types.DueTask]) -> int:
        """Add tasks to their queues; a task already waiting is not added twice.

        Returns how many were new (after a quarantine's retry, those of the second try)."""
        if not tasks:
            return 0
        by_queue = _members_by_queue(tasks)

        async def add() -> int:
            if len(by_queue) == 1:
                ((queue, members),) = by_queue.items()
                added_one = await self.client.zadd(self.queue_key(queue), members, nx=True)
                return int(added_one or 0)
            async with self.client.pipeline(transaction=False) as pipe:
                for queue, members in by_queue.items():
                    pipe.zadd(self.queue_key(queue), members, nx=True)
                added = await pipe.execute()
            return sum(int(n) for n in added)

        return await self._call([self.queue_key(q) for q in by_queue], "zset", add)

    async def pop(self, queues: Sequence[str], count: int) -> list[types.TaskId]:
        """Take up to count ids at once without waiting, best first across queues."""
        if count < 1:
            return []
        keys = [self.queue_key(q) for q in queues]

        async def take() -> list[Any]:
            if len(keys) == 1:
                items: list[Any] = await self.client.zpopmin(keys[0], count)
                return [item[0] for item in items]
            taken: list[Any] = await self._pop_script(keys=keys, args=[count])
            return taken

        return _task_ids(await self._call(keys, "zset", take))

    async def pop_wait(self, queues: Sequence[str], timeout_s: float) -> types.TaskId | None:
        """Block until one id is available (None after timeout_s, at most POP_WAIT_MAX_S)."""
        keys = [self.queue_key(q) for q in queues]

        async def wait() -> Any:
            return await self.client.bzpopmin(keys, timeout=min(timeout_s, POP_WAIT_MAX_S))

        item = await self._call(keys, "zset", wait)
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
        order = list(by_queue.items())

        async def scores() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for queue, indexes in order:
                    pipe.zmscore(self.queue_key(queue), [task_member(tasks[i]) for i in indexes])
                replies: list[Any] = await pipe.execute()
            return replies

        replies = await self._call([self.queue_key(q) for q, _ in order], "zset", scores)
        for (_queue, indexes), scores_ in zip(order, replies, strict=True):
            for index, score in zip(indexes, scores_, strict=True):
                present[index] = score is not None
        return present

    async def epoch(self) -> str:
        """This Redis's dispatch epoch (created if missing)."""

        async def get() -> Any:
            return await self._epoch_script(keys=[self.epoch_key()], args=[uuid.uuid4().hex])

        value = await self._call([self.epoch_key()], "string", get)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def queue_lengths(self, queues: Sequence[str]) -> dict[str, int]:
        """How many ids wait in each queue."""
        if not queues:
            return {}

        async def count() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.zcard(self.queue_key(queue))
                counts: list[Any] = await pipe.execute()
            return counts

        counts = await self._call([self.queue_key(q) for q in queues], "zset", count)
        return {q: int(n) for q, n in zip(queues, counts, strict=True)}


class HandOff:
    """The one Redis call an enqueuing process makes, blocking: push the tasks it
    has just committed as QUEUED (``task_hand_off``), so they skip the
    dispatcher's round trip. Short timeouts: the ledger already holds the tasks,
    and a push that fails only leaves them to the dispatcher's sweep."""

    TIMEOUT_S = 1.0

    def __init__(self, client: redis.Redis | redis.RedisCluster, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    def connect(cls, redis_url: str, prefix: str, *, cluster: bool = False) -> HandOff:
        client: redis.Redis | redis.RedisCluster
        if cluster:
            client = redis.RedisCluster.from_url(
                redis_url, socket_connect_timeout=cls.TIMEOUT_S, socket_timeout=cls.TIMEOUT_S
            )
        else:
            client = redis.Redis.from_url(
                redis_url, socket_connect_timeout=cls.TIMEOUT_S, socket_timeout=cls.TIMEOUT_S
            )
        return cls(client, prefix)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def push(self, tasks: Sequence[types.DueTask]) -> int:
        """Dispatch.push, blocking; how many were new. DispatchError if Redis
        is unreachable or refuses (a junk key is left to the dispatcher)."""
        if not tasks:
            return 0
        by_queue = _members_by_queue(tasks)
        with _translated():
            if len(by_queue) == 1:
                # The common case, one queue: a plain call costs less than a pipeline.
                ((queue, members),) = by_queue.items()
                return int(self.client.zadd(queue_key(self.prefix, queue), members, nx=True) or 0)
            pipe = self.client.pipeline(transaction=False)
            for queue, members in by_queue.items():
                pipe.zadd(queue_key(self.prefix, queue), members, nx=True)
            return sum(int(n) for n in pipe.execute())


# After a failed hand-off, how long enqueues leave their tasks to the dispatcher
# before trying Redis again (an unreachable Redis must not slow every enqueue).
HAND_OFF_PAUSE_S = 5.0


class HandOffGate:
    """Whether an enqueuing process hands its tasks to Redis now: not when turned
    off, nor for HAND_OFF_PAUSE_S after a push failed (the dispatcher, which
    retries with backoff, delivers meanwhile)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._resume_at = 0.0

    def ready(self) -> bool:
        return self.enabled and time.monotonic() >= self._resume_at

    def failed(self, count: int, reason: str) -> None:
        self._resume_at = time.monotonic() + HAND_OFF_PAUSE_S
        log.warning(
            "dispatch.unavailable handing off %d task(s): %s; the dispatcher delivers them",
            count, reason,
        )  # fmt: skip

    async def push(self, dispatch: Dispatch, tasks: Sequence[types.DueTask]) -> None:
        """Push tasks the ledger already holds as QUEUED; a failure only pauses."""
        try:
            async with asyncio.timeout(HandOff.TIMEOUT_S):
                await dispatch.push(tasks)
        except TimeoutError:
            self.failed(len(tasks), f"Redis did not answer within {HandOff.TIMEOUT_S:g} s")
        except errors.DispatchError as exc:
            self.failed(len(tasks), exc.message)


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
