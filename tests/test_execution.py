"""Execution in parts: chunk ranges, pacing, the in-place token buffer, chunked token-wise maps."""

import os

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import execution
from bonsai_mlx.execution import CUDA_GRAPHS, ONE_GRAPH, Execution, Pace, TokenBuffer, by_chunks, prefer_direct_launches


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


def test_pace_ahead_waits_for_the_part_before_then_starts_each_part(monkeypatch):
    """Ahead: a part starts only once the part before it is done (one part on the device at
    a time, as strict), and the host returns to build the next while it runs. A pacer
    started after a part waits for it before its first part."""
    spy = Spy(monkeypatch)
    before, a, b, c = mx.array(0), mx.array(1), mx.array(2), mx.array(3)
    pace = Execution(sync=True, ahead=True).pace(after=(before,))
    for x in (a, b, c):
        pace(x)
    assert spy.calls == [("eval", (before,)), ("async", (a,)), ("eval", (a,)), ("async", (b,)),
                         ("eval", (b,)), ("async", (c,))]
    spy.calls.clear()
    pace = Execution(sync=True, ahead=True).pace()
    pace(a, wait=(before,))
    pace(b)
    assert spy.calls == [("async", (a,)), ("eval", (before,)), ("async", (b,))]


def test_a_pacer_ahead_settles_before_work_outside_it(monkeypatch):
    """`settle`: the part started ahead is waited for before work that evaluates outside the
    pacer; strict and two-in-flight pacers have nothing to settle."""
    spy = Spy(monkeypatch)
    a, b = mx.array(1), mx.array(2)
    pace = Execution(sync=True, ahead=True).pace()
    pace(a)
    pace.settle()
    assert spy.calls == [("async", (a,)), ("eval", (a,))]
    pace(b)  # nothing left to wait for
    assert spy.calls == [("async", (a,)), ("eval", (a,)), ("async", (b,))]
    spy.calls.clear()
    for ex in (Execution(sync=True), Execution(sync=True, overlap=True), ONE_GRAPH):
        pace = ex.pace()
        pace(a)
        calls = list(spy.calls)
        pace.settle()
        assert spy.calls == calls
        spy.calls.clear()


def test_buffers_are_not_written_in_place_ahead():
    """Built ahead, a buffer's next write exists before the part before it is waited on, so
    its chunks are kept, as with two parts in flight; in one graph it writes in place."""
    assert not Execution(sync=True, overlap=True, ahead=True).buffer((1, 4), mx.float32).in_place
    assert not Execution(sync=True, ahead=True).buffer((1, 4), mx.float32).in_place
    assert Execution(ahead=True).buffer((1, 4), mx.float32).in_place  # one graph


def test_pace_flushes_only_above_its_threshold(monkeypatch):
    """Over `flush_above` bytes of active memory after a part, the pacer waits for the device
    and its releases (mx.synchronize) before the next part; at or under it, or without a
    threshold, it does not."""
    spy = Spy(monkeypatch)
    active = [100]
    monkeypatch.setattr(mx, "get_active_memory", lambda: active[0])
    monkeypatch.setattr(mx, "synchronize", lambda *a: spy.calls.append(("sync", a)))
    a, b, c = mx.array(1), mx.array(2), mx.array(3)
    for overlap in (True, False):
        spy.calls.clear()
        pace = Execution(sync=True, overlap=overlap, flush_above=100).pace()
        pace(a)  # at the threshold
        active[0] = 101
        pace(b)  # above it
        active[0] = 50
        pace(c)
        kinds = [k for k, _ in spy.calls]
        if overlap:
            assert kinds == ["async", "async", "eval", "sync", "async", "eval"]
        else:
            assert kinds == ["eval", "eval", "sync", "eval"]
        active[0] = 10**12
        spy.calls.clear()
        pace = Execution(sync=True, overlap=overlap).pace()
        pace(a)
        pace(b)
        assert "sync" not in [k for k, _ in spy.calls]
        active[0] = 100


