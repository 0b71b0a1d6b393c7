"""What the routes share: the ledger and dispatcher connections of one app."""

from __future__ import annotations

import dataclasses

from starlette.requests import Request

from ledgerq import errors
from ledgerq.api.batcher import EnqueueBatcher
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger


@dataclasses.dataclass(slots=True)
class Services:
    """The app's ledger and dispatcher, its enqueue batcher, and the metric series it set."""

    ledger: AsyncLedger
    dispatch: Dispatch
    enqueuer: EnqueueBatcher = dataclasses.field(init=False)
    #: (queue, status) pairs given a depth gauge, so a drained queue reads 0.
    depth_series: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    #: Queues given an oldest-pending gauge.
    age_series: set[str] = dataclasses.field(default_factory=set)
    #: Queues given a paused gauge, so a queue that was paused and is gone reads 0.
    paused_series: set[str] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        self.enqueuer = EnqueueBatcher(self.ledger)


def services(request: Request) -> Services:
    """The Services of the app serving request."""
    found: Services | None = request.app.state.services
    if found is None:  # only before start-up finished or after shutdown began
        raise errors.LedgerUnavailable(
            "the API is not connected to PostgreSQL and Redis: it is starting or stopping, "
            "or it is mounted in another app without ledgerq.api.lifespan(app)"
        )
    return found
