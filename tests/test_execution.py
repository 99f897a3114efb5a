"""Execution in parts: chunk ranges, pacing, the in-place token buffer, chunked token-wise maps."""

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx.execution import ONE_GRAPH, Execution, Pace, TokenBuffer, by_chunks


def test_chunks_cover_every_token_once():
    assert Execution(token_chunk=4).chunks(10) == [(0, 4), (4, 8), (8, 10)]
    assert Execution(token_chunk=16).chunks(10) == [(0, 10)]
    assert ONE_GRAPH.chunks(7) == [(0, 7)]


class Spy:
    """Records what the pacer asks MLX to evaluate."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(mx, "eval", lambda *a: self.calls.append(("eval", a)))
        monkeypatch.setattr(mx, "async_eval", lambda *a: self.calls.append(("async", a)))


def test_pace_strict_evaluates_each_part(monkeypatch):
    spy = Spy(monkeypatch)
    a, b = mx.array(1), mx.array(2)
    pace = Execution(sync=True).pace()
    pace(a)
    pace(b)
    assert spy.calls == [("eval", (a,)), ("eval", (b,))]


def test_pace_overlapped_starts_each_part_and_waits_for_the_one_before(monkeypatch):
    spy = Spy(monkeypatch)
    a, b, c = mx.array(1), mx.array(2), mx.array(3)
    pace = Execution(sync=True, overlap=True).pace()
    for x in (a, b, c):
        pace(x)
    assert spy.calls == [("async", (a,)), ("async", (b,)), ("eval", (a,)), ("async", (c,)), ("eval", (b,))]


def test_pace_inactive_evaluates_nothing(monkeypatch):
    spy = Spy(monkeypatch)
    ONE_GRAPH.pace()(mx.array(1))
    Execution(sync=True).pace(active=False)(mx.array(1))
    assert spy.calls == []


def test_pace_results_are_the_same(monkeypatch):
    x = mx.random.normal((4, 4))
    outs = []
    for ex in (ONE_GRAPH, Execution(sync=True), Execution(sync=True, overlap=True)):
        pace, y = ex.pace(), x
        for _ in range(5):
            y = y @ x / 4
            pace(y)
        outs.append(np.array(y))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("ex", [ONE_GRAPH, Execution(sync=True), Execution(sync=True, overlap=True)])
def test_token_buffer_assembles_chunks(ex):
    parts = [mx.random.normal((2, n, 3)) for n in (4, 4, 2)]
    buf, pace = TokenBuffer((2, 10, 3), mx.float32), ex.pace()
    r = 0
    for p in parts:
        pace(buf.write(r, r + p.shape[1], p))
        r += p.shape[1]
    np.testing.assert_array_equal(buf.value, mx.concatenate(parts, axis=1))


@pytest.mark.parametrize("ex", [ONE_GRAPH, Execution(token_chunk=3), Execution(token_chunk=3, sync=True),
                                Execution(token_chunk=3, sync=True, overlap=True)])
def test_by_chunks_equals_the_whole_map(ex):
    x = mx.random.normal((2, 11, 5))
    w = mx.random.normal((5, 7))
    whole = x @ w
    np.testing.assert_allclose(by_chunks(lambda c: c @ w, x, ex, out_dim=7), whole, rtol=0, atol=1e-5)