def test_pace_inactive_evaluates_nothing(monkeypatch):
    spy = Spy(monkeypatch)
    ONE_GRAPH.pace()(mx.array(1))
    Execution(sync=True).pace(active=False)(mx.array(1))
    assert spy.calls == []


def test_pace_results_are_the_same(monkeypatch):
    x = mx.random.normal((4, 4))
    outs = []
    flushing = (Execution(sync=True, flush_above=0), Execution(sync=True, overlap=True, flush_above=0))
    for ex in (ONE_GRAPH, Execution(sync=True), Execution(sync=True, ahead=True), Execution(sync=True, overlap=True),
               *flushing):
        pace, y = ex.pace(), x
        for _ in range(5):
            y = y @ x / 4
            pace(y)
        outs.append(np.array(y))
    for out in outs[1:]:  # a flush after every part (mx.synchronize) changes no value either
        np.testing.assert_array_equal(outs[0], out)


@pytest.mark.parametrize("ex", [ONE_GRAPH, Execution(sync=True), Execution(sync=True, overlap=True),
                                Execution(sync=True, ahead=True)])
def test_token_buffer_assembles_chunks(ex):
    parts = [mx.random.normal((2, n, 3)) for n in (4, 4, 2)]
    buf, pace = TokenBuffer((2, 10, 3), mx.float32), ex.pace()
    r = 0
    for p in parts:
        pace(buf.write(r, r + p.shape[1], p))
        r += p.shape[1]
    np.testing.assert_array_equal(buf.value, mx.concatenate(parts, axis=1))


@pytest.mark.parametrize("ex", [ONE_GRAPH, Execution(token_chunk=3), Execution(token_chunk=3, sync=True),
                                Execution(token_chunk=3, sync=True, overlap=True),
                                Execution(token_chunk=3, sync=True, ahead=True)])
def test_by_chunks_equals_the_whole_map(ex):
    x = mx.random.normal((2, 11, 5))
    w = mx.random.normal((5, 7))
    whole = x @ w
    np.testing.assert_allclose(by_chunks(lambda c: c @ w, x, ex, out_dim=7), whole, rtol=0, atol=1e-5)


def test_overlapped_buffer_writes_wait_on_the_part_before(monkeypatch):
    """A TokenBuffer is the same Python object after every write, so the pacer must wait on
    the part written before, not on the buffer (which would be this write: strict)."""
    spy = Spy(monkeypatch)
    buf, pace = TokenBuffer((1, 6, 2), mx.float32), Execution(sync=True, overlap=True).pace()
    parts = [mx.full((1, 2, 2), float(i)) for i in range(3)]
    for i, p in enumerate(parts):
        pace(buf.write(2 * i, 2 * i + 2, p), wait=(p,))
    waited = [a for kind, a in spy.calls if kind == "eval"]
    assert len(waited) == 2
    assert waited[0][0] is parts[0] and waited[1][0] is parts[1]
    assert all(a[0] is buf.value for kind, a in spy.calls if kind == "async")


def test_hidden_spans_split_the_units_in_tile_multiples():
    assert Execution().hidden_spans(9216) == [(0, 9216)]
    assert Execution(hidden_parts=4).hidden_spans(9216) == [(0, 2304), (2304, 4608), (4608, 6912), (6912, 9216)]
    assert Execution(hidden_parts=8).hidden_spans(9216)[0] == (0, 1152)
    assert Execution(hidden_parts=3).hidden_spans(1000) == [(0, 384), (384, 768), (768, 1000)]  # 128-multiples
    assert Execution(hidden_parts=3).hidden_spans(20) == [(0, 7), (7, 14), (14, 20)]  # too few for 128s
    for parts in (2, 3, 5, 8):
        spans = Execution(hidden_parts=parts).hidden_spans(777)
        assert spans[0][0] == 0 and spans[-1][1] == 777 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len(spans) <= parts


