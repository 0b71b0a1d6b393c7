"""ledgerq: a task queue whose ledger is PostgreSQL and whose dispatcher is Redis.

Tasks are never lost (PostgreSQL holds every state change; Redis only carries
ids) and never run twice at once (leases fenced by attempt numbers, effects
recorded once).
"""

from __future__ import annotations

from ledgerq.client import AsyncClient, Client
from ledgerq.errors import InvalidPayload, NonRetryable, Retryable
from ledgerq.registry import Context, Registry
from ledgerq.types import Task, TaskStatus

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Context",
    "InvalidPayload",
    "NonRetryable",
    "Registry",
    "Retryable",
    "Task",
    "TaskStatus",
    "__version__",
]
