"""The engine's request queue (engine/queue.py) on a stand-in engine: batching, withdrawal, failures, metrics."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.engine import EngineConfig
from engine import queue as queue_module
from engine.queue import BatchQueue


class FakeEngine:
    """Records each embed call; one vector per item whose value is the item; items equal to "bad" fail alone."""

    def __init__(self, gate: threading.Event | None = None, fail: BaseException | None = None):
        self.config = EngineConfig(max_length=64, max_batch_tokens=64, max_rows=4)
        self.calls: list[list] = []
        self.gate, self.fail = gate, fail

    def embed(self, items):
        self.calls.append(list(items))
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail is not None:
            raise self.fail
        return [ValueError("bad input") if x == "bad" else np.full(2, x, np.float32) for x in items]


class Recorder:
    def __init__(self):
        self.depths, self.withdrawn, self.batches = [], 0, []

    def on_depth(self, inputs):
        self.depths.append(inputs)

    def on_withdrawn(self, inputs):
        self.withdrawn += inputs

    def on_batch(self, waits, inputs, tokens, seconds):
        self.batches.append((len(waits), inputs, tokens))


def test_results_come_back_per_request_in_order():
    queue = BatchQueue(FakeEngine())
    try:
        results = queue.submit([1, 2, 3]).result(5)
        assert [float(r[0]) for r in results] == [1.0, 2.0, 3.0]
        assert queue.submit([]).result(1) == []
    finally:
        queue.close()


def test_requests_pending_while_a_batch_runs_share_the_next_batch():
    gate = threading.Event()
    engine = FakeEngine(gate)
    recorder = Recorder()
    queue = BatchQueue(engine, observer=recorder)
    try:
        first = queue.submit([0])
        while not engine.calls:  # the first batch is running (held at the gate)
            time.sleep(0.001)
        waiting = [queue.submit([i], tokens=3) for i in (1, 2, 3)]
        assert len(queue) == 3
        gate.set()
        assert float(first.result(5)[0][0]) == 0.0
        assert [float(f.result(5)[0][0]) for f in waiting] == [1.0, 2.0, 3.0]
        assert engine.calls == [[0], [1, 2, 3]]  # three requests, one batch
        assert recorder.batches[-1] == (3, 3, 9)
        assert recorder.depths[-1] == 0
    finally:
        queue.close()


def test_a_batch_takes_whole_requests_up_to_its_budget():
    gate = threading.Event()
    engine = FakeEngine(gate)
    queue = BatchQueue(engine, max_inputs=4)
    try:
        queue.submit([0])
        while not engine.calls:
            time.sleep(0.001)
        a, b, c = queue.submit([1, 2, 3]), queue.submit([4, 5]), queue.submit([6])
        big = queue.submit(list(range(10, 19)))  # larger than the budget alone: still taken, in a batch of its own
        gate.set()
        for f in (a, b, c, big):
            f.result(5)
        assert engine.calls[1:] == [[1, 2, 3], [4, 5, 6], list(range(10, 19))]
    finally:
        queue.close()


def test_a_withdrawn_request_never_reaches_the_engine():
    gate = threading.Event()
    engine = FakeEngine(gate)
    recorder = Recorder()
    queue = BatchQueue(engine, observer=recorder)
    try:
        queue.submit([0])
        while not engine.calls:
            time.sleep(0.001)
        gone, kept = queue.submit([7, 7]), queue.submit([8])
        assert gone.cancel()  # the client hung up before its batch started
        gate.set()
        assert float(kept.result(5)[0][0]) == 8.0
        assert [8] in engine.calls and not any(7 in call for call in engine.calls)
        assert recorder.withdrawn == 2
        assert recorder.depths[-1] == 0
    finally:
        queue.close()


def test_one_bad_input_fails_only_itself_and_a_broken_batch_fails_only_its_requests():
    queue = BatchQueue(FakeEngine())
    try:
        results = queue.submit([1, "bad", 2]).result(5)
        assert isinstance(results[1], ValueError) and float(results[2][0]) == 2.0
    finally:
        queue.close()
    broken = BatchQueue(FakeEngine(fail=RuntimeError("device lost")))
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            broken.submit([1]).result(5)
        with pytest.raises(RuntimeError):  # the thread survives and answers the next request too
            broken.submit([2]).result(5)
    finally:
        broken.close()


def test_an_idle_queue_does_not_hold_a_lone_request_for_max_wait():
    queue = BatchQueue(FakeEngine(), max_wait_s=5.0)
    try:
        start = time.perf_counter()
        queue.submit([1]).result(5)
        assert time.perf_counter() - start < 4.0  # not held for the 5 s fill window: nothing was flowing
    finally:
        queue.close()


def test_while_traffic_flows_a_partial_batch_waits_for_requests_still_arriving(monkeypatch):
    monkeypatch.setattr(queue_module, "ARRIVAL_GAP_S", 0.5)  # wide, so a busy test machine cannot split them
    engine = FakeEngine()
    queue = BatchQueue(engine, max_inputs=2, max_wait_s=2.0)
    try:
        queue.submit([1]).result(5)  # a batch just ended: traffic is flowing
        first = queue.submit([2])
        time.sleep(0.05)
        second = queue.submit([3])  # arrives within the gap: same batch
        first.result(5), second.result(5)
        assert engine.calls[-1] == [2, 3]
    finally:
        queue.close()


def test_a_partial_batch_is_not_held_once_arrivals_pause(monkeypatch):
    monkeypatch.setattr(queue_module, "ARRIVAL_GAP_S", 0.05)
    engine = FakeEngine()
    queue = BatchQueue(engine, max_inputs=8, max_wait_s=5.0)
    try:
        queue.submit([1]).result(5)
        start = time.perf_counter()
        queue.submit([2]).result(5)  # nobody follows it: it goes after the gap, not after max_wait
        assert time.perf_counter() - start < 2.5
        assert engine.calls[-1] == [2]
    finally:
        queue.close()


def test_submitting_to_a_closed_queue_is_refused():
    queue = BatchQueue(FakeEngine())
    queue.close()
    with pytest.raises(RuntimeError):
        queue.submit([1])
