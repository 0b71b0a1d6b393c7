"""The HTTP API (FastAPI): ``create_app(settings)`` builds it; ``ledgerq api`` serves it.

Modules, one job each: ``app`` (the factory and its lifespan), ``routes``
(the endpoints, one module per resource), ``schemas`` (request and response shapes), ``body``
(defensive body reading), ``auth`` (bearer tokens), ``errors`` (every failure
to one JSON error shape and status), ``state`` (what the routes share).
"""

from __future__ import annotations

from ledgerq.api.app import create_app, lifespan

__all__ = ["create_app", "lifespan"]
