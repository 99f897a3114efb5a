"""Execution in parts: chunk ranges, the in-place token buffer, chunked token-wise maps."""

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx.execution import ONE_GRAPH, Execution, TokenBuffer, by_chunks


def test_chunks_cover_every_token_once():
    assert Execution(token_chunk=4).chunks(10) == [(0, 4), (4, 8), (8, 10)]
    assert Execution(token_chunk=16).chunks(10) == [(0, 10)]
    assert ONE_GRAPH.chunks(7) == [(0, 7)]


@pytest.mark.parametrize("sync", [True, False])
def test_token_buffer_assembles_chunks(sync):
    parts = [mx.random.normal((2, n, 3)) for n in (4, 4, 2)]
    buf = TokenBuffer((2, 10, 3), mx.float32, Execution(sync=sync))
    r = 0
    for p in parts:
        buf.write(r, r + p.shape[1], p)
        r += p.shape[1]
    np.testing.assert_array_equal(buf.value, mx.concatenate(parts, axis=1))


@pytest.mark.parametrize("ex", [ONE_GRAPH, Execution(token_chunk=3), Execution(token_chunk=3, sync=True)])
def test_by_chunks_equals_the_whole_map(ex):
    x = mx.random.normal((2, 11, 5))
    w = mx.random.normal((5, 7))
    whole = x @ w
    np.testing.assert_allclose(by_chunks(lambda c: c @ w, x, ex, out_dim=7), whole, rtol=0, atol=1e-5)
