"""The operators' dashboard at ``/ui/``: server-rendered pages over the ledger.

Pages read through ``AsyncLedger`` (the HTTP API's methods plus the read-only
queries of ``ledgerq.reads``); every change goes through the same SQL
functions as the API (retry_task, cancel_task, pause_queue, ...). Sessions,
roles and CSRF tokens live in ``sessions``; the routes in ``pages`` (reads)
and ``actions`` (POST forms).
"""

from __future__ import annotations
