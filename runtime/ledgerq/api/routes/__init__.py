"""The API's routes: ``tasks`` (enqueue, read, list, cancel, retry) and ``system``."""

from __future__ import annotations
