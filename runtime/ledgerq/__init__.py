"""ledgerq: a task queue whose ledger is PostgreSQL and whose dispatcher is Redis."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
