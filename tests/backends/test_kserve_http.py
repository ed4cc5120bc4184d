"""The KServe v2 HTTP client against plain asyncio servers that play Triton's part.

Each server here speaks raw HTTP on 127.0.0.1, so framing, keep-alive, closed connections
and broken answers can be produced exactly; the real Triton is called through this client
in tests/integration (every prediction there goes through it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import orjson
import pytest

from gateway.backends.kserve_http import (
    MAX_RESPONSE_BYTES,
    KServeClient,
    KServeError,
    KServeProtocolError,
    header_line,
    split_address,
)

# (request line, headers, body, n-th request on its connection) -> bytes to send, or None to
# close the connection without answering.
Handler = Callable[[bytes, dict[bytes, bytes], bytes, int], Awaitable[bytes | None]]
ROWS = {"features": np.array([[24.0, 89.99], [3.0, 20.5]], dtype=np.float32)}


def binary_answer(values: np.ndarray, name: str = "probability", extra: bytes = b"") -> bytes:
    """A 200 answer in Triton's binary form: JSON header, then the raw tensor."""
    data = values.astype(np.float32).tobytes()
    meta = orjson.dumps(
        {
            "model_name": "m",
            "model_version": "1",
            "outputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(values.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
        }
    )
    return (
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n%s\r\n"
            % (len(meta), len(meta) + len(data), extra)
        )
        + meta
        + data
    )


def output_spec(name: str, shape: list[int], size: int | None = None, **fields: object) -> dict:
    spec: dict = {"name": name, "datatype": "FP32", "shape": shape, **fields}
    if size is not None:
        spec["parameters"] = {"binary_data_size": size}
    return spec


def json_answer(status: int, payload: dict, extra: bytes = b"") -> bytes:
    body = orjson.dumps(payload)
    reason = {200: b"OK", 400: b"Bad Request", 503: b"Service Unavailable"}[status]
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
        % (status, reason, len(body), extra)
    ) + body


def outputs(*specs: dict) -> bytes:
    return json_answer(200, {"outputs": list(specs)})


class FakeTriton:
    """A raw HTTP/1.1 server: `handler` sees each request and returns the bytes to send
    (None closes the connection without answering)."""

    def __init__(self, handler: Handler, close_after_answer: bool = False) -> None:
        self.handler = handler
        self.close_after_answer = close_after_answer
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeTriton:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        nth = 0
        try:
            while True:
                nth += 1
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                start, *lines = head[:-4].split(b"\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)
                }
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                self.requests.append((start, headers, body))
                answer = await self.handler(start, headers, body, nth)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after_answer:
                    return
        finally:
            self.open_now -= 1
            writer.close()


async def always(answer: bytes) -> Handler:
    async def handler(start: bytes, headers: dict[bytes, bytes], body: bytes, nth: int) -> bytes:
        return answer

    return handler


async def test_an_inference_sends_binary_tensors_and_reads_the_binary_answer() -> None:
    expected = np.array([[0.25], [0.75]], dtype=np.float32)
    async with FakeTriton(await always(binary_answer(expected))) as triton:
        client = KServeClient(triton.url)
        try:
            output = await client.infer(
                "churn", "3", ROWS, "probability", timeout_us=400_000,
                headers={"traceparent": "00-abc-def-01"},
            )  # fmt: skip
        finally:
            await client.close()
    np.testing.assert_array_equal(output, expected)
    start, headers, body = triton.requests[0]
    assert start == b"POST /v2/models/churn/versions/3/infer HTTP/1.1"
    assert headers[b"accept-encoding"] == b"identity"
    assert headers[b"traceparent"] == b"00-abc-def-01"
    header_length = int(headers[b"inference-header-content-length"])
    meta = orjson.loads(body[:header_length])
    assert meta["inputs"] == [
        {"name": "features", "shape": [2, 2], "datatype": "FP32",
         "parameters": {"binary_data_size": 16}},
    ]  # fmt: skip
    assert meta["outputs"] == [{"name": "probability", "parameters": {"binary_data": True}}]
    assert meta["parameters"] == {"timeout": 400_000}
    sent = np.frombuffer(body[header_length:], dtype=np.float32).reshape(2, 2)
    np.testing.assert_array_equal(sent, ROWS["features"])


