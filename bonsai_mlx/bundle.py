"""Bundles (see export.py): the manifest, checking a bundle, and loading one.

`verify` reads nothing but the manifest, the files' bytes and the safetensors headers: it
checks that every file the manifest lists is a regular file inside the bundle with the
stated size and sha256, that every tensor's name, shape and dtype agree with its file's
header, and that the bundle holds nothing else. It loads no model. `load_bundle` verifies,
then builds a pipeline from the bundle's components.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath

from .errors import BonsaiError
from .safe_files import read_json, read_safetensors_header
from .validate import MAX_SEQUENCE_LENGTH, check_size

FORMAT = "bonsai-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20


class BundleError(BonsaiError):
    """A bundle that is incomplete, altered, or does not match its manifest."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape"} of a safetensors file whose header `safe_files` has checked
    (it fits the file, known dtypes, byte ranges exactly their shapes' sizes, tiling the data
    with no gap, overlap or trailing byte)."""
    try:
        header = read_safetensors_header(path)
    except BonsaiError as e:
        raise BundleError(str(e)) from None
    return {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in header.items()}


def _component(rel: str) -> str:
    return rel.split("/", 1)[0] if "/" in rel else "bundle"


def write_manifest(directory: Path, manifest: dict, packing: dict[str, dict[str, str]] | None = None) -> None:
    """Add every file under `directory` (size, sha256 and, for safetensors, each tensor's
    name, shape, dtype, packing and component) to `manifest` and write manifest.json."""
    files = []
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        entry = {"path": rel, "bytes": path.stat().st_size, "sha256": _sha256(path), "component": _component(rel)}
        if rel.endswith(".safetensors"):
            packed = (packing or {}).get(rel, {})
            entry["tensors"] = [{"name": k, **v, "packing": packed.get(k), "component": entry["component"]}
                                for k, v in sorted(safetensors_header(path).items())]
        files.append(entry)
    manifest = {**manifest, "files": files}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _regular_file(path: Path, what: str) -> os.stat_result:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{what}: {path} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{what}: {path} is a symbolic link; a bundle holds regular files only")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what}: {path} is not a regular file")
    return st


def read_manifest(directory) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a bundle directory")
    _regular_file(directory / MANIFEST, "manifest")
    m = read_json(directory / MANIFEST, "bundle manifest", cap=MAX_MANIFEST_BYTES, error=BundleError)
    if m.get("format") != FORMAT:
        raise BundleError(f"{directory / MANIFEST} is not a {FORMAT} manifest")
    if m.get("format_version") != VERSION:
        raise BundleError(f"{directory / MANIFEST}: format_version {m.get('format_version')!r}; "
                          f"this bonsai-mlx reads version {VERSION}")
    if not isinstance(m.get("files"), list) or not isinstance(m.get("components"), dict):
        raise BundleError(f"{directory / MANIFEST} lacks its files or components")
    _check_components(directory / MANIFEST, m)
    return m


_DTYPES = ("float16", "bfloat16", "float32")


def _check_components(path: Path, m: dict) -> None:
    """What `load_bundle` reads from the manifest, checked for type and range."""
    from .layouts import BUNDLE

    def fail(what):
        raise BundleError(f"{path}: {what}")

    c = m["components"]
    for part in ("transformer", "text_encoder", "tokenizer", "vae"):
        if not isinstance(c.get(part), dict) or c[part].get("dir") != getattr(BUNDLE, part):
            fail(f"components.{part} must be an object with dir {getattr(BUNDLE, part)!r}")
    for part in ("transformer", "vae"):
        if c[part].get("dtype", "float16") not in _DTYPES:
            fail(f"components.{part}.dtype must be one of {_DTYPES}, got {c[part].get('dtype')!r}")
    te = c["text_encoder"]
    taps, length = te.get("hidden_state_taps"), te.get("max_sequence_length")
    if not (isinstance(taps, list) and taps and all(type(t) is int and 0 <= t <= 1024 for t in taps)):
        fail(f"components.text_encoder.hidden_state_taps must be a list of layer indices, got {taps!r}")
    if not (type(length) is int and 1 <= length <= MAX_SEQUENCE_LENGTH):
        fail(f"components.text_encoder.max_sequence_length must be an integer in 1..{MAX_SEQUENCE_LENGTH}, "
             f"got {length!r}")
    sampler = m.get("sampler")
    if not (isinstance(sampler, dict) and isinstance(sampler.get("distilled"), bool)):
        fail("sampler.distilled must be true or false")
    size = sampler.get("default_size", [512, 512])
    if not (isinstance(size, list) and len(size) == 2):
        fail(f"sampler.default_size must be [width, height], got {size!r}")
    try:
        check_size(*size)
    except BonsaiError as e:
        fail(f"sampler.default_size {size!r}: {e}")


def _inside(directory: Path, rel) -> Path:
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{MANIFEST} entry {rel!r} is not a relative path")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or "\0" in rel:
        raise BundleError(f"{MANIFEST} entry {rel!r} leaves the bundle")
    path = directory.joinpath(*p.parts)
    if not path.resolve().is_relative_to(directory.resolve()):
        raise BundleError(f"{MANIFEST} entry {rel!r} resolves outside the bundle")
    return path


def verify(directory) -> dict:
    """Check a bundle against its manifest (see the module's doc); returns the manifest.
    Raises BundleError naming the first file that disagrees."""
    directory = Path(directory)
    m = read_manifest(directory)
    listed = set()
    for entry in m["files"]:
        if not isinstance(entry, dict):
            raise BundleError(f"{directory / MANIFEST}: a files entry is not an object")
        rel = entry.get("path")
        path = _inside(directory, rel)
        if rel in listed:
            raise BundleError(f"{directory / MANIFEST} lists {rel} twice")
        listed.add(rel)
        st = _regular_file(path, f"manifest entry {rel}")
        if st.st_size != entry.get("bytes"):
            raise BundleError(f"{rel}: {st.st_size} bytes, {MANIFEST} says {entry.get('bytes')!r} "
                              "(the file is truncated or replaced, or the manifest altered)")
        if _sha256(path) != entry.get("sha256"):
            raise BundleError(f"{rel}: sha256 differs from {MANIFEST} (the file or the manifest was altered)")
        if rel.endswith(".safetensors"):
            header = safetensors_header(path)
            tensors = entry.get("tensors", [])
            if not isinstance(tensors, list) or not all(isinstance(t, dict) and {"name", "dtype", "shape"} <= t.keys()
                                                        and isinstance(t["name"], str) for t in tensors):
                raise BundleError(f"{directory / MANIFEST}: the tensors of {rel} must be objects with name, dtype "
                                  "and shape (the manifest was altered)")
            stated = {t["name"]: {"dtype": t["dtype"], "shape": t["shape"]} for t in tensors}
            if header != stated:
                names = sorted(set(header) ^ set(stated)) or sorted(k for k in header if header[k] != stated.get(k))
                raise BundleError(f"{rel}: tensors disagree with {MANIFEST} (first: {names[:3]})")
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*")
               if (p.is_file() or p.is_symlink()) and p.name != MANIFEST}
    extra = sorted(present - listed)
    if extra:
        raise BundleError(f"{directory / MANIFEST} does not list these files of the bundle: {extra[:5]}")
    return m


def load_bundle(directory, memory_budget="auto", verify_files: bool = True):
    """A BonsaiPipeline over a bundle (verified first unless `verify_files` is False)."""
    directory = Path(directory)
    m = verify(directory) if verify_files else read_manifest(directory)
    return pipeline_over(directory, m["components"], m["sampler"], memory_budget)


def pipeline_over(directory, components: dict, sampler: dict, memory_budget="auto", transformer=None):
    """A BonsaiPipeline over the files of a bundle's `components` (the manifest's) in
    `directory`, not verified; `transformer`: the bundle's transformer already in memory
    (else read from its files)."""
    import mlx.core as mx

    from .loading import TransformerSource
    from .pipeline import BonsaiPipeline
    from .text_encoder import load_text_encoder
    from .vae import load_vae

    directory, c = Path(directory), components
    dtype = getattr(mx, c["transformer"].get("dtype", "bfloat16"))
    loader = TransformerSource(directory / c["transformer"]["dir"], dtype)
    te = load_text_encoder(directory / c["text_encoder"]["dir"], dtype=dtype,
                           layers=c["text_encoder"]["hidden_state_taps"],
                           tokenizer_path=directory / c["tokenizer"]["dir"], resident=False)
    vae = load_vae(directory / c["vae"]["dir"], dtype=getattr(mx, c["vae"].get("dtype", "float16")), layout="mlx",
                   lazy_encoder=True)
    return BonsaiPipeline(transformer if transformer is not None else loader(), te, vae,
                          is_distilled=bool(sampler["distilled"]), model=str(directory),
                          max_sequence_length=c["text_encoder"]["max_sequence_length"],
                          memory_budget=memory_budget, transformer_loader=loader,
                          default_size=tuple(sampler.get("default_size", (512, 512))))
