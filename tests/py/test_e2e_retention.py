"""A real `ledgerq reaper` prunes finished tasks on its own (`--prune-interval`,
`--retention`), counts them in its metrics, does nothing of the kind with
`--no-prune`, and refuses a retention that is no interval (exit 2)."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import e2e_helpers as e2e
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture
def deployment(
    tmp_path: Path, db_url: str, redis_url: str, redis_prefix: str
) -> Iterator[e2e.Deployment]:
    with e2e.Deployment(tmp_path, db_url, redis_url, redis_prefix) as d:
        yield d


def finished_task(d: e2e.Deployment, *, succeeded: bool = True, ago: str = "1 hour") -> int:
    """A task that finished ``ago`` (SUCCEEDED, or DEAD), through the ledger's functions."""
    task_id = d.enqueue("job", max_attempts=1)
    row = d.query_one(
        "SELECT attempts FROM ledgerq.claim_task(task_id => %s, worker_id => 'w')", (task_id,)
    )
    assert row is not None
    d.query(
        "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => %s)",
        (task_id, row[0], succeeded),
    )
    d.conn().execute(
        "UPDATE ledgerq.tasks SET finished_at = now() - %s::interval WHERE id = %s", (ago, task_id)
    )
    return task_id


def stuck_task(d: e2e.Deployment) -> int:
    """A RUNNING task whose lease expired: the reaper's next sweep sends it back to PENDING."""
    task_id = d.enqueue("job")
    d.query("SELECT 1 FROM ledgerq.claim_task(task_id => %s, worker_id => 'gone')", (task_id,))
    d.conn().execute(
        "UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (task_id,),
    )
    return task_id


def existing(d: e2e.Deployment, ids: list[int]) -> set[int]:
    return {r[0] for r in d.query("SELECT id FROM ledgerq.tasks WHERE id = ANY(%s)", (ids,))}


def test_reaper_prunes_old_finished_tasks_on_its_own_and_counts_them(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    old = [finished_task(d) for _ in range(3)]
    dead = finished_task(d, succeeded=False)
    pending = d.enqueue("job")
    port = e2e.free_port()
    d.reaper("--prune-interval", "1", "--retention", "1 second", "--metrics-port", str(port))

    d.wait_for(lambda: not existing(d, old), "the reaper to prune the old SUCCEEDED tasks")
    assert existing(d, [dead, pending]) == {dead, pending}
    assert d.query_one("SELECT count(*) FROM ledgerq.attempts WHERE task_id = ANY(%s)", (old,)) == (
        0,
    )

    # A task that finishes now is pruned about a second later, by a later pass.
    later = finished_task(d, ago="0 seconds")
    d.wait_for(lambda: not existing(d, [later]), "the reaper to prune a task finished later")

    def pruned_total() -> float | None:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for line in body.decode().splitlines():
            if line.startswith("ledgerq_tasks_pruned_total "):
                return float(line.split()[1])
        return None

    assert d.wait_for(lambda: pruned_total() == 4.0, "ledgerq_tasks_pruned_total to be 4")
    d.assert_logs_clean()


def test_reaper_with_no_prune_keeps_finished_tasks(deployment: e2e.Deployment) -> None:
    d = deployment
    old = finished_task(d, ago="1 day")
    d.reaper("--no-prune", "--prune-interval", "0.1", "--retention", "1 second")
    # Two sweeps that each recovered a stuck task: prune intervals passed between them.
    for _ in range(2):
        stuck = stuck_task(d)
        d.wait_for(lambda s=stuck: d.task(s)["status"] == "PENDING", "the reaper to sweep")
    assert existing(d, [old]) == {old}
    d.assert_logs_clean()


@pytest.mark.parametrize("retention", ["soon", "-1 day", "7 dayz", ""])
def test_reaper_refuses_a_retention_that_is_not_an_interval(retention: str) -> None:
    done = subprocess.run(
        [str(e2e.LEDGERQ), "reaper", "--retention", retention],
        capture_output=True,
        text=True,
        timeout=30,
        env={"LEDGERQ_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--retention" in lines[0] and repr(retention) in lines[0]