async def test_an_answer_with_json_data_is_read_too() -> None:
    payload = {
        "outputs": [{"name": "probability", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]
    }
    async with FakeTriton(await always(json_answer(200, payload))) as triton:
        client = KServeClient(triton.url)
        output = await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert output.shape == (1, 1) and output[0, 0] == pytest.approx(0.5)


async def test_the_named_output_is_found_after_others() -> None:
    first, second = np.array([1.0, 2.0], dtype=np.float32), np.array([0.9], dtype=np.float32)
    meta = orjson.dumps(
        {"outputs": [output_spec("logits", [2], 8), output_spec("probability", [1], 4)]}
    )
    body = meta + first.tobytes() + second.tobytes()
    answer = (
        b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(meta), len(body))
    ) + body
    async with FakeTriton(await always(answer)) as triton:
        client = KServeClient(triton.url)
        output = await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert output.tolist() == pytest.approx([0.9])


@pytest.mark.parametrize(
    ("status", "payload", "message"),
    [
        (400, {"error": "unexpected shape for input 'features'"}, "unexpected shape"),
        (503, {"error": "exceeds maximum queue size"}, "queue size"),
        (400, {"something": "else"}, '{"something":"else"}'),
    ],
)
async def test_an_error_status_raises_with_tritons_message(
    status: int, payload: dict, message: str
) -> None:
    async with FakeTriton(await always(json_answer(status, payload))) as triton:
        client = KServeClient(triton.url)
        with pytest.raises(KServeError) as caught:
            await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert caught.value.status == status
    assert message in caught.value.message


async def test_calls_reuse_one_keep_alive_connection() -> None:
    async with FakeTriton(await always(binary_answer(np.array([[0.1]])))) as triton:
        client = KServeClient(triton.url)
        for _ in range(5):
            await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert triton.connections == 1
    assert len(triton.requests) == 5


async def test_a_connection_idle_past_the_keepalive_is_closed_not_reused() -> None:
    """A connection idle longer than keepalive_s may have been dropped silently on the way."""
    async with FakeTriton(await always(binary_answer(np.array([[0.1]])))) as triton:
        client = KServeClient(triton.url, keepalive_s=0.05)
        await client.infer("m", "1", ROWS, "probability")
        await client.infer("m", "1", ROWS, "probability")  # at once: the same connection
        await asyncio.sleep(0.1)
        await client.infer("m", "1", ROWS, "probability")  # idle too long: a new one
        for _ in range(100):  # the stale one's close reaches the server a moment later
            if triton.open_now == 1:
                break
            await asyncio.sleep(0.01)
        still_open = triton.open_now
        await client.close()
    assert triton.connections == 2
    assert still_open == 1  # the stale one was closed, not left open beside the new one


async def test_concurrent_calls_never_open_more_than_the_limit() -> None:
    async def slow(start: bytes, headers: dict[bytes, bytes], body: bytes, nth: int) -> bytes:
        await asyncio.sleep(0.02)
        return binary_answer(np.array([[0.1]]))

    async with FakeTriton(slow) as triton:
        client = KServeClient(triton.url, max_connections=2)
        outputs = await asyncio.gather(
            *(client.infer("m", "1", ROWS, "probability") for _ in range(7))
        )
        await client.close()
    assert len(outputs) == 7
    assert triton.most_open == 2
    assert triton.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    answer = binary_answer(np.array([[0.3]]))
    async with FakeTriton(await always(answer), close_after_answer=True) as triton:
        client = KServeClient(triton.url)
        await client.infer("m", "1", ROWS, "probability")
        await asyncio.sleep(0.05)  # the close reaches the client while the connection is idle
        output = await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert output[0, 0] == pytest.approx(0.3)
    assert triton.connections == 2


async def test_a_reused_connection_closed_before_any_answer_byte_is_sent_again() -> None:
    """The keep-alive race: the server drops a kept connection as the next request goes out."""
    answer = binary_answer(np.array([[0.4]]))
    dropped: list[int] = []

    async def drop_the_second(start: bytes, headers: dict, body: bytes, nth: int) -> bytes | None:
        if nth == 2 and not dropped:
            dropped.append(nth)
            return None
        return answer

    async with FakeTriton(drop_the_second) as triton:
        client = KServeClient(triton.url)
        await client.infer("m", "1", ROWS, "probability")
        output = await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert output[0, 0] == pytest.approx(0.4)
    assert dropped == [2]
    assert len(triton.requests) == 3  # the dropped request was sent once more, on a new connection


async def test_a_new_connection_closed_before_answering_is_an_error_not_a_retry() -> None:
    async def drop(start: bytes, headers: dict, body: bytes, nth: int) -> None:
        return None

    async with FakeTriton(drop) as triton:
        client = KServeClient(triton.url)
        with pytest.raises(ConnectionResetError):
            await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert len(triton.requests) == 1


