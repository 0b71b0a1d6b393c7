"""Run a ``ledgerq`` command with each hop of a task's pickup stamped, for
``runtime_bench.py hops``.

    python bench/hop_stamps.py OUT.json dispatcher --poll-interval 1
    python bench/hop_stamps.py OUT.json worker --app bench_app:tasks --queues bench

It wraps the runtime's seams (``time.monotonic()``, one clock for every process on
the machine) and, when the command exits, writes the stamps to OUT.json as
``[hop, task_id or null, seconds]`` rows:

- ``committed`` the enqueuing client's hand-off statement returned (committed)
- ``notify``   the dispatcher's wake-up event was set (a NOTIFY, mostly)
- ``due``      ``task_take_due`` returned the task (marked QUEUED, committed)
- ``push``     the task's member is in Redis (dispatcher, or the enqueuing client's
               hand-off)
- ``pop``      a worker's pop returned it
- ``claim``    ``claim_tasks`` returned it (the claim is committed)

The handler's own first line is stamped by ``bench_app``'s ``bench.hop`` task.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from ledgerq.dispatch import Dispatch, HandOff
from ledgerq.dispatcher import Dispatcher
from ledgerq.ledger import AsyncLedger, Ledger

STAMPS: list[tuple[str, int | None, float]] = []


def _stamp_ids(hop: str, ids: Any) -> None:
    now = time.monotonic()
    STAMPS.extend((hop, int(i), now) for i in ids)


_installed = False


def install() -> None:
    """Wrap the seams in this process (once)."""
    global _installed
    if _installed:
        return
    _installed = True

    class _StampedEvent(asyncio.Event):
        def set(self) -> None:
            if not self.is_set():
                STAMPS.append(("notify", None, time.monotonic()))
            super().set()

    original_init = Dispatcher.__init__

    def init(self: Dispatcher, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._wake = _StampedEvent()

    Dispatcher.__init__ = init  # type: ignore[method-assign]

    def after(cls: Any, name: str, hop: str, ids: Callable[[Any, tuple[Any, ...]], Any]) -> None:
        original = getattr(cls, name)

        async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = await original(self, *args, **kwargs)
            _stamp_ids(hop, ids(result, args))
            return result

        setattr(cls, name, wrapped)

    after(AsyncLedger, "take_due", "due", lambda rows, _: [r.id for r in rows])
    after(Dispatch, "push", "push", lambda _, args: [t.id for t in args[0]])
    after(Dispatch, "pop", "pop", lambda ids, _: ids)
    after(Dispatch, "pop_wait", "pop", lambda one, _: [one] if one is not None else [])
    after(AsyncLedger, "claim", "claim", lambda rows, _: [r.id for r in rows])
    # The worker claims through claim_reporting (flow control's deferrals too).
    after(AsyncLedger, "claim_reporting", "claim", lambda answer, _: [r.id for r in answer[0]])

    blocking_push = HandOff.push

    def hand_off_push(self: HandOff, tasks: Any) -> int:
        added = blocking_push(self, tasks)
        _stamp_ids("push", [t.id for t in tasks])
        return added

    HandOff.push = hand_off_push  # type: ignore[method-assign]

    enqueue_handing_off = Ledger.enqueue_handing_off

    def committed(self: Ledger, tasks: Any, *, many: bool) -> Any:
        answer = enqueue_handing_off(self, tasks, many=many)
        _stamp_ids("committed", [t.id for t in answer[0]])
        return answer

    Ledger.enqueue_handing_off = committed  # type: ignore[method-assign]


def main() -> None:
    out, command = sys.argv[1], sys.argv[2:]
    install()

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(STAMPS, f)

    atexit.register(dump)
    from ledgerq.cli import main as cli

    sys.argv = ["ledgerq", *command]
    cli()


if __name__ == "__main__":
    main()
