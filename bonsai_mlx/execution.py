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
    # Running in parts, a reduction over a large activation (the VAE's GroupNorm statistics)
    # works on blocks of rows whose float32 copy has at most this many elements.
    reduce_block: int = 1 << 25

    def chunks(self, length: int) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) covering `length` tokens `token_chunk` at a time."""
        step = length if not self.token_chunk or self.token_chunk >= length else self.token_chunk
        return [(r, min(r + step, length)) for r in range(0, length, step)]

    def settle(self, *arrays) -> None:
        """Evaluate now when running in parts; otherwise leave the graph to grow."""
        if self.sync:
            mx.eval(*arrays)

    def settle_between_chunks(self, length: int, *arrays) -> None:
        """Evaluate now when a token-wise pass over `length` tokens goes in more than one
        chunk: what the chunks share must exist before they run. With one chunk, the block's
        own evaluation covers it, and an evaluation here would only stall the device."""
        if self.sync and len(self.chunks(length)) > 1:
            mx.eval(*arrays)


ONE_GRAPH = Execution()


class TokenBuffer:
    """A [B, L, ...] result assembled chunk by chunk in place.

    Concatenating chunk results holds every chunk and the concatenation at once (2x);
    writing each chunk into one buffer, evaluated as it goes, lets MLX reuse the buffer
    (the slice update donates it), so only the buffer and one chunk's temporaries live.
    """

    def __init__(self, shape, dtype, execution: Execution):
        self.value = mx.zeros(shape, dtype=dtype)
        # Written whole, the buffer is evaluated with the block that made it: an evaluation
        # per write would only stall the device.
        self.settle = execution.sync and len(execution.chunks(shape[1])) > 1

    def write(self, r0: int, r1: int, part: mx.array) -> None:
        self.value[:, r0:r1] = part
        if self.settle:
            mx.eval(self.value)


def by_chunks(fn, x: mx.array, execution: Execution, out_dim: int | None = None) -> mx.array:
    """fn applied to x [B, L, ...] token chunk by token chunk (fn must be token-wise)."""
    chunks = execution.chunks(x.shape[1])
    if len(chunks) == 1:
        return fn(x)
    shape = (*x.shape[:2], out_dim) if out_dim is not None else x.shape
    out = TokenBuffer(shape, x.dtype, execution)
    for r0, r1 in chunks:
        out.write(r0, r1, fn(x[:, r0:r1]))
    return out.value