def test_token_buffer_columns():
    parts = [mx.random.normal((2, 5, n)) for n in (3, 4)]
    buf, pace = TokenBuffer((2, 5, 7), mx.float32), Execution(sync=True, overlap=True).pace()
    pace(buf.write_columns(0, 3, parts[0]), wait=(parts[0],))
    pace(buf.write_columns(3, 7, parts[1]), wait=(parts[1],))
    np.testing.assert_array_equal(buf.value, mx.concatenate(parts, axis=-1))


def test_buffers_of_overlapped_loops_keep_their_chunks():
    """Two parts in flight, a buffer keeps the chunks and concatenates them once (no write
    into a buffer still in flight); strict or in one graph, it writes in place."""
    assert Execution(sync=True).buffer((1, 4), mx.float32).in_place
    assert ONE_GRAPH.buffer((1, 4), mx.float32).in_place
    ex = Execution(sync=True, overlap=True)
    rows, cols = ex.buffer((2, 10, 3), mx.float32), ex.buffer((2, 5, 7), mx.float32)
    assert not rows.in_place
    parts = [mx.random.normal((2, n, 3)) for n in (4, 4, 2)]
    pace, r = ex.pace(), 0
    for p in parts:
        assert rows.write(r, r + p.shape[1], p) is p
        pace(p, wait=(p,))
        r += p.shape[1]
    np.testing.assert_array_equal(rows.value, mx.concatenate(parts, axis=1))
    halves = [mx.random.normal((2, 5, n)) for n in (3, 4)]
    cols.write_columns(0, 3, halves[0])
    cols.write_columns(3, 7, halves[1])
    np.testing.assert_array_equal(cols.value, mx.concatenate(halves, axis=-1))


def test_kept_chunks_must_come_in_order():
    """Kept chunks are concatenated in the order written: a chunk out of order is refused
    instead of landing in the wrong rows."""
    buf = Execution(sync=True, overlap=True).buffer((1, 6, 2), mx.float32)
    buf.write(0, 2, mx.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="in order"):
        buf.write(4, 6, mx.zeros((1, 2, 2)))
    cols = Execution(sync=True, overlap=True).buffer((1, 2, 6), mx.float32)
    with pytest.raises(ValueError, match="in order"):
        cols.write_columns(2, 4, mx.zeros((1, 2, 2)))


def test_a_block_runs_in_parts_with_token_chunks_hidden_passes_or_its_attention_apart():
    assert not ONE_GRAPH.in_parts(10) and not Execution(token_chunk=16, sync=True).in_parts(10)
    assert Execution(token_chunk=4).in_parts(10) and Execution(hidden_parts=2).in_parts(10)
    assert Execution(sync=True, overlap=True, attention_apart=True).in_parts(10)
    assert Execution(token_chunk=4).chunked(10) and not Execution(hidden_parts=2).chunked(10)
    assert not Execution(token_chunk=16).chunked(10)


def test_a_pacer_started_after_a_part_waits_for_it_first(monkeypatch):
    """`after`: the first part, once started, waits for what stands for the part before it."""
    spy = Spy(monkeypatch)
    before, a, b = mx.array(0), mx.array(1), mx.array(2)
    pace = Execution(sync=True, overlap=True).pace(after=(before,))
    pace(a)
    pace(b)
    assert spy.calls == [("async", (a,)), ("eval", (before,)), ("async", (b,)), ("eval", (a,))]


