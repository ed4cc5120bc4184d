"""Micro-batching logic: rows gathered, split back, deadlines per row, bad rows isolated.

`send` here is a scripted function standing in for the Triton call, to pin the batcher's
own logic; batching against the real Triton is pinned in tests/integration.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.backends import BackendError, BackendRejected, BackendTimeout
from gateway.batching import MicroBatcher, stack_rows


def row(value: float) -> dict[str, np.ndarray]:
    return {"features": np.array([[value, 1.0]], dtype=np.float32)}


class ScriptedSend:
    """Answers each row with its first feature / 100; records the batches it was sent."""

    def __init__(self, delay_s: float = 0.0, fail: BaseException | None = None, bad: float = -1):
        self.batches: list[int] = []
        self.delay_s, self.fail, self.bad = delay_s, fail, bad
        self.in_flight = self.most_in_flight = 0

    async def __call__(self, rows, timeout_s, headers):
        self.batches.append(len(rows["features"]))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        if self.fail is not None:
            raise self.fail
        if self.bad in rows["features"][:, 0]:
            raise BackendRejected("triton 400")
        return rows["features"][:, :1] / 100


def test_stack_rows_concatenates_along_the_batch_dimension():
    """Rows of shape [1, k] stack into [n, k] per input tensor."""
    stacked = stack_rows([row(1), row(2), row(3)])
    assert stacked["features"].shape == (3, 2)
    assert stacked["features"][:, 0].tolist() == [1, 2, 3]


async def test_concurrent_rows_go_as_one_batch_and_are_split_back():
    """The first of twenty concurrent rows goes at once; the other nineteen, which arrive
    while it is in flight, make one call; each caller gets its own row's answer."""
    send = ScriptedSend()
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.002)
    outputs = await asyncio.gather(*(batcher.submit(row(i), 1.0) for i in range(20)))
    assert send.batches == [1, 19]
    assert [float(o[0, 0]) for o in outputs] == pytest.approx([i / 100 for i in range(20)])


async def test_a_full_batch_is_sent_without_waiting():
    """max_batch rows flush at once, and the rest go when the target is free: none waits out
    the (long) window."""
    send = ScriptedSend()
    batcher = MicroBatcher(send, max_batch=8, max_delay_s=30)
    outputs = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(row(i), 60) for i in range(16))), timeout=5
    )
    assert send.batches == [1, 8, 7]
    assert len(outputs) == 16


async def test_a_row_at_an_idle_target_does_not_wait_for_the_window():
    """Alone, a row is sent at once, not after max_delay_s (here far longer than the wait)."""
    send = ScriptedSend()
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=30)
    output = await asyncio.wait_for(batcher.submit(row(7), 60), timeout=5)
    assert send.batches == [1]
    assert float(output[0, 0]) == pytest.approx(0.07)


async def test_rows_gather_while_a_batch_is_in_flight_and_go_when_it_returns():
    """A slow batch in flight: later rows wait for it (not for the long window), then go
    together."""
    send = ScriptedSend(delay_s=0.05)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=30)
    first = asyncio.ensure_future(batcher.submit(row(1), 60))
    await asyncio.sleep(0.01)  # the first batch is on its way
    later = [batcher.submit(row(i), 60) for i in range(2, 6)]
    await asyncio.wait_for(asyncio.gather(first, *later), timeout=5)
    assert send.batches == [1, 4]


async def arrive_while_in_flight(batcher: MicroBatcher, count: int) -> list[np.ndarray]:
    """One row, then `count` more, one every millisecond, while the first is in flight."""
    first = asyncio.ensure_future(batcher.submit(row(0), 5))
    later = []
    for i in range(1, count + 1):
        await asyncio.sleep(0.001)
        later.append(asyncio.ensure_future(batcher.submit(row(i), 5)))
    return await asyncio.wait_for(asyncio.gather(first, *later), timeout=5)


@pytest.mark.parametrize(("max_in_flight", "expected_most_in_flight"), [(1, 1), (2, 2), (4, 4)])
async def test_no_more_than_max_in_flight_batches_are_on_their_way(
    max_in_flight, expected_most_in_flight
):
    """A slow target (100 ms a call) and rows every millisecond: past the window, another
    batch goes only while fewer than `max_in_flight` are on their way; the rest wait for
    one to return, so fewer, larger calls are made."""
    send = ScriptedSend(delay_s=0.1)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.005, max_in_flight=max_in_flight)
    outputs = await arrive_while_in_flight(batcher, 30)
    assert [float(o[0, 0]) for o in outputs] == pytest.approx([i / 100 for i in range(31)])
    assert send.most_in_flight == expected_most_in_flight
    assert sum(send.batches) == 31
    if max_in_flight == 1:
        assert send.batches == [1, 30]  # everything that arrived meanwhile went as one


