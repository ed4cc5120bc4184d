"""GET /v1/predictions/{prediction_id}/explanation: the audit record that explains one decision.

`GET /v1/predictions/{prediction_id}` itself answers the envelope (api/async_predictions.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.access import authorize
from gateway.api.records import answer_record
from gateway.api.responses import json_response
from gateway.ids import is_prediction_id
from gateway.problems import Problem
from gateway.runtime import Runtime

router = APIRouter()


@router.get("/v1/predictions/{prediction_id}/explanation")
async def explain_prediction(request: Request, prediction_id: str) -> Response:
    """Which arm, which steps were tried and why, which rule matched, what was answered."""
    principal = await authorize(request, "audit:read")
    runtime: Runtime = request.app.state.runtime
    if not is_prediction_id(prediction_id):
        raise Problem(404, "unknown-prediction", "Unknown prediction", "no prediction has this id")
    record = await answer_record(runtime, prediction_id)
    if (
        record is None
        or record.get("type") != "prediction"
        or record.get("tenant") != principal.tenant  # another tenant's record: not found
    ):
        raise Problem(404, "unknown-prediction", "Unknown prediction", "no prediction has this id")
    return json_response(record)
