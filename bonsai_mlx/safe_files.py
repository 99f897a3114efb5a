"""Reading model files without trusting them: the one reading layer every loader uses.

Model folders come from the Hub or from anyone, so before a byte of one reaches a parser
that could misbehave on it (mx.load, transformers, json), this module checks:

- where it is: a file named by an index, a layout folder or a symlink must resolve inside
  the model directory, or, for a folder inside a Hugging Face cache snapshot
  (`.../models--org--name/snapshots/<rev>/`), into that repo's `blobs/` folder;
- what it is: a regular file, checked with os.stat before opening and opened
  non-blocking, so a FIFO or a device is refused instead of blocking or streaming forever;
- how big it is: JSON files have size caps (configs 1 MB, indexes 16 MB, tokenizer files
  64 MB), and parsed JSON must have the expected type, no duplicate keys, no NaN or
  Infinity and no nesting deeper than 64;
- that a safetensors header is sound: its length within the file and the cap, a JSON
  object of known dtypes, non-negative integer shapes, byte lengths equal to
  prod(shape) x itemsize, offsets contiguous from 0 to the end of the file with no
  overlap or gap. Only then does `mx.load` see the file (it stays lazy: the data is
  read when evaluated).

It cannot guard against a file changed between these checks and the reads that follow;
model folders are assumed not to be rewritten while they load.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .errors import BonsaiError, ConfigError, UnsafeFileError, WeightsError
from .validate import brief, is_int

MAX_CONFIG_BYTES = 1 << 20  # config.json, quantization_config.json, model_index.json, tokenizer_config.json
MAX_INDEX_BYTES = 16 << 20  # *.safetensors.index.json
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json, vocab.json, merges.txt
MAX_HEADER_BYTES = 16 << 20  # a safetensors header (4B-parameter checkpoints have ~100 KB ones)
MAX_JSON_DEPTH = 64
MAX_DIMS = 8
MAX_DIM = (1 << 31) - 1  # MLX shapes are int32

# Element sizes of the safetensors dtypes bonsai_mlx reads (mx.load also maps F8_E4M3 to
# uint8 bytes and C64 to complex64, neither of which any of our models stores).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32")
# Weights saved by torch.save / pickle: loading them can run code, so they are never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise WeightsError(f"{path} does not exist ({what})") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in a name from an index
        raise WeightsError(f"cannot open {path} ({what}): {e}") from None


def check_regular(path: Path, what: str = "model file") -> os.stat_result:
    """os.stat of `path` (following symlinks), refusing anything but a regular file."""
    st = _stat(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path} is {_kind(st.st_mode)}, not a regular file; a {what} must be a plain file")
    return st


def open_regular(path: Path, what: str = "model file") -> int:
    """A read-only descriptor of the regular file `path`. Opened non-blocking, and its type
    checked again on the descriptor, so a FIFO swapped in after the stat cannot block."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise WeightsError(f"cannot open {path} ({what}): {e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a regular file; a {what} must be a plain file")
    return fd


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_bytes(path: Path, cap: int, what: str, error=ConfigError) -> bytes:
    """The bytes of the regular file `path`, refused when over `cap`."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise UnsafeFileError(f"{path} is {size:,} bytes; a {what} may have at most {cap:,}. "
                                  "It is not what it claims to be: download it again")
        data = _read_exactly(fd, cap + 1)
    except OSError as e:
        raise error(f"cannot read {path} ({what}): {e}") from None
    finally:
        os.close(fd)
    if len(data) > cap:
        raise UnsafeFileError(f"{path} grew past {cap:,} bytes while it was read ({what})")
    return data


# ---------------------------------------------------------------------------- JSON

def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {brief(k)}")
        out[k] = v
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range")
    return v


def _depth(obj) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array"}


def parse_json(data: bytes, path: Path, what: str, expect=dict, error=ConfigError):
    """`data` (UTF-8 JSON read from `path`) parsed, refusing duplicate keys, NaN/Infinity,
    nesting deeper than MAX_JSON_DEPTH and a top-level value that is not `expect`."""
    try:
        text = data.decode("utf-8-sig")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                           parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({what}): {e.reason} at byte {e.start}; download it again") from None
    except RecursionError:
        raise error(f"{path} nests JSON too deeply ({what}); download it again") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, constants, huge integers
        raise error(f"{path} is not valid JSON ({what}): {e}; download or fix the file") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise error(f"{path} nests JSON deeper than {MAX_JSON_DEPTH} levels ({what}); download it again")
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path} must hold {_TYPE_NAMES.get(expect, expect.__name__)} ({what}), "
                    f"got {type(value).__name__}")
    return value


def read_json(path: Path, what: str = "config", cap: int = MAX_CONFIG_BYTES, expect=dict, error=ConfigError):
    """A bounded JSON file: regular, at most `cap` bytes, of type `expect`."""
    return parse_json(read_bytes(Path(path), cap, what, error), Path(path), what, expect, error)


# ---------------------------------------------------------------------------- containment

def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def hf_blobs(folder: Path) -> Path | None:
    """The `blobs/` folder of the Hugging Face cache repo whose snapshot holds `folder`
    (a real path), or None when `folder` is not inside a snapshot."""
    for anc in (folder, *folder.parents):
        repo = anc.parent.parent
        if anc.parent.name == "snapshots" and "--" in repo.name:
            return _real(repo / "blobs")
    return None


class ModelFolder:
    """A folder a loader reads files from, and the model directory (`root`) its files must
    stay in. In a Hugging Face cache snapshot, files may also be symlinks into the repo's
    blobs/ folder (that is how the cache stores them)."""

    def __init__(self, folder, root=None):
        self.path = Path(folder)
        self.root = Path(root) if root is not None else self.path
        self._root_real = _real(self.root)
        self.real = _real(self.path)
        if not _inside(self.real, self._root_real):
            raise UnsafeFileError(
                f"{self.path} resolves to {self.real}, outside the model directory {self.root}: a model's folders "
                "must be inside it (copy the files in, or pass the directory they are in)")
        self._blobs = hf_blobs(self._root_real)

    def subfolder(self, name: str) -> "ModelFolder":
        return ModelFolder(self.path / name, self.root)

    def contained(self, path: Path, named_by: str | None = None) -> Path:
        """`path` (in this folder, or named by `named_by`), refused unless it resolves inside
        the model directory or into the snapshot's blobs/."""
        try:
            real = _real(path)
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot resolve {path}: {e}") from None
        if _inside(real, self._root_real) or (self._blobs is not None and real.parent == self._blobs):
            return Path(path)
        by = f"{named_by} names {path}, which" if named_by else f"{path}"
        raise UnsafeFileError(
            f"{by} resolves to {real}, outside the model directory {self.root}; every file of a model must be "
            "inside its directory (or, in the Hugging Face cache, in its repo's blobs/). Copy the file in (cp -L) "
            "or pass the directory it is in.")

    def file(self, name, what: str = "model file", named_by: str | None = None) -> Path:
        """The regular file `name` (relative to this folder), contained."""
        name = str(name)
        if os.path.isabs(name) or "\0" in name:
            raise UnsafeFileError(f"{named_by or self.path} names {name!r}: model files are named relative to "
                                  "their folder, without NUL bytes")
        path = self.contained(self.path / name, named_by)
        check_regular(path, what)
        return path

    def exists(self, name) -> bool:
        return os.path.lexists(self.path / name)

    def json(self, name, what: str = "config", cap: int = MAX_CONFIG_BYTES, expect=dict, error=ConfigError):
        return read_json(self.file(name, what), what, cap, expect, error)

    def glob(self, pattern: str) -> list[Path]:
        try:
            return sorted(self.path.glob(pattern))
        except OSError as e:
            raise WeightsError(f"cannot list {self.path}: {e}") from None


# ---------------------------------------------------------------------------- safetensors

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a validated safetensors header."""
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets within the data section
    end: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _tensor_info(path: Path, name: str, entry) -> TensorInfo:
    where = f"{path}: tensor {brief(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise WeightsError(f"{where} must be an object with exactly dtype, shape and data_offsets, "
                           f"got {brief(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise WeightsError(f"{where} has dtype {brief(dtype)}; supported: {', '.join(DTYPE_BYTES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        raise WeightsError(f"{where} has shape {brief(shape)}; a shape is a list of at most {MAX_DIMS} "
                           f"integers in 0..{MAX_DIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightsError(f"{where} has data_offsets {brief(offsets)}; they must be [begin, end] with "
                           "0 <= begin <= end")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.nbytes != info.size * DTYPE_BYTES[dtype]:
        raise WeightsError(f"{where} spans {info.nbytes} bytes, but {dtype} {list(shape)} needs "
                           f"{info.size * DTYPE_BYTES[dtype]}")
    return info


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of the safetensors file `path`, after checking that its header is sound
    (see the module docstring); WeightsError naming the file and the fault otherwise."""
    path = Path(path)
    fd = open_regular(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        head = _read_exactly(fd, 8)
        if len(head) < 8:
            raise WeightsError(f"{path} is {size} bytes, too short for a safetensors file; download it again")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8:
            raise WeightsError(f"{path}: the safetensors header claims {n:,} bytes but the file has {size - 8:,} "
                               "after the length field: the file is corrupt or incomplete; download it again")
        if n > MAX_HEADER_BYTES:
            raise UnsafeFileError(f"{path}: a {n:,}-byte safetensors header is over the {MAX_HEADER_BYTES:,} "
                                  "bytes bonsai_mlx reads; the file is not a checkpoint it can load")
        raw = _read_exactly(fd, n)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    finally:
        os.close(fd)
    if len(raw) < n:
        raise WeightsError(f"{path} ended inside its safetensors header: the file is incomplete")
    header = parse_json(raw, path, "safetensors header", dict, WeightsError)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise WeightsError(f"{path}: __metadata__ must map names to strings, got {brief(meta)}")
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    end = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != end:
            fault = "overlaps the tensor before it" if t.start < end else f"leaves a gap of {t.start - end} bytes"
            raise WeightsError(f"{path}: tensor {brief(name)} at bytes {t.start}..{t.end} {fault}; "
                               "the file is corrupt")
        end = t.end
    if end != size - 8 - n:
        raise WeightsError(f"{path}: the tensors cover {end:,} bytes of data but the file holds {size - 8 - n:,}; "
                           "it is corrupt or incomplete: download it again")
    return tensors


_MX_DTYPES = {"BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16,
              "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "I32": mx.int32, "F32": mx.float32,
              "U64": mx.uint64, "I64": mx.int64}


def load_safetensors(path: Path, header: dict[str, TensorInfo] | None = None,
                     keys=None) -> dict[str, mx.array]:
    """Lazy arrays of the safetensors file `path`, whose header is validated first (pass
    `header` when it already was). mx.load maps the file; data is read when evaluated.
    `keys`: only these arrays are wanted and compared with the header (a streamed layer
    reads a few of a file's hundreds)."""
    path = Path(path)
    header = read_safetensors_header(path) if header is None else header
    try:
        arrays = mx.load(str(path), format="safetensors")
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse texts
        raise WeightsError(f"could not read {path} as safetensors ({e}). The file is corrupt or incomplete: "
                           "delete it and download it again.") from None
    for name in (header if keys is None else keys):
        t = header[name]
        a = arrays.get(name)
        if a is None or tuple(a.shape) != t.shape or a.dtype != _MX_DTYPES[t.dtype]:
            raise WeightsError(f"{path}: tensor {brief(name)} did not load as its header describes it; "
                               "the file changed while it was read, or is corrupt")
    if arrays.keys() != header.keys():
        raise WeightsError(f"{path} changed while it was read: its tensors differ from its header")
    return arrays if keys is None else {k: arrays[k] for k in keys}


_RAW = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def read_rows(path: Path, info: TensorInfo, rows) -> mx.array:
    """Rows `rows` (ascending, unique) of the tensor `info` of the safetensors file `path`,
    whose header was validated, read alone: a prompt's few hundred rows of a 151,936-row
    embedding table without reading the rest of it."""
    import numpy as np

    if len(info.shape) < 1 or info.shape[0] == 0:
        raise WeightsError(f"{path}: a {list(info.shape)} tensor has no rows to read")
    row_bytes = info.nbytes // info.shape[0]
    fd = open_regular(path, "safetensors file")
    try:
        (n,) = struct.unpack("<Q", _read_exactly(fd, 8))
        base = 8 + n + info.start
        out = bytearray()
        for r in rows:
            chunk = os.pread(fd, row_bytes, base + int(r) * row_bytes)
            if len(chunk) != row_bytes:
                raise WeightsError(f"{path} ended inside a tensor: the file changed while it was read")
            out += chunk
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    finally:
        os.close(fd)
    raw = np.frombuffer(out, dtype=_RAW[DTYPE_BYTES[info.dtype]]).reshape(len(rows), *info.shape[1:])
    return mx.array(raw).view(_MX_DTYPES[info.dtype])


# ---------------------------------------------------------------------------- shards

def refuse_pickles(folder: ModelFolder, what: str) -> None:
    pickled = [p.name for p in folder.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES
               or p.name.endswith((".bin.index.json", ".pt.index.json"))]
    if pickled:
        raise UnsafeFileError(
            f"{folder.path} holds {what} only as pickled files ({', '.join(sorted(pickled)[:4])}); bonsai_mlx "
            "never unpickles weights (loading a pickle can run code). Convert them to safetensors first, "
            "e.g. with safetensors.torch.save_file on a state dict you trust.")


def shard_files(folder: ModelFolder, preferred: tuple[str, ...] = (), what: str = "weights") -> list[Path]:
    """The safetensors files of `folder`: those its `*.safetensors.index.json` names, else
    the first of `preferred` present, else every `*.safetensors` in it. Each is a contained
    regular file; an index that names anything else is refused."""
    indexes = folder.glob("*.safetensors.index.json")
    if indexes:
        index = folder.file(indexes[0].name, "safetensors index")
        data = read_json(index, "safetensors index", MAX_INDEX_BYTES, dict, WeightsError)
        weight_map = data.get("weight_map")
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(v, str) for v in weight_map.values())):
            raise WeightsError(f"{index} is not a valid safetensors index: weight_map must map weight names to "
                               "file names; download it again")
        names = sorted(set(weight_map.values()))
        if not all(n.endswith(".safetensors") for n in names):
            raise UnsafeFileError(f"{index} names files that are not .safetensors: "
                                  f"{brief([n for n in names if not n.endswith('.safetensors')])}")
        missing = [n for n in names if not folder.exists(n)]
        if missing:
            raise WeightsError(f"{folder.path} is incomplete: {index.name} names shard files that are not there: "
                               f"{brief(missing, 200)}. Download the missing shards.")
        return [folder.file(n, "safetensors shard", named_by=str(index)) for n in names]
    for name in preferred:
        if folder.exists(name):
            return [folder.file(name, "safetensors file")]
    files = [folder.file(p.name, "safetensors file") for p in folder.glob("*.safetensors")]
    if not files:
        refuse_pickles(folder, what)
        raise WeightsError(f"{folder.path} has no .safetensors weights (no *.safetensors file): "
                           f"download the {what} into it")
    return files