async def test_full_batches_also_wait_for_a_free_slot():
    """Rows beyond `max_batch` make several batches, sent one after another when one is
    allowed in flight, not all at once."""
    send = ScriptedSend(delay_s=0.05)
    batcher = MicroBatcher(send, max_batch=4, max_delay_s=0.001, max_in_flight=1)
    outputs = await arrive_while_in_flight(batcher, 11)
    assert len(outputs) == 12
    assert send.batches == [1, 4, 4, 3]
    assert send.most_in_flight == 1


async def test_a_row_that_stopped_waiting_is_not_sent():
    """A row whose deadline passed while it waited for a free slot is left out of the next
    batch: Triton is not asked for an answer nobody will read."""
    send = ScriptedSend(delay_s=0.1)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.001, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit(row(1), 5))
    await asyncio.sleep(0.01)
    impatient = asyncio.ensure_future(batcher.submit(row(2), 0.02))
    patient = asyncio.ensure_future(batcher.submit(row(3), 5))
    with pytest.raises(BackendTimeout):
        await impatient
    await asyncio.wait_for(asyncio.gather(first, patient), timeout=5)
    assert send.batches == [1, 1]


async def test_one_bad_row_never_fails_its_batch_mates():
    """A batch Triton refuses is retried row by row; only the bad row fails."""
    send = ScriptedSend(bad=3.0)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.002)
    results = await asyncio.gather(
        *(batcher.submit(row(i), 1.0) for i in range(6)), return_exceptions=True
    )
    assert isinstance(results[3], BackendRejected)
    assert all(isinstance(r, np.ndarray) for i, r in enumerate(results) if i != 3)
    assert send.batches[:2] == [1, 5] and sorted(send.batches[2:]) == [1] * 5


async def test_a_target_failure_fails_every_row():
    """A 5xx or a dead target is every row's failure (no row-by-row retry storm)."""
    send = ScriptedSend(fail=BackendError("triton 500"))
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.002)
    results = await asyncio.gather(
        *(batcher.submit(row(i), 1.0) for i in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, BackendError) for r in results)
    assert send.batches == [1, 3]


async def test_each_row_keeps_its_own_deadline():
    """A slow batch times out the impatient row only; the patient one gets its answer."""
    send = ScriptedSend(delay_s=0.1)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.002)
    impatient, patient = await asyncio.gather(
        batcher.submit(row(1), 0.03), batcher.submit(row(2), 1.0), return_exceptions=True
    )
    assert isinstance(impatient, BackendTimeout)
    assert float(patient[0, 0]) == pytest.approx(0.02)
    await batcher.close()


async def test_every_call_reports_its_row_count():
    """The batch-size metric hears of each call made, re-sent single rows included."""
    send = ScriptedSend(bad=3.0)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.002)
    reported: list[int] = []
    batcher.on_batch = reported.append
    await asyncio.gather(*(batcher.submit(row(i), 1.0) for i in range(6)), return_exceptions=True)
    assert reported == send.batches
    assert sum(reported) == 6 + 5  # five rows of the refused batch went again, one by one


async def test_a_lone_row_is_sent_by_its_own_caller():
    """At an idle target no task is made to carry the row: the caller's own task sends it."""
    callers: list[asyncio.Task | None] = []
    send = ScriptedSend()

    async def recording_send(rows, timeout_s, headers):
        callers.append(asyncio.current_task())
        return await send(rows, timeout_s, headers)

    batcher = MicroBatcher(recording_send, max_batch=64, max_delay_s=30)
    await batcher.submit(row(5), 1.0)
    assert callers == [asyncio.current_task()]


class FailsForFive(ScriptedSend):
    """A target error for the row whose first feature is 5, an answer for any other."""

    async def __call__(self, rows, timeout_s, headers):
        if 5.0 in rows["features"][:, 0]:
            raise BackendError("triton 500")
        return await super().__call__(rows, timeout_s, headers)


@pytest.mark.parametrize(
    ("send", "timeout_s", "error"),
    [
        (ScriptedSend(bad=5.0), 1.0, BackendRejected),
        (ScriptedSend(delay_s=0.2), 0.02, BackendTimeout),
        (FailsForFive(), 1.0, BackendError),
    ],
)
async def test_a_lone_rows_failure_is_its_own_and_the_target_is_free_after(send, timeout_s, error):
    """Refused, too slow or failed: the lone row gets the error, and rows that gathered
    behind it still go (the in-flight count is released on every way out)."""
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=30)
    lone = asyncio.ensure_future(batcher.submit(row(5), timeout_s))
    await asyncio.sleep(0)  # the lone row is on its way
    behind = asyncio.ensure_future(batcher.submit(row(6), 5.0))
    with pytest.raises(error):
        await lone
    output = await asyncio.wait_for(behind, timeout=5)
    assert float(output[0, 0]) == pytest.approx(0.06)


