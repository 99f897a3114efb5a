"""How the models run their work: in one graph, or in parts that bound memory.

MLX is lazy: a forward builds one graph and evaluates it when asked. Evaluated at once, a
whole transformer forward or VAE decode holds many blocks' activations together; in parts,
each part's temporaries are freed before the next one exists. `Execution` says which parts,
and every model takes it as an argument (no flags are set on modules), so the memory plan
(memory.py) decides and the models only follow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import mlx.core as mx

# MLX's CUDA back-end records the kernels of each evaluation into a CUDA graph and launches
# the graph once the evaluation is wholly encoded; it reads this variable (as an integer, 0
# meaning direct launches) once, at the first work it encodes on the GPU. A run in parts
# starts hundreds of evaluations of a few kernels each, and each one's graph costs the host
# an update and a launch while the device waits for the whole part to be encoded. Launched
# one by one, each kernel starts as soon as it is encoded, so the device runs while the host
# encodes the rest of the part (docs/benchmarks.md has the measured effect).
CUDA_GRAPHS = "MLX_USE_CUDA_GRAPHS"


def _as_mlx_reads(value: str) -> int:
    """The integer MLX takes from the variable's text (C's atoi: leading digits, else 0)."""
    m = re.match(r"\s*([+-]?\d+)", value)
    return int(m.group(1)) if m else 0


def prefer_direct_launches() -> bool:
    """On MLX's CUDA back-end, ask it to launch kernels one by one instead of through CUDA
    graphs (`CUDA_GRAPHS`), unless the process set the variable itself. MLX reads it once,
    so this decides only when called before the process's first GPU work: the pipeline calls
    it before it resolves or loads a model. Returns whether the variable now asks for direct
    launches (not whether MLX, already started, follows it)."""
    cuda = getattr(mx, "cuda", None)
    if not (cuda and cuda.is_available()):
        return False
    os.environ.setdefault(CUDA_GRAPHS, "0")
    return _as_mlx_reads(os.environ[CUDA_GRAPHS]) == 0


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
    # With sync and without overlap: start each part once the part before it is done, the host
    # having built it while the device ran that one. Evaluating each part before the next is
    # built idles the device while the host builds; built ahead, it idles only while the host
    # starts the part. One part runs at a time, and building one allocates nothing (MLX
    # allocates when it evaluates), but a back-end that releases a finished part's buffers
    # after the wait returns (MLX's CUDA back-end from a worker thread, Metal in a completion
    # handler) may still hold them when the next part starts at once: on an H200 the peaks lay
    # between strict's and two in flight's. So plans run ahead only where the pacer's flush
    # holds a stage to its estimate (`MemoryPlan.paced_vae_execution`). A part's buffer writes
    # cannot be waited on once the next write is built (`Pace.__call__`), so buffers are not
    # written in place ahead.
    ahead: bool = False
    # Passes over the MLP's hidden units: each pass computes the gate and up rows of its
    # units for every token (large matmuls, each weight row read once), so the [L, 2F]
    # projection output never exists whole. Token chunks bound the same memory by
    # splitting the tokens instead, which shrinks every matmul and reads every weight once
    # per chunk.
    hidden_parts: int = 1
    # With sync: a block's attention (q, k and v with it) a part of its own, before the rest of
    # the block (its MLP and output, in one part where the MLP runs in one pass): a block's
    # attention and its MLP, with their decoded slabs, in one part only where the block joins
    # its parts (`joins`).
    attention_apart: bool = False
    # Running in parts, a reduction over a large activation (the VAE's GroupNorm statistics)
    # works on blocks of rows whose float32 copy has at most this many elements.
    reduce_block: int = 1 << 25
    # Running in parts, GroupNorm statistics that the moments kernel reduces as it reads a
    # 16-bit activation are a part of their own over more values than this; over fewer they
    # join the part that normalizes with them. A part costs the host a start, which a small
    # tensor's statistics do not repay (a 512 px decode block by block took 22 ms without
    # them against 32 ms with, 21.6 ms in one graph, on an H200); before a large tensor's
    # normalization, the wait for its statistics lets the back-end release the part before it
    # first (a 1024 px decode block by block peaked 0.5-1.3 GB higher without them, c77 / c78).
    # 2^25 is a 512 px image's full-resolution tensor.
    stats_apart: int = 1 << 25
    # With sync: when MLX's active memory is above this many bytes after a part, wait for the
    # device to finish and release everything it holds (mx.synchronize) before the next part
    # is built. A back-end releases a finished part's buffers after the part, asynchronously
    # (MLX's CUDA back-end from a worker thread); when the releases fall behind, finished
    # parts' buffers pile up under the next ones.
    flush_above: int | None = None
    # With sync, two parts in flight and the MLP in passes over all of a block's tokens, up to
    # this many tokens a block runs its attention in its first pass's part and its last pass
    # in the block's end (`joins`): two parts a single block in 2 passes where it starts four,
    # three a double block where it starts six. Every part costs the host a start and a wait,
    # which bounds small steps: on an H200 a 512 px binary step (1,536 tokens) took 0.79-0.82x
    # the time, while at 1024 px (4,608) steps were 1.00-1.03x and peaked higher (c80). The
    # parts are larger, so plans join only where the pacer's flush holds a step to its
    # estimate (`MemoryPlan.paced_execution`).
    join_upto: int = 0

    def joins(self, length: int) -> bool:
        """Whether a block of `length` tokens joins its attention and its last MLP pass to
        their neighbours (see `join_upto`)."""
        return (self.sync and self.overlap and self.hidden_parts > 1 and not self.chunked(length)
                and length <= self.join_upto)

    def chunks(self, length: int) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) covering `length` tokens `token_chunk` at a time."""
        return _spans(length, self.token_chunk or length)

    def hidden_spans(self, hidden: int) -> list[tuple[int, int]]:
        """Ranges [c0, c1) of `hidden` units in `hidden_parts` passes, each a multiple of 128
        units where that leaves every pass some (whole tiles for the matmul kernels)."""
        step = -(-hidden // max(1, self.hidden_parts))
        if hidden >= 128 * self.hidden_parts:
            step = -(-step // 128) * 128
        return _spans(hidden, step)

    def in_parts(self, length: int) -> bool:
        """Whether a block of `length` tokens runs in parts: token chunks, hidden passes or its
        attention apart."""
        return self.chunked(length) or self.hidden_parts > 1 or self.attention_apart

    def chunked(self, length: int) -> bool:
        """Whether `length` tokens run in more than one token chunk. A block over all its
        tokens at once (in hidden passes) starts parts where memory is decided: the attention
        (q, k and v with it) and each pass. Every part the pacer starts costs the host a
        launch and a wait, which small parts do not repay."""
        return len(self.chunks(length)) > 1

    def pace(self, active: bool = True, after: tuple = ()) -> "Pace":
        """A pacer for one loop over parts (blocks, chunks); inactive when not running in parts.
        `after`: what its first part waits for once started, as if it were the part before."""
        return Pace(self, self.sync and active, after)

    def buffer(self, shape, dtype) -> "TokenBuffer":
        """A TokenBuffer for a loop paced by this execution."""
        return TokenBuffer(shape, dtype, in_place=not (self.sync and (self.overlap or self.ahead)))


ONE_GRAPH = Execution()


def _spans(length: int, step: int) -> list[tuple[int, int]]:
    step = min(max(1, step), max(1, length))
    return [(r, min(r + step, length)) for r in range(0, length, step)]


class Pace:
    """Evaluates a loop's parts as they are built. Strict: each part is evaluated before the
    next is built (one part's temporaries at a time). Ahead: each part is started once the
    part before it is done (one part at a time, built while the one before runs).
    Overlapped: each part is started at once and the host waits for the part before it, so
    at most two parts are in flight."""

    def __init__(self, execution: Execution, active: bool, after: tuple = ()):
        self.execution, self.active = execution, active
        self._previous: tuple = tuple(after)

    def __call__(self, *arrays: mx.array, wait: tuple = ()) -> None:
        """Evaluate `arrays` (strict) or start them (ahead, overlapped). `wait`: what finishing
        this part means, when `arrays` are not it. A buffer written in place (TokenBuffer)
        is the same Python object after every write, so waiting on it later would wait on
        its newest write: the part written into it is what is waited on instead."""
        if not self.active:
            return
        if self.execution.overlap:
            mx.async_eval(*arrays)
            self._wait()
        elif self.execution.ahead:
            self._wait()
            mx.async_eval(*arrays)
        else:
            mx.eval(*arrays)
        if self.execution.overlap or self.execution.ahead:
            self._previous = tuple(wait) or arrays
        flush = self.execution.flush_above
        if flush is not None and mx.get_active_memory() > flush:
            mx.synchronize()

    def _wait(self) -> None:
        """Wait for the part before (started, or what stands for it)."""
        if self._previous:
            mx.eval(*self._previous)
            self._previous = ()

    def settle(self) -> None:
        """Wait for a part started ahead before work that evaluates outside the pacer (an
        attention evaluated chunk by chunk), so that work does not run beside it."""
        if self.active and self.execution.ahead and not self.execution.overlap:
            self._wait()


class TokenBuffer:
    """A [B, L, ...] result assembled chunk by chunk, in order.

    Concatenating chunk results holds every chunk and the concatenation at once (2x).
    In place (strict pacing), each chunk is written into one buffer as it is evaluated, and
    MLX may reuse the buffer (the slice update donates it): on this project's CPU only the
    buffer and a chunk's temporaries live; on MLX's CUDA back-end strict fills peaked at
    2.1-3.5x the buffer (docs/results/h200-profile-buffer-c3.json), which the strict factors
    of memory.estimate cover. Two parts in flight, no back-end can reuse a buffer that the
    previous write still holds (4.1-4.7x there), so the chunks are kept and concatenated
    once, when the value is read.
    """

    def __init__(self, shape, dtype, in_place: bool = True):
        self.in_place, self._parts, self._axis, self._end = in_place, [], 1, 0
        self._value = mx.zeros(shape, dtype=dtype) if in_place else None

    def _keep(self, start: int, stop: int, part: mx.array, axis: int) -> mx.array:
        if start != self._end:  # kept chunks are concatenated in the order they come
            raise ValueError(f"chunks must be written in order: [{start}, {stop}) after {self._end}")
        self._parts.append(part)
        self._axis, self._end = axis, stop
        return part

    @property
    def value(self) -> mx.array:
        if self.in_place:
            return self._value
        return self._parts[0] if len(self._parts) == 1 else mx.concatenate(self._parts, axis=self._axis)

    def write(self, r0: int, r1: int, part: mx.array) -> mx.array:
        """Rows [r0, r1) (written in order); returns what to evaluate for this chunk."""
        if not self.in_place:
            return self._keep(r0, r1, part, 1)
        self._value[:, r0:r1] = part
        return self._value

    def write_columns(self, c0: int, c1: int, part: mx.array) -> mx.array:
        """Features [c0, c1) of the last axis (written in order), as `write`."""
        if not self.in_place:
            return self._keep(c0, c1, part, -1)
        self._value[..., c0:c1] = part
        return self._value


def by_chunks(fn, x: mx.array, execution: Execution, out_dim: int | None = None) -> mx.array:
    """fn applied to x [B, L, ...] token chunk by token chunk (fn must be token-wise)."""
    chunks = execution.chunks(x.shape[1])
    if len(chunks) == 1:
        return fn(x)
    shape = (*x.shape[:2], out_dim) if out_dim is not None else x.shape
    out, pace = execution.buffer(shape, x.dtype), execution.pace()
    for r0, r1 in chunks:
        part = fn(x[:, r0:r1])
        pace(out.write(r0, r1, part), wait=(part,))
    return out.value
