"""Fixtures of tests/sql only: the private pg_cron server, started early.

pg_cron 1.4 (Debian bookworm's) runs a job only when a wall-clock minute
begins, so its test may wait up to a minute for the first run. To hide that
wait, when test_pg_cron is selected its server is started on a background
thread as soon as collection ends, and its tests are moved to the end of the
run: the minute passes while the rest of the suite runs.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from .cron_server import CronServer, CronServerError

_CRON_MODULE = "test_pg_cron.py"
_cron_start: pytest.StashKey[Future[CronServer]] = pytest.StashKey()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: builds the wheel or starts a private PostgreSQL; runs by default"
        " (deselect with -m 'not slow')",
    )


def _start_cron_server() -> CronServer:
    server = CronServer()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


def _stop_when_started(future: Future[CronServer]) -> None:
    if future.exception() is None:
        future.result().stop()


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only what will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cron_items = [item for item in items if item.path.name == _CRON_MODULE]
    if not cron_items:
        return
    items[:] = [item for item in items if item.path.name != _CRON_MODULE] + cron_items
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-cron")
    future = executor.submit(_start_cron_server)
    executor.shutdown(wait=False)
    config.stash[_cron_start] = future
    config.add_cleanup(lambda: _stop_when_started(future))


@pytest.fixture(scope="session")
def cron_server(request: pytest.FixtureRequest) -> CronServer:
    """The private PostgreSQL with pg_cron and a scheduled reaper job."""
    future = request.config.stash.get(_cron_start, None)
    if future is None:  # not started at collection (e.g. called from elsewhere)
        future = Future()
        try:
            future.set_result(_start_cron_server())
        except BaseException as exc:
            future.set_exception(exc)
        request.addfinalizer(lambda: _stop_when_started(future))
    try:
        server = future.result(timeout=120)
    except CronServerError as exc:
        pytest.fail(f"could not start a private PostgreSQL with pg_cron: {exc}", pytrace=False)
    return server
