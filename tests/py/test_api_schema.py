"""Schemathesis against a real ``ledgerq api``: generated requests, valid and invalid,
for every operation in /openapi.json; no 5xx, and every answer matches the schema
(status documented, content type, body shape), and invalid input is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from api_support import api_process
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from ledgerq import config

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 30
# The dashboard's pages and forms (HTML); a form posted without its CSRF token
# is refused with 403, which is what generated requests get.
DASHBOARD_OPERATIONS = {
    "GET /ui/", "GET /ui/tasks", "GET /ui/tasks/{task_id}", "GET /ui/dead", "GET /ui/schedules",
    "GET /ui/workers", "GET /ui/login", "POST /ui/login", "POST /ui/logout",
    "POST /ui/tasks/{task_id}/retry", "POST /ui/tasks/{task_id}/cancel", "POST /ui/dead/retry",
    "POST /ui/dead/retry-all", "POST /ui/queues/{queue}/pause", "POST /ui/queues/{queue}/resume",
    "POST /ui/queues/{queue}/settings", "POST /ui/schedules/{name}/pause",
    "POST /ui/schedules/{name}/resume",
}  # fmt: skip
CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def exercise(
    operation: Any,
    mode: GenerationMode,
    checks: list[Callable[..., Any]],
    base_url: str,
    session: requests.Session,
) -> None:
    """Send generated requests for one operation and check every answer."""

    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: a failure reproduces
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=base_url, session=session, checks=checks, timeout=10)

    run()


# About 2,000 requests: a minute on a quiet machine, more under load than the
# suite's default timeout allows.
@pytest.mark.timeout(600)
def test_api_answers_match_its_openapi_schema(settings: config.Settings) -> None:
    with api_process(settings) as api, requests.Session() as session:
        schema = schemathesis.openapi.from_url(f"{api.base_url}/openapi.json")
        operations = []
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result.err()  # the schema itself must load
            operations.append(result.ok())
        assert {op.label for op in operations} == {  # every route of the README's HTTP API
            "POST /tasks", "POST /tasks/batch", "GET /tasks", "GET /tasks/{task_id}",
            "POST /tasks/{task_id}/cancel", "POST /tasks/{task_id}/retry", "GET /queues",
            "PUT /queues/{queue}/settings", "POST /queues/{queue}/pause",
            "POST /queues/{queue}/resume",
            "GET /healthz", "GET /readyz", "GET /metrics",
            "GET /schedules", "POST /schedules/{name}/pause", "POST /schedules/{name}/resume",
        } | DASHBOARD_OPERATIONS  # fmt: skip

        for operation in operations:
            exercise(operation, GenerationMode.POSITIVE, CHECKS, api.base_url, session)
            if not list(operation.iter_parameters()) and not len(operation.body):
                continue  # no input to get wrong
            exercise(
                operation,
                GenerationMode.NEGATIVE,
                [*CHECKS, negative_data_rejection],
                api.base_url,
                session,
            )

        assert session.get(f"{api.base_url}/healthz", timeout=10).status_code == 200
