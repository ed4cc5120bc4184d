"""Response helpers shared by every handler: JSON and problem+json, serialised with orjson."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from gateway.problems import PROBLEM_MEDIA_TYPE, Problem


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type="application/json")


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    return Response(
        orjson.dumps(problem.to_dict(instance)),
        problem.status,
        problem.headers or None,
        media_type=PROBLEM_MEDIA_TYPE,
    )
