"""``python -m ledgerq.cli ARGS...``: ``ledgerq ARGS...`` as a supervised child.

``ledgerq run`` and ``ledgerq demo`` start their children this way (see
``supervise``): the child asks to die with its supervisor before it runs the
command, so even a ``kill -9`` of the supervisor leaves no orphans.
"""

from __future__ import annotations

import os

from ledgerq.cli import main, supervise

if __name__ == "__main__":
    supervise.die_with_parent(int(os.environ.get(supervise.SUPERVISOR_PID_ENV, os.getppid())))
    main(prog_name="ledgerq")
