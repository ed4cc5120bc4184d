"""The Triton backend's pure parts: features into input tensors, the output into a probability.

No Triton here: the calls themselves are tested against a real Triton in tests/integration;
one test reads the request a call sends, from a plain socket server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from gateway.backends import BackendError, BackendRejected
from gateway.backends.kserve_http import KServeError
from gateway.backends.triton import TritonBackend, _translate, build_tensors, read_probability
from gateway.policy import TritonTarget

FEATURES = {"customer_id": "c-1", "tenure_months": 24, "monthly_charges": 89.99}


def target(inputs: list[dict[str, Any]], output: dict[str, Any] | None = None) -> TritonTarget:
    spec: dict[str, Any] = {"url": "triton:8000", "model": "m", "version": "1", "inputs": inputs}
    if output is not None:
        spec["output"] = output
    return TritonTarget.model_validate(spec)


ONE_INPUT = [{"name": "features", "features": ["tenure_months"]}]
SHIPPED_LIKE = target([{"name": "features", "features": ["tenure_months", "monthly_charges"]}])


# --- build_tensors -----------------------------------------------------------------------------


def test_build_tensors_is_one_row_in_policy_order():
    """Features go into a [1, n] FP32 tensor in the order the policy lists them."""
    tensors = build_tensors(SHIPPED_LIKE, FEATURES)
    assert list(tensors) == ["features"]
    array = tensors["features"]
    assert array.shape == (1, 2)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, np.array([[24.0, 89.99]], dtype=np.float32))


def test_build_tensors_follows_policy_order_not_feature_order():
    """Reversing the policy's feature list reverses the row, whatever the request's key order."""
    reversed_target = target([{"name": "x", "features": ["monthly_charges", "tenure_months"]}])
    row = build_tensors(reversed_target, FEATURES)["x"]
    np.testing.assert_array_equal(row, np.array([[89.99, 24.0]], dtype=np.float32))


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        ({"feature": "tenure_months"}, 24.0),
        ({"feature": "tenure_months", "scale": 0.5}, 12.0),
        ({"feature": "tenure_months", "offset": -4}, 20.0),
        ({"feature": "tenure_months", "scale": 2, "offset": 1}, 49.0),  # value * scale + offset
        ({"feature": "monthly_charges", "scale": 0.01, "offset": -0.5}, 89.99 * 0.01 - 0.5),
        ({"feature": "tenure_months", "scale": -1}, -24.0),
    ],
)
def test_build_tensors_scales_then_offsets(feature, expected):
    """Each value becomes `value * scale + offset`."""
    row = build_tensors(target([{"name": "x", "features": [feature]}]), FEATURES)["x"]
    assert row.shape == (1, 1)
    assert row[0, 0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"),
    [("FP32", np.float32), ("FP64", np.float64), ("INT32", np.int32), ("INT64", np.int64)],
)
def test_build_tensors_uses_the_policy_dtype(dtype, numpy_dtype):
    """The tensor's numpy dtype is the policy's Triton dtype."""
    spec = [{"name": "x", "dtype": dtype, "features": ["tenure_months", "tenure_months"]}]
    row = build_tensors(target(spec), FEATURES)["x"]
    assert row.dtype == numpy_dtype
    assert row.shape == (1, 2)
    assert row.tolist() == [[24, 24]]


def test_build_tensors_builds_every_input_tensor():
    """A target with several inputs gets one [1, n] tensor per input, each with its features."""
    two_inputs = target(
        [
            {"name": "tenure", "dtype": "INT64", "features": ["tenure_months"]},
            {"name": "money", "dtype": "FP64", "features": ["monthly_charges", "tenure_months"]},
        ]
    )
    tensors = build_tensors(two_inputs, FEATURES)
    assert list(tensors) == ["tenure", "money"]
    assert tensors["tenure"].shape == (1, 1)
    assert tensors["tenure"].tolist() == [[24]]
    assert tensors["money"].shape == (1, 2)
    assert tensors["money"].tolist() == [[89.99, 24.0]]


def test_build_tensors_takes_booleans_as_numbers():
    """A boolean feature becomes 1.0 or 0.0."""
    flag = target([{"name": "x", "features": ["flag"]}])
    assert build_tensors(flag, {"flag": True})["x"].tolist() == [[1.0]]
    assert build_tensors(flag, {"flag": False})["x"].tolist() == [[0.0]]


# --- read_probability ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "index", "expected"),
    [
        (np.array([[0.73]], dtype=np.float32), 0, 0.73),
        (np.array([0.73], dtype=np.float32), 0, 0.73),
        (np.array([[0.27, 0.73]], dtype=np.float32), 1, 0.73),
        (np.array([[0.27, 0.73]], dtype=np.float32), 0, 0.27),
        (np.array([[0.0]]), 0, 0.0),
        (np.array([[1.0]]), 0, 1.0),
        (np.array([[[0.1], [0.9]]]), 1, 0.9),  # any shape is read flat
    ],
)
def test_read_probability_reads_the_indexed_element(output, index, expected):
    """The probability is the output tensor's element at `index`, flattened, as a float."""
    spec = target(ONE_INPUT, {"name": "probability", "index": index})
    value = read_probability(output, spec)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("output", "index", "fragment"),
    [
        (None, 0, "output 'probability' missing from the answer"),
        (np.array([[0.5]]), 1, "output 'probability' has no element 1"),
        (np.array([], dtype=np.float32), 0, "has no element 0"),
        (np.array([[1.0001]]), 0, "is not a probability"),
        (np.array([[-0.01]]), 0, "is not a probability"),
        (np.array([[3.0]]), 0, "is not a probability"),
        (np.array([[np.nan]]), 0, "is not a probability"),
        (np.array([[np.inf]]), 0, "is not a probability"),
    ],
    ids=["missing", "index-out-of-range", "empty", "over-one", "negative", "logit", "nan", "inf"],
)
def test_read_probability_refuses_what_is_not_a_probability(output, index, fragment):
    """A missing output, a missing element or a value outside [0, 1] is a plain BackendError
    (counted against the backend, never retried)."""
    spec = target(ONE_INPUT, {"name": "probability", "index": index})
    with pytest.raises(BackendError) as caught:
        read_probability(output, spec)
    assert type(caught.value) is BackendError
    assert caught.value.transient is False
    assert caught.value.reason == "backend_error"
    assert fragment in str(caught.value)


