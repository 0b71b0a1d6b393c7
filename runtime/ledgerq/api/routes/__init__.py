"""The API's routes, one module per resource, each with a ``register(router)``:

- ``tasks``: enqueue (one or a batch), read, list, cancel, retry;
- ``queues``: the state of every queue;
- ``system``: health, readiness, Prometheus metrics.

A new resource (``/schedules``, say) is a new module here, registered in
``api/app.py``; a new route on a resource goes into that resource's module.
"""

from __future__ import annotations
