"""``ledgerq demo``: the whole system on a workload, each guarantee checked.

``run`` sets up and tears down (a database of its own, the processes);
``workload`` drives the running system through its HTTP API (``flow``: two
tenants in a queue under flow-control limits, paused, then resumed); ``checks`` reads
the ledger back and judges each guarantee; ``app`` is the task app the demo's
workers serve (``ledgerq.cli.demo.app:tasks``).
"""

from __future__ import annotations
