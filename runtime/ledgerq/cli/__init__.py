"""The ``ledgerq`` command line: the click group ``main`` and the commands it adds.

Modules, one job each (docs/architecture.md draws them):

- ``common``: the group class, the one rule from an error to an exit status,
  the options written once, opening the ledger and the dispatcher;
- ``render``: plain text for a terminal (tables, colours, the demo's screen);
- ``services``: ``migrate``, ``worker``, ``dispatcher``, ``reaper``, ``api``;
- ``operators``: ``enqueue``, ``show``, ``stats``, ``dead``, ``cancel``;
- ``queues``: ``queues`` (list) and ``queues pause|resume|set``;
- ``schedules``: ``schedules`` (list) and ``schedules pause|resume|delete``;
- ``dev``: ``run``, ``demo``, ``bench``;
- ``supervise``: child processes for ``run`` and ``demo``, stopped as one;
- ``bench``: the runner behind ``ledgerq bench``;
- ``demo/``: the demo (its runner, its workload, its checks, its task app);
- ``__main__``: ``python -m ledgerq.cli``, a supervised child.

This module imports the commands and adds them to ``main``; no command imports
``main``, so there is no registration by import side effect.
"""

from __future__ import annotations

import click

from ledgerq import __version__
from ledgerq.cli import common, dev, operators, queues, schedules, services


@click.group(cls=common.Group, context_settings=common.CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="ledgerq")
def main() -> None:
    """ledgerq: a task queue whose ledger is PostgreSQL and whose dispatcher is Redis."""


for _command in (
    services.migrate,
    services.worker,
    services.dispatcher,
    services.reaper,
    services.api,
    operators.enqueue,
    operators.show,
    operators.stats,
    operators.task_types,
    operators.dead,
    operators.cancel,
    queues.queues,
    schedules.schedules,
    dev.run,
    dev.demo,
    dev.bench,
):
    main.add_command(_command)

__all__ = ["main"]