async def test_gathering_first_holds_a_lone_row_for_the_window():
    """A shadow's batcher sends nothing at once, even at an idle target: a row waits the
    window, and the rows of that window go as one call."""
    send = ScriptedSend()
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.05, gather_first=True)
    first = asyncio.ensure_future(batcher.submit(row(1), 1.0))
    await asyncio.sleep(0.02)
    assert send.batches == []  # an idle target, and still the row waits
    rest = [asyncio.ensure_future(batcher.submit(row(i), 1.0)) for i in (2, 3)]
    outputs = await asyncio.gather(first, *rest)
    assert send.batches == [3]
    assert [float(o[0, 0]) for o in outputs] == pytest.approx([0.01, 0.02, 0.03])


async def test_gathering_first_sends_rows_that_came_during_a_call_when_their_window_ends():
    """Rows arriving while a gathered call is in flight do not go the moment it returns: they
    go when the window begun by the first of them ends, so a trickle makes one call a window."""
    send = ScriptedSend(delay_s=0.01)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.05, gather_first=True)
    first = asyncio.ensure_future(batcher.submit(row(1), 1.0))
    await asyncio.sleep(0.055)  # the window has passed: the first call is in flight
    assert send.batches == [1]
    late = asyncio.ensure_future(batcher.submit(row(2), 1.0))
    await first
    await asyncio.sleep(0.02)  # the first call returned 10 ms ago: the late row still waits
    assert send.batches == [1]
    await late
    assert send.batches == [1, 1]


async def test_gathering_first_sends_at_once_when_a_call_outlasted_the_window():
    """A row whose window ended while a call was in flight goes the moment that call returns:
    no copy waits longer than its window plus one call."""
    send = ScriptedSend(delay_s=0.3)
    batcher = MicroBatcher(send, max_batch=64, max_delay_s=0.1, gather_first=True)
    first = asyncio.ensure_future(batcher.submit(row(1), 2.0))
    await asyncio.sleep(0.15)  # the first call (sent at 100 ms, 300 ms long) is in flight
    late = asyncio.ensure_future(batcher.submit(row(2), 2.0))  # its window ends at 250 ms
    await first  # returns at about 400 ms
    for _ in range(5):  # the return's callbacks, and the task that sends what gathered
        await asyncio.sleep(0)
    assert send.batches == [1, 1]  # sent at the return, not after a fresh window
    await late


async def test_gathering_first_sends_a_full_batch_without_waiting():
    """`max_batch` rows go at once, window or not."""
    send = ScriptedSend()
    batcher = MicroBatcher(send, max_batch=4, max_delay_s=10.0, gather_first=True)
    outputs = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(row(i), 20.0) for i in range(4))), timeout=1.0
    )
    assert send.batches == [4]
    assert len(outputs) == 4


class MisshapenSend(ScriptedSend):
    """Answers a batch with the wrong number of rows: one short, or a 0-d value."""

    def __init__(self, answer):
        super().__init__(delay_s=0.01)
        self.answer = answer

    async def __call__(self, rows, timeout_s, headers):
        correct = await super().__call__(rows, timeout_s, headers)
        return self.answer(correct)


@pytest.mark.parametrize(
    "answer",
    [
        lambda rows: rows[1:],
        lambda rows: np.concatenate([rows, rows]),
        lambda rows: np.float32(0.5),
    ],
    ids=["a-row-short", "twice-the-rows", "no-batch-dimension"],
)
async def test_an_answer_with_other_than_one_row_per_row_fails_every_row_at_once(answer):
    """Rows are matched with the answer by position: with any other number of rows each
    caller could be handed another's result. Every row fails (and falls back) at once, as
    for any failure of the target, none waiting out its deadline."""
    batcher = MicroBatcher(MisshapenSend(answer), max_batch=64, max_delay_s=0.002)
    results = await asyncio.gather(
        *(batcher.submit(row(i), 5.0) for i in range(6)), return_exceptions=True
    )
    assert all(isinstance(r, BackendError) for r in results), results
    # The answer's own error, not BackendTimeout: no row waited out its 5 s deadline.
    assert "for 1 sent" in str(results[0]) and "for 5 sent" in str(results[1])
