"""Flow control from Python: Client and AsyncClient configure, pause and resume
queues through the ledger's configure_queue, pause_queue and resume_queue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from ledgerq import AsyncClient, Client, config, errors

Conn = psycopg.Connection[Any]


@pytest.fixture
def client(settings: config.Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


@pytest.fixture
async def aclient(settings: config.Settings) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(settings) as c:
        yield c


def view(db: Conn) -> dict[str, tuple[bool, dict[str, Any]]]:
    """The queue_settings view: queue -> (paused, settings)."""
    rows = db.execute("SELECT queue, paused, settings FROM ledgerq.queue_settings").fetchall()
    return {queue: (paused, settings) for queue, paused, settings in rows}


def test_configure_queue_merges_and_returns_every_setting(client: Client, db: Conn) -> None:
    merged = client.configure_queue("mail", max_running=10, per_key_max_running=2)
    assert merged == {"max_running": 10, "per_key_max_running": 2}
    merged = client.configure_queue("mail", rate_per_second=2.5, max_running=None)
    assert merged == {"per_key_max_running": 2, "rate_per_second": 2.5}
    assert view(db) == {"mail": (False, {"per_key_max_running": 2, "rate_per_second": 2.5})}
    # No keys: nothing changes, and the answer is the queue's settings.
    assert client.configure_queue("mail") == merged


def test_a_retention_may_be_a_timedelta(client: Client, db: Conn) -> None:
    merged = client.configure_queue("reports", retention=timedelta(days=3))
    assert set(merged) == {"retention"}
    (interval,) = db.execute("SELECT (%s::text)::interval", (merged["retention"],)).fetchone() or ()
    assert interval == timedelta(days=3)


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ({"max_running": 0}, "max_running"),
        ({"per_key_max_running": 1.5}, "per_key_max_running"),
        ({"rate_per_second": -1}, "rate_per_second"),
        ({"burst": "ten"}, "burst"),
        ({"max_runing": 3}, "max_runing"),
    ],
)
def test_a_bad_setting_is_invalid_input_naming_the_key(
    client: Client, db: Conn, given: dict[str, Any], key: str
) -> None:
    client.configure_queue("mail", max_running=4)
    with pytest.raises(errors.InvalidInput, match=key):
        client.configure_queue("mail", **given)
    assert view(db) == {"mail": (False, {"max_running": 4})}


def test_a_value_that_is_not_json_is_refused_before_it_is_sent(client: Client, db: Conn) -> None:
    with pytest.raises(errors.InvalidInput, match="rate_per_second: nan is not JSON"):
        client.configure_queue("mail", rate_per_second=float("nan"))
    assert view(db) == {}


def test_pause_and_resume_say_whether_they_changed_the_queue(client: Client, db: Conn) -> None:
    assert client.pause_queue("mail") is True
    assert client.pause_queue("mail") is False
    assert view(db) == {"mail": (True, {})}
    client.configure_queue("mail", max_running=3)
    assert view(db) == {"mail": (True, {"max_running": 3})}, "settings leave the pause alone"
    assert client.resume_queue("mail") is True
    assert client.resume_queue("mail") is False
    assert view(db)["mail"] == (False, {"max_running": 3})
    assert client.resume_queue("never-paused") is False


async def test_the_async_client_does_the_same(aclient: AsyncClient, db: Conn) -> None:
    assert await aclient.configure_queue("mail", max_running=5) == {"max_running": 5}
    assert await aclient.pause_queue("mail") is True
    assert await aclient.pause_queue("mail") is False
    assert view(db) == {"mail": (True, {"max_running": 5})}
    with pytest.raises(errors.InvalidInput, match="max_running"):
        await aclient.configure_queue("mail", max_running=-2)
    assert await aclient.resume_queue("mail") is True
    assert view(db) == {"mail": (False, {"max_running": 5})}