def test_a_block_in_hidden_passes_evaluates_its_attention_as_a_part_of_its_own_unless_joined(monkeypatch):
    """Whole tokens in hidden passes: the attention (q, k and v with it) is a part of its own,
    so the passes that follow do not hold its temporaries with theirs, and each pass is one;
    in token chunks, each chunk's q, k and v are one part. Joined (`Execution.joins`), the
    attention runs in the first pass's part and the last pass in the caller's: the single
    block starts one part, with the attention's output in it, the double block one for each
    stream's first pass. Every way computes what one graph does (random modulations: every
    branch reaches the output)."""
    from bonsai_mlx import transformer as T
    from bonsai_mlx.config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                            joint_attention_dim=32, in_channels=8, axes_dims_rope=(4, 4, 4, 4))
    L_txt, L_img, D = 5, 12, cfg.inner_dim
    L = L_txt + L_img
    rope = T.rope_rotation(mx.broadcast_to(mx.arange(L)[:, None], (L, 4)), cfg.axes_dims_rope, cfg.rope_theta)
    txt, img = mx.random.normal((1, L_txt, D)), mx.random.normal((1, L_img, D))
    single, double = T.SingleStreamBlock(cfg), T.DoubleStreamBlock(cfg)
    mods = [0.5 * mx.random.normal((1, 1, D)) for _ in range(6)]
    # The single block: the attention with q, k and v, then two passes (its output projection
    # runs in the part that ends the block, the caller's). The double block: the attention with
    # both streams' q, k and v, then the two passes of each stream's feed-forward.
    runs = [(lambda ex: single(mx.concatenate([txt, img], axis=1), mods[:3], rope, ex), 1 + 2, 1),
            (lambda ex: double(img, txt, mods, mods[::-1], rope, ex), 1 + 2 * 2, 2)]
    # In 8-token chunks (the single block's 17 tokens in 3, the image's 12 in 2): the single
    # block's 3 q/k/v chunks, the attention and 3 output chunks; the double block's text q/k/v
    # (one chunk), 2 image q/k/v chunks, the attention, 2 image output chunks and 2 image MLP
    # chunks (the text's output and MLP, one chunk each, run unpaced inside the block's part).
    chunked = [3 + 1 + 3, 1 + 2 + 1 + 2 + 2]
    for (forward, parts, joined), in_chunks in zip(runs, chunked):
        want = forward(ONE_GRAPH)
        mx.eval(want)
        for overlap in (False, True):
            for ex, n in ((Execution(sync=True, overlap=overlap, hidden_parts=2), parts),
                          (Execution(8, None, sync=True, overlap=overlap), in_chunks),
                          (Execution(sync=True, overlap=overlap, hidden_parts=2, join_upto=L),
                           joined if overlap else parts)):
                spy = Spy(monkeypatch)
                got = forward(ex)
                monkeypatch.undo()
                started = [c[1] for c in spy.calls if c[0] == ("async" if overlap else "eval")]
                assert len(started) == n, (ex, n)
                if ex.joins(L) and n == 1:  # the single block: [attention | first pass] and the attention
                    assert len(started[0]) == 2 and started[0][1].shape == (1, L, D)
                for g, w in zip(got if isinstance(got, tuple) else (got,),
                                want if isinstance(want, tuple) else (want,)):
                    np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-5, atol=1e-5)


class FakeCuda:
    def __init__(self, available: bool):
        self.available = available

    def is_available(self) -> bool:
        return self.available


def test_direct_launches_are_asked_for_on_cuda_only_and_a_process_choice_is_kept(monkeypatch):
    monkeypatch.setenv(CUDA_GRAPHS, "unset")  # recorded first, so that the test leaves the variable as it found it
    monkeypatch.delenv(CUDA_GRAPHS)
    monkeypatch.setattr(execution.mx, "cuda", FakeCuda(False))  # Metal or the CPU: nothing to set
    assert prefer_direct_launches() is False
    assert CUDA_GRAPHS not in os.environ
    monkeypatch.setattr(execution.mx, "cuda", FakeCuda(True))
    assert prefer_direct_launches() is True
    assert os.environ[CUDA_GRAPHS] == "0"
    monkeypatch.setenv(CUDA_GRAPHS, "1")  # the process chose CUDA graphs: kept
    assert prefer_direct_launches() is False
    assert os.environ[CUDA_GRAPHS] == "1"
    monkeypatch.setenv(CUDA_GRAPHS, "false")  # MLX reads text as atoi does: 0, direct launches
    assert prefer_direct_launches() is True
    assert os.environ[CUDA_GRAPHS] == "false"
