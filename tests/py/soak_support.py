"""A soak: real ``ledgerq`` processes under load while workers are killed (-9) and
Redis is flushed, then a count of what went wrong. Used by test_e2e_soak.py (a
short run in CI) and bench/soak.py (a long one).

Every task is ``e2e.effect_tx``: its handler writes one row through
``once_in_transaction`` and returns its attempt number. At the end:

- lost: tasks not SUCCEEDED (every task must finish, through every fault);
- duplicated: tasks whose exactly-once effect row is not exactly one;
- stale: tasks whose recorded result, effect or succeeded attempt is not that of
  their latest attempt (a stale attempt's completion was accepted).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import signal
import time
from pathlib import Path

import e2e_helpers as e2e
import e2e_servers


@dataclasses.dataclass(frozen=True)
class SoakReport:
    tasks: int
    succeeded: int
    lost: int
    duplicated: int
    stale: int
    worker_kills: int
    redis_flushes: int
    attempts: int
    seconds: float

    def line(self) -> str:
        return (
            f"soak: {self.tasks} tasks in {self.seconds:.1f} s, {self.worker_kills} worker "
            f"kill(s), {self.redis_flushes} Redis flush(es), {self.attempts} attempts: "
            f"lost {self.lost}, duplicated {self.duplicated}, stale {self.stale}"
        )


def run_soak(
    root: Path,
    database_url: str,
    redis: e2e_servers.PrivateRedis,
    *,
    tasks: int,
    waves: int,
    workers: int = 2,
    kills: int = 1,
    flushes: int = 1,
    sleep_s: float = 0.05,
    timeout_s: float = 120,
    seed: int = 1,
) -> SoakReport:
    """Enqueue tasks in waves; between waves kill a worker (-9, a new one starts)
    or flush Redis, until kills and flushes are spent; wait until every task is
    final (or timeout_s passes) and count."""
    chance = random.Random(seed)
    faults = ["kill"] * kills + ["flush"] * flushes
    chance.shuffle(faults)
    started = time.monotonic()
    with e2e.Deployment(root, database_url, redis.url, "soak") as d:
        d.extra_diagnostics.append(redis.describe)
        d.create_tables()
        d.dispatcher()
        d.reaper()
        live = [d.worker(concurrency=8) for _ in range(workers)]
        per_wave = max(1, tasks // waves)
        made = 0
        for wave in range(waves):
            count = tasks - made if wave == waves - 1 else per_wave
            d.enqueue_many(
                [
                    {"task_type": "e2e.effect_tx", "payload": {"n": made + n, "sleep_s": sleep_s}}
                    for n in range(count)
                ]
            )
            made += count
            if faults and wave < waves - 1:
                fault = faults.pop()
                if fault == "kill":
                    # Kill a worker mid-task, so the kill costs an attempt.
                    busy = d.wait_for(
                        functools.partial(_busy, d, [w.pid for w in live]), "a worker to run a task"
                    )
                    pick = chance.choice(sorted(busy))
                    victim = next(w for w in live if w.pid == pick)
                    live.remove(victim)
                    victim.send(signal.SIGKILL)
                    victim.wait_exit(10)
                    live.append(d.worker(concurrency=8))
                else:
                    client = redis.client()
                    try:
                        client.flushall()
                    finally:
                        client.close()
            time.sleep(chance.uniform(0.05, 0.3))
        d.wait_for(
            lambda: (
                not d.query(
                    "SELECT 1 FROM ledgerq.tasks WHERE status NOT IN ('SUCCEEDED', 'DEAD', "
                    "'CANCELLED') LIMIT 1"
                )
            ),
            f"all {tasks} tasks to finish",
            timeout_s,
        )
        report = _count(d, tasks, kills - faults.count("kill"), flushes - faults.count("flush"))
        d.assert_logs_clean()
    return dataclasses.replace(report, seconds=time.monotonic() - started)


def _busy(d: e2e.Deployment, pids: list[int]) -> set[int]:
    """The pids among pids running a task's current attempt right now."""
    rows = d.query(
        "SELECT DISTINCT r.pid FROM e2e_runs r JOIN ledgerq.tasks t ON t.id = r.task_id "
        "AND t.attempts = r.attempt WHERE r.pid = ANY(%s) AND t.status = 'RUNNING'",
        (pids,),
    )
    return {int(pid) for (pid,) in rows}


def _count(d: e2e.Deployment, tasks: int, kills: int, flushes: int) -> SoakReport:
    (succeeded,) = d.query_one("SELECT count(*) FROM ledgerq.tasks WHERE status = 'SUCCEEDED'") or (
        0,
    )
    (duplicated,) = d.query_one(
        "SELECT count(*) FROM ledgerq.tasks t WHERE t.status = 'SUCCEEDED' AND "
        "(SELECT count(*) FROM e2e_effects e WHERE e.task_id = t.id) <> 1"
    ) or (0,)
    (stale,) = d.query_one(
        """
        SELECT count(*) FROM ledgerq.tasks t
        WHERE t.status = 'SUCCEEDED' AND (
            (t.result ->> 'attempt')::int <> t.attempts
            OR (t.result -> 'effect' ->> 'by_attempt')::int <> t.attempts
            OR EXISTS (SELECT 1 FROM ledgerq.attempts a WHERE a.task_id = t.id
                       AND a.outcome = 'succeeded' AND a.attempt <> t.attempts))
        """
    ) or (0,)
    (attempts,) = d.query_one("SELECT count(*) FROM ledgerq.attempts") or (0,)
    (total,) = d.query_one("SELECT count(*) FROM ledgerq.tasks") or (0,)
    return SoakReport(
        tasks=int(total),
        succeeded=int(succeeded),
        lost=tasks - int(succeeded),
        duplicated=int(duplicated),
        stale=int(stale),
        worker_kills=kills,
        redis_flushes=flushes,
        attempts=int(attempts),
        seconds=0.0,
    )
