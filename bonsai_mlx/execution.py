"""How the models run their work: in one graph, or in parts that bound memory.

MLX is lazy: a forward builds one graph and evaluates it when asked. Evaluated at once, a
whole transformer forward or VAE decode holds many blocks' activations together; in parts,
each part's temporaries are freed before the next one exists. `Execution` says which parts,
and every model takes it as an argument (no flags are set on modules), so the memory plan
(memory.py) decides and the models only follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Execution:
    token_chunk: int | None = None  # tokens per pass through token-wise parts (MLPs, projections)
    attention_rows: int | None = None  # query rows per attention call (only where scores materialise)
    sync: bool = False  # evaluate block by block and chunk by chunk
    # With sync: start each part on the device as soon as it is built and wait only for the
    # part before it. The device then never idles while the host builds the next part (a
    # plain evaluation per block made a 512x512 step 1.5x slower on an H200), at the price
    # of two parts' temporaries at a time instead of one.
    overlap: bool = False
    # Running in parts, a reduction over a large activation (the VAE's GroupNorm statistics)
    # works on blocks of rows whose float32 copy has at most this many elements.
    reduce_block: int = 1 << 25

    def chunks(self, length: int) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) covering `length` tokens `token_chunk` at a time."""
        step = length if not self.token_chunk or self.token_chunk >= length else self.token_chunk
        return [(r, min(r + step, length)) for r in range(0, length, step)]

    def pace(self, active: bool = True) -> "Pace":
        """A pacer for one loop over parts (blocks, chunks); inactive when not running in parts."""
        return Pace(self, self.sync and active)


ONE_GRAPH = Execution()


class Pace:
    """Evaluates a loop's parts as they are built. Strict: each part is evaluated before the
    next is built (one part's temporaries at a time). Overlapped: each part is started at
    once and the host waits for the part before it, so at most two parts are in flight."""

    def __init__(self, execution: Execution, active: bool):
        self.execution, self.active = execution, active
        self._previous: tuple = ()

    def __call__(self, *arrays: mx.array) -> None:
        if not self.active:
            return
        if not self.execution.overlap:
            mx.eval(*arrays)
            return
        mx.async_eval(*arrays)
        if self._previous:
            mx.eval(*self._previous)
        self._previous = arrays


class TokenBuffer:
    """A [B, L, ...] result assembled chunk by chunk in place.

    Concatenating chunk results holds every chunk and the concatenation at once (2x);
    writing each chunk into one buffer, evaluated as it goes (the caller's Pace), lets MLX
    reuse the buffer (the slice update donates it), so only the buffer and the chunks'
    temporaries live.
    """

    def __init__(self, shape, dtype):
        self.value = mx.zeros(shape, dtype=dtype)

    def write(self, r0: int, r1: int, part: mx.array) -> mx.array:
        self.value[:, r0:r1] = part
        return self.value


def by_chunks(fn, x: mx.array, execution: Execution, out_dim: int | None = None) -> mx.array:
    """fn applied to x [B, L, ...] token chunk by token chunk (fn must be token-wise)."""
    chunks = execution.chunks(x.shape[1])
    if len(chunks) == 1:
        return fn(x)
    shape = (*x.shape[:2], out_dim) if out_dim is not None else x.shape
    out, pace = TokenBuffer(shape, x.dtype), execution.pace()
    for r0, r1 in chunks:
        pace(out.write(r0, r1, fn(x[:, r0:r1])))
    return out.value
