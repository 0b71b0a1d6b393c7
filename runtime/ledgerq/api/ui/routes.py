"""Wiring the dashboard into an app: its state, pages and actions."""

from __future__ import annotations

from fastapi import FastAPI

from ledgerq.api.ui import actions, common, pages, sessions


def register(app: FastAPI, keys: sessions.Keys) -> None:
    """Serve the dashboard under /ui/ on app, signing sessions with keys."""
    app.state.ui = common.UiState(keys)
    pages.register(app)
    actions.register(app)