def files_named(files: list[Path]) -> str:
    """How messages name a checkpoint: its file, or its folder and every shard's name."""
    if len(files) == 1:
        return str(files[0])
    return f"{files[0].parent} ({', '.join(f.name for f in files)})"


def load_shards(files: list[Path]) -> dict[str, mx.array]:
    """Lazy arrays of every shard, each header validated before mx.load sees its file."""
    headers = read_headers(files)  # also refuses a weight that two shards hold
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_safetensors(f, {k: t for k, (g, t) in headers.items() if g == f}))
    return weights


def read_headers(files: list[Path]) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of `files` with the file holding it, refusing a name two files share."""
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for f in files:
        for name, t in read_safetensors_header(f).items():
            if name in out:
                raise WeightsError(f"{f.name} repeats weight {brief(name)} already in {out[name][0].name}; "
                                   "two shards must not hold the same weight")
            out[name] = (f, t)
    return out




@contextmanager
def in_file(path):
    """Name `path` in the BonsaiError raised inside, unless it already does."""
    try:
        yield
    except (WeightsError, ConfigError, UnsafeFileError) as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
    except BonsaiError as e:  # packing's checks raise the base class
        if str(path) in str(e) or type(e) is not BonsaiError:
            raise
        raise WeightsError(f"{path}: {e}") from None