# --- the call --------------------------------------------------------------------------------


async def test_calls_ask_for_an_uncompressed_answer() -> None:
    """Every inference call sends `Accept-Encoding: identity`, so Triton never gzips an answer."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append((await reader.readuntil(b"\r\n\r\n")).lower())
        body = b'{"error":"refused"}'
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = {"url": f"127.0.0.1:{port}", "model": "m", "version": "1", "inputs": ONE_INPUT}
    backend = TritonBackend("t", TritonTarget.model_validate(spec))
    try:
        with pytest.raises(BackendError):
            await backend.predict(
                FEATURES, 2.0, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-00"}
            )
    finally:
        await backend.close()
        server.close()
    assert b"accept-encoding: identity" in heads[0]
    assert b"traceparent: 00-" in heads[0]  # the caller's headers still go along


@pytest.mark.parametrize(
    ("status", "kind", "counts_against_the_target"),
    [
        (400, "BackendRejected", False),  # a malformed request: the mapping's fault
        (404, "BackendError", True),  # the pinned model or version is not loaded there
        (429, "BackendOverloaded", True),
        (503, "BackendOverloaded", True),
        (500, "BackendError", True),
    ],
)
def test_an_error_status_becomes_the_failure_the_chain_reasons_about(
    status, kind, counts_against_the_target
):
    error = _translate(KServeError(status, "detail"))
    assert type(error).__name__ == kind
    assert (not isinstance(error, BackendRejected)) is counts_against_the_target
