"""One client's added latency, measured in pairs: a direct Triton request, then a gateway one.

    python bench/paired.py                 # 2,000 pairs after 200 warm-up pairs
    python bench/paired.py --pairs 5000 --repeat 3

The 1-client rows of `run.py` come minutes apart, and the demo Triton's own latency at one
client drifts by 1-2 ms over minutes, which is more than the goal being checked (a cache miss
within 1 ms of direct Triton). Here each gateway request (a new customer, so a cache miss)
and a direct request to the same Triton go one right after the other, from one blocking client
on two kept-alive sockets, so both see the same Triton state; the report is p50(gateway) -
p50(direct) and the p50 of the per-pair differences. Which goes first alternates from pair to
pair: the first meets a Triton that idled through the gap, the second one that has just
served, and before Round 7 the direct request was always first, which flattered the gateway
(the report shows each order's p50 difference apart). Starts its own Triton and gateway on
127.0.0.1, as run.py does.

After each pair the client waits `--gap-ms` (default 10) before the next pair: the
shipped policy shadows a quarter of the gateway's requests to another model on the same Triton,
after the answer, and the demo Triton serves one call at a time, so without the gap a quarter
of the direct requests would queue behind a shadow call and flatter the gateway.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import Gateway, Triton

TRITON_BODY = b'{"inputs":[{"name":"features","shape":[1,2],"datatype":"FP32","data":[24,89.99]}]}'


def post(path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )


def exchange(sock: socket.socket, request: bytes) -> int:
    """Send one request, read its whole answer (Content-Length framed); the status code."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(v) for k, _, v in (x.partition(b":") for x in lines[1:])
                  if k.strip().lower() == b"content-length")  # fmt: skip
    while len(body) < length:
        body += _recv(sock)
    return int(lines[0].split()[1])


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection")
    return chunk


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def gateway_request(run: int, i: int) -> bytes:
    body = (
        b'{"model_id":"customer-churn","features":{"customer_id":"paired-%d-%d",'
        b'"tenure_months":24,"monthly_charges":%.2f}}' % (run, i, (i % 20000) / 100)
    )
    return post("/v1/predictions", body)


def measure(
    triton_port: int, gateway_port: int, pairs: int, warmup: int, run: int, gap_s: float
) -> dict:
    direct, through = connect("127.0.0.1", triton_port), connect("127.0.0.1", gateway_port)
    to_triton = post("/v2/models/churn_gbm/infer", TRITON_BODY)
    d_ms: list[float] = []
    g_ms: list[float] = []
    firsts: list[bool] = []
    try:
        for i in range(warmup + pairs):
            # The first of a pair meets a Triton idle for the gap, the second one just used:
            # the order alternates, so each side gets each place in half the pairs.
            gateway_first = i % 2 == 1
            to_gateway = gateway_request(run, i)
            if gateway_first:
                status_g, status_d, g_s, d_s = _timed_pair(through, to_gateway, direct, to_triton)
            else:
                status_d, status_g, d_s, g_s = _timed_pair(direct, to_triton, through, to_gateway)
            if (status_d, status_g) != (200, 200):
                raise RuntimeError(f"pair {i}: direct {status_d}, gateway {status_g}")
            time.sleep(gap_s)  # the gateway's shadow call, if any, ends before the next pair
            if i >= warmup:
                d_ms.append(d_s * 1000)
                g_ms.append(g_s * 1000)
                firsts.append(gateway_first)
    finally:
        direct.close()
        through.close()
    return summary(d_ms, g_ms, firsts)


def _timed_pair(
    first: socket.socket, first_request: bytes, second: socket.socket, second_request: bytes
) -> tuple[int, int, float, float]:
    """Both exchanges one right after the other: their statuses and seconds, in that order."""
    started = time.perf_counter()
    status_first = exchange(first, first_request)
    middle = time.perf_counter()
    status_second = exchange(second, second_request)
    return status_first, status_second, middle - started, time.perf_counter() - middle


def summary(d_ms: list[float], g_ms: list[float], gateway_first: list[bool]) -> dict:
    def q(values: list[float], p: float) -> float:
        return round(sorted(values)[int(len(values) * p)], 3)

    diffs = [g - d for d, g in zip(d_ms, g_ms, strict=True)]
    first = [d for d, f in zip(diffs, gateway_first, strict=True) if f]
    second = [d for d, f in zip(diffs, gateway_first, strict=True) if not f]
    return {
        "pairs": len(d_ms),
        "direct_p50_ms": q(d_ms, 0.5),
        "direct_p90_ms": q(d_ms, 0.9),
        "gateway_p50_ms": q(g_ms, 0.5),
        "gateway_p90_ms": q(g_ms, 0.9),
        "p50_gateway_minus_p50_direct_ms": round(q(g_ms, 0.5) - q(d_ms, 0.5), 3),
        "p50_of_pair_differences_ms": round(statistics.median(diffs), 3),
        # Each order alone, to show how much the place in the pair moves the difference.
        "p50_difference_gateway_first_ms": round(statistics.median(first), 3) if first else None,
        "p50_difference_gateway_second_ms": round(statistics.median(second), 3) if second else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1, help="runs, one after another")
    parser.add_argument(
        "--gap-ms", type=float, default=10.0,
        help="pause after each pair, so no shadow call is still running at the next one",
    )  # fmt: skip
    args = parser.parse_args()
    triton = Triton()
    gateway = None
    try:
        triton.start()
        gateway = Gateway(triton.http_url)
        gateway.start()
        runs = [
            measure(
                triton.http_port, gateway.port, args.pairs, args.warmup, run, args.gap_ms / 1000
            )
            for run in range(args.repeat)
        ]
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()
    for result in runs:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
