"""configure_queue, pause_queue, resume_queue and the queue_settings view."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg.rows import dict_row

from .helpers import Conn, call_value, raises_sqlstate


def configure(conn: Conn, queue: str, settings: dict[str, Any]) -> Any:
    return call_value(conn, "configure_queue", queue=queue, settings=settings)


def settings_row(conn: Conn, queue: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT queue, paused, settings, updated_at FROM ledgerq.queue_settings WHERE queue = %s",
            (queue,),
        ).fetchone()


EVERY_SETTING = {
    "max_running": 10,
    "per_key_max_running": 2,
    "rate_per_second": 50,
    "per_key_rate_per_second": 0.5,
    "retry_rate_per_second": 2.5,
    "burst": 7,
    "retention": "3 days",
}


@pytest.mark.parametrize(("key", "value"), sorted(EVERY_SETTING.items()))
def test_each_setting_is_stored_and_returned(db: Conn, key: str, value: Any) -> None:
    assert configure(db, "mail", {key: value}) == {key: value}
    row = settings_row(db, "mail")
    assert row is not None
    assert row["settings"] == {key: value}
    assert row["paused"] is False


def test_settings_merge_and_null_removes(db: Conn) -> None:
    assert configure(db, "mail", {"max_running": 5, "rate_per_second": 10}) == {
        "max_running": 5,
        "rate_per_second": 10,
    }
    # A key left out is unchanged; a new key is added; a changed key is replaced.
    assert configure(db, "mail", {"burst": 3, "max_running": 6}) == {
        "max_running": 6,
        "rate_per_second": 10,
        "burst": 3,
    }
    # JSON null removes a key; removing one that is not set is harmless.
    assert configure(db, "mail", {"rate_per_second": None, "retention": None}) == {
        "max_running": 6,
        "burst": 3,
    }
    assert configure(db, "mail", {}) == {"max_running": 6, "burst": 3}
    # A queue configured for the first time with nulls only has no settings.
    assert configure(db, "other", {"max_running": None}) == {}
    # Queues do not share settings.
    row = settings_row(db, "mail")
    assert row is not None and row["settings"] == {"max_running": 6, "burst": 3}


def test_integral_numbers_are_stored_as_integers(db: Conn) -> None:
    assert configure(db, "mail", {"max_running": 5.0, "burst": 2.0}) == {
        "max_running": 5,
        "burst": 2,
    }


def test_updated_at_moves_on_each_change(db: Conn) -> None:
    configure(db, "mail", {"max_running": 1})
    first = settings_row(db, "mail")
    configure(db, "mail", {"max_running": 2})
    second = settings_row(db, "mail")
    assert first is not None and second is not None
    assert second["updated_at"] > first["updated_at"]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_runing": 1}, "max_runing"),
        ({"max_running": 0}, "max_running"),
        ({"max_running": -3}, "max_running"),
        ({"max_running": 1.5}, "max_running"),
        ({"max_running": "5"}, "max_running"),
        ({"max_running": True}, "max_running"),
        ({"max_running": 2147483648}, "max_running"),
        ({"per_key_max_running": 0}, "per_key_max_running"),
        ({"per_key_max_running": [1]}, "per_key_max_running"),
        ({"burst": 0}, "burst"),
        ({"burst": 2.5}, "burst"),
        ({"rate_per_second": 0}, "rate_per_second"),
        ({"rate_per_second": -1}, "rate_per_second"),
        ({"rate_per_second": "fast"}, "rate_per_second"),
        ({"rate_per_second": 1e12}, "rate_per_second"),
        ({"per_key_rate_per_second": 0}, "per_key_rate_per_second"),
        ({"retry_rate_per_second": {"n": 1}}, "retry_rate_per_second"),
        ({"retention": "soon"}, "retention"),
        ({"retention": "-3 days"}, "retention"),
        ({"retention": "0 seconds"}, "retention"),
        ({"retention": "infinity"}, "retention"),
        ({"retention": 3}, "retention"),
        # The first bad key is named, whatever else is valid beside it.
        ({"max_running": 2, "burst": -1}, "burst"),
    ],
)
def test_bad_setting_raises_lq422_naming_it(db: Conn, settings: dict[str, Any], named: str) -> None:
    configure(db, "mail", {"max_running": 9})
    with raises_sqlstate("LQ422", named):
        configure(db, "mail", settings)
    # Nothing was changed by the refused call.
    row = settings_row(db, "mail")
    assert row is not None and row["settings"] == {"max_running": 9}


def test_settings_must_be_an_object_and_queue_non_empty(db: Conn) -> None:
    from psycopg.types.json import Jsonb

    with raises_sqlstate("LQ422", "settings must be a JSON object"):
        db.execute("SELECT ledgerq.configure_queue(queue => 'mail', settings => %s)", (Jsonb([1]),))
    with raises_sqlstate("LQ422", "settings must be a JSON object"):
        db.execute("SELECT ledgerq.configure_queue(queue => 'mail', settings => NULL)")
    with raises_sqlstate("LQ422", "queue"):
        configure(db, " ", {"max_running": 1})
    with raises_sqlstate("LQ422", "queue"):
        call_value(db, "pause_queue", queue="")
    with raises_sqlstate("LQ422", "queue"):
        call_value(db, "resume_queue", queue=None)


def test_pause_and_resume_say_whether_the_state_changed(db: Conn) -> None:
    assert call_value(db, "resume_queue", queue="mail") is False  # never paused
    assert settings_row(db, "mail") is None
    assert call_value(db, "pause_queue", queue="mail") is True
    assert call_value(db, "pause_queue", queue="mail") is False
    row = settings_row(db, "mail")
    assert row is not None and row["paused"] is True and row["settings"] == {}
    assert call_value(db, "resume_queue", queue="mail") is True
    assert call_value(db, "resume_queue", queue="mail") is False
    row = settings_row(db, "mail")
    assert row is not None and row["paused"] is False


def test_pause_keeps_settings_and_configure_keeps_pause(db: Conn) -> None:
    configure(db, "mail", {"max_running": 3})
    assert call_value(db, "pause_queue", queue="mail") is True
    assert configure(db, "mail", {"burst": 2}) == {"max_running": 3, "burst": 2}
    row = settings_row(db, "mail")
    assert row is not None and row["paused"] is True
    assert row["settings"] == {"max_running": 3, "burst": 2}