async def test_an_answer_cut_short_is_an_error_and_its_connection_is_dropped() -> None:
    whole = binary_answer(np.array([[0.5]]))
    calls: list[int] = []

    async def cut_the_first(start: bytes, headers: dict, body: bytes, nth: int) -> bytes:
        calls.append(nth)
        return whole[: len(whole) - 3] if len(calls) == 1 else whole

    async with FakeTriton(cut_the_first, close_after_answer=False) as triton:
        client = KServeClient(triton.url)
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.2):  # the rest never comes
                await client.infer("m", "1", ROWS, "probability")
        output = await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert output[0, 0] == pytest.approx(0.5)
    assert triton.connections == 2  # the abandoned connection was not reused


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "malformed HTTP answer"),
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed HTTP answer"),
        (json_answer(200, {"outputs": []}), "missing from the answer"),
        (json_answer(200, {"no": "outputs"}), "unreadable answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{nope", "unreadable answer"),
        (outputs(output_spec("probability", [1], datatype="BYTES", data=["x"])), "unsupported"),
        (outputs(output_spec("probability", [3], data=[1.0])), "probability"),
        (json_answer(200, {"outputs": []}, b"Content-Encoding: gzip\r\n"), "compressed answer"),
        (json_answer(200, {"outputs": [1]}), "not a list of objects"),
        (json_answer(200, {"outputs": {"name": "probability"}}), "not a list of objects"),
        (outputs(output_spec("probability", [], data=[0.5])), "datatype or shape"),
        (outputs(output_spec("probability", [1, "2"], data=[0.5])), "datatype or shape"),
        (outputs(output_spec("probability", [-1], data=[0.5])), "datatype or shape"),
    ],
)  # fmt: skip
async def test_an_answer_that_cannot_be_read_is_a_protocol_error(
    answer: bytes, fragment: str
) -> None:
    async with FakeTriton(await always(answer)) as triton:
        client = KServeClient(triton.url)
        with pytest.raises(KServeProtocolError, match=fragment):
            await client.infer("m", "1", ROWS, "probability")
        await client.close()


async def test_binary_output_shorter_than_announced_is_refused() -> None:
    whole = binary_answer(np.array([[0.5], [0.6]]))
    head, _, body = whole.partition(b"\r\n\r\n")
    short = head.replace(b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) - 4))
    async with FakeTriton(await always(short + b"\r\n\r\n" + body[:-4])) as triton:
        client = KServeClient(triton.url)
        with pytest.raises(KServeProtocolError, match="cut short"):
            await client.infer("m", "1", ROWS, "probability")
        await client.close()


async def test_an_answer_larger_than_the_limit_is_refused() -> None:
    size = MAX_RESPONSE_BYTES + 1
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    async with FakeTriton(await always(head + b" " * size)) as triton:
        client = KServeClient(triton.url)
        with pytest.raises(KServeProtocolError, match="larger than"):
            await client.infer("m", "1", ROWS, "probability")
        await client.close()


async def test_a_chunked_answer_is_read() -> None:
    whole = binary_answer(np.array([[0.7]]))
    head, _, body = whole.partition(b"\r\n\r\n")
    head = b"\r\n".join(
        line for line in head.split(b"\r\n") if not line.startswith(b"Content-Length")
    )
    chunked = head + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    for part in (body[:10], body[10:]):
        chunked += b"%x\r\n%s\r\n" % (len(part), part)
    chunked += b"0\r\n\r\n"
    async with FakeTriton(await always(chunked)) as triton:
        client = KServeClient(triton.url)
        output = await client.infer("m", "1", ROWS, "probability")
        await client.close()
    assert output[0, 0] == pytest.approx(0.7)


async def test_a_refused_connection_is_an_os_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = KServeClient(f"127.0.0.1:{port}")
    with pytest.raises(OSError):
        await client.infer("m", "1", ROWS, "probability")
    await client.close()


@pytest.mark.parametrize(("status", "ready"), [(200, True), (400, False), (503, False)])
async def test_the_ready_probe_reads_the_status(status: int, ready: bool) -> None:
    async with FakeTriton(await always(json_answer(status, {}))) as triton:
        client = KServeClient(triton.url)
        assert await client.is_model_ready("m", "2") is ready
        await client.close()
    assert triton.requests[0][0] == b"GET /v2/models/m/versions/2/ready HTTP/1.1"


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-ok", "a\r\nInjected: yes"), ("x-ok", "a\nb"), ("bad\r\nname", "v"), ("a:b", "v")],
)
def test_headers_that_would_split_the_request_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        header_line(name, value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("triton:80", ("triton", 80)),
        ("[::1]:9", ("::1", 9)),
    ],
)
def test_addresses_are_host_and_port(url: str, expected: tuple[str, int]) -> None:
    assert split_address(url) == expected


@pytest.mark.parametrize("url", ["triton", "triton:", ":8000", "http://triton:x"])
def test_addresses_without_a_port_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_address(url)
