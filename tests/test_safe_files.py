"""safe_files: what every loader reads goes through one bounded, contained reader."""

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from bonsai_mlx.errors import ConfigError, UnsafeFileError, WeightsError
from bonsai_mlx.safe_files import (MAX_CONFIG_BYTES, ModelFolder, load_safetensors, read_json,
                                   read_safetensors_header, shard_files)


def raw_safetensors(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    """A safetensors file written byte by byte, so that it can be wrong in any way."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def entry(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


GOOD = {"a": entry("F32", [2, 3], 0, 24), "b": entry("U8", [4], 24, 28)}


def finishes(fn, seconds=20):
    """Run fn in a thread; the exception it raised, after asserting that it did not block."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked"
    return box.get("error")


# ---- what a valid file gives --------------------------------------------------------------

def test_valid_files_written_by_safetensors_and_mlx_load_unchanged(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.array([1, 2, 3], np.int64),
              "e": np.zeros((0, 5), np.float16), "b": np.array([True, False])}
    save_file(arrays, str(tmp_path / "np.safetensors"), metadata={"format": "pt"})
    mx.save_safetensors(str(tmp_path / "mx.safetensors"), {k: mx.array(v) for k, v in arrays.items()})
    for name in ("np", "mx"):
        f = tmp_path / f"{name}.safetensors"
        header = read_safetensors_header(f)
        assert {k: t.shape for k, t in header.items()} == {k: v.shape for k, v in arrays.items()}
        loaded = load_safetensors(f)
        for k, v in arrays.items():
            np.testing.assert_array_equal(np.array(loaded[k]), v)


# ---- safetensors headers: each fault named, before mx.load sees the file ---------------------

@pytest.mark.parametrize("header, data, length, pattern", [
    (GOOD, bytes(28), 10**6, "claims 1,000,000 bytes but the file has"),
    (GOOD, bytes(28), 1, "claims 1 bytes"),
    ({**GOOD, "a": entry("F64", [2, 3], 0, 48)}, bytes(52), None, "dtype 'F64'"),
    ({**GOOD, "a": entry("F32", [2, -3], 0, 24)}, bytes(28), None, "has shape"),
    ({**GOOD, "a": entry("F32", [2, True], 0, 24)}, bytes(28), None, "has shape"),
    ({**GOOD, "a": entry("F32", [2, 3.0], 0, 24)}, bytes(28), None, "has shape"),
    ({**GOOD, "a": entry("F32", [2, 3], 0, 20)}, bytes(24), None, "spans 20 bytes"),
    ({**GOOD, "b": entry("U8", [4], 20, 24)}, bytes(24), None, "overlaps"),
    ({**GOOD, "b": entry("U8", [4], 26, 30)}, bytes(30), None, "gap"),
    (GOOD, bytes(40), None, "cover 28 bytes of data but the file holds 40"),
    ({**GOOD, "a": entry("F32", [2, 3], 24, 0)}, bytes(28), None, "data_offsets"),
    ({**GOOD, "__metadata__": {"x": 1}}, bytes(28), None, "__metadata__"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, bytes(4), None, "exactly dtype"),
    ([1, 2], b"", None, "must hold a JSON object"),
])
def test_bad_headers_are_refused_naming_the_file(tmp_path, header, data, length, pattern):
    f = raw_safetensors(tmp_path / "m.safetensors", header, data, length)
    with pytest.raises(WeightsError, match=pattern) as e:
        load_safetensors(f)
    assert str(f) in str(e.value)


def test_header_bytes_that_are_not_json(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(struct.pack("<Q", 6) + b"{\"a\":\xff")
    with pytest.raises(WeightsError, match="not UTF-8"):
        read_safetensors_header(f)
    f.write_bytes(struct.pack("<Q", 4) + b"{\"a\"")
    with pytest.raises(WeightsError, match="not valid JSON"):
        read_safetensors_header(f)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match="too short"):
        read_safetensors_header(f)
    h = b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}"
    f.write_bytes(struct.pack("<Q", len(h)) + h)
    with pytest.raises(WeightsError, match="deeper than 64"):
        read_safetensors_header(f)


def test_duplicate_tensor_names_in_one_header_or_two_shards(tmp_path):
    f = tmp_path / "m.safetensors"
    h = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], ' \
        b'"data_offsets": [1, 2]}}'
    f.write_bytes(struct.pack("<Q", len(h)) + h + bytes(2))
    with pytest.raises(WeightsError, match="duplicate key 'a'"):
        read_safetensors_header(f)
    (tmp_path / "s").mkdir()
    for name in ("one", "two"):
        save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "s" / f"{name}.safetensors"))
    from bonsai_mlx.safe_files import load_shards
    with pytest.raises(WeightsError, match="two.safetensors repeats weight 'x' already in one.safetensors"):
        load_shards(shard_files(ModelFolder(tmp_path / "s")))


# ---- JSON files ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, pattern", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": NaN}', "NaN is not JSON"),
    ('{"a": 1e999}', "out of range"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"a": ' + "[" * 100 + "]" * 100 + "}", "deeper than 64"),
    ('{"a": ', "not valid JSON"),
])
def test_bad_json_is_refused_naming_the_file(tmp_path, text, pattern):
    f = tmp_path / "config.json"
    f.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as e:
        read_json(f)
    assert str(f) in str(e.value)


def test_oversized_json_is_refused_before_reading(tmp_path):
    f = tmp_path / "config.json"
    f.write_bytes(b"{" + b" " * MAX_CONFIG_BYTES + b"}")
    with pytest.raises(UnsafeFileError, match=f"{f}.*at most {MAX_CONFIG_BYTES:,}"):
        read_json(f)


# ---- not regular files ---------------------------------------------------------------------

def test_a_fifo_never_blocks_a_loader(tmp_path):
    from bonsai_mlx import load_transformer, load_vae

    (tmp_path / "t").mkdir()
    os.mkfifo(tmp_path / "t" / "config.json")
    err = finishes(lambda: load_transformer(tmp_path / "t"))
    assert isinstance(err, UnsafeFileError) and "is a FIFO, not a regular file" in str(err)
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.json").write_text("{}")
    os.mkfifo(tmp_path / "v" / "diffusion_pytorch_model.safetensors")
    err = finishes(lambda: load_vae(tmp_path / "v"))
    assert isinstance(err, UnsafeFileError) and "diffusion_pytorch_model.safetensors is a FIFO" in str(err)
    err = finishes(lambda: read_json(tmp_path / "v"))
    assert isinstance(err, UnsafeFileError) and "is a folder" in str(err)


# ---- containment ---------------------------------------------------------------------------

def _folder_with_index(parent, names):
    d = parent / "m"
    d.mkdir(parents=True)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}}))
    return d


def test_an_index_naming_a_file_outside_the_model_is_refused(tmp_path):
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    d = _folder_with_index(tmp_path, ["../outside.safetensors"])
    with pytest.raises(UnsafeFileError, match=r"model.safetensors.index.json names .*outside.safetensors, which resolves"):
        shard_files(ModelFolder(d))
    d = _folder_with_index(tmp_path / "abs", [str(tmp_path / "outside.safetensors")])
    with pytest.raises(UnsafeFileError, match="named relative to their folder"):
        shard_files(ModelFolder(d))
    d = _folder_with_index(tmp_path / "pk", ["pytorch_model.bin"])
    with pytest.raises(UnsafeFileError, match="not .safetensors"):
        shard_files(ModelFolder(d))


def test_symlinks_out_of_the_model_are_refused_and_inside_it_followed(tmp_path):
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(UnsafeFileError, match="resolves to .*outside.safetensors, outside the model directory"):
        shard_files(ModelFolder(d))
    (d / "model.safetensors").unlink()
    (d / "real").mkdir()
    save_file({"x": np.ones(2, np.float32)}, str(d / "real" / "w.safetensors"))
    (d / "model.safetensors").symlink_to(d / "real" / "w.safetensors")
    assert shard_files(ModelFolder(d)) == [d / "model.safetensors"]
    # A layout folder that is a symlink out of the model directory.
    (tmp_path / "elsewhere").mkdir()
    (d / "vae").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFileError, match="outside the model directory"):
        ModelFolder(d).subfolder("vae")


def test_hf_snapshot_files_may_point_into_their_repos_blobs_only(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    snap = repo / "snapshots" / "abc123" / "vae"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    save_file({"x": np.ones(2, np.float32)}, str(repo / "blobs" / "sha1"))
    (snap / "diffusion_pytorch_model.safetensors").symlink_to("../../../blobs/sha1")
    root = ModelFolder(repo / "snapshots" / "abc123")
    files = shard_files(root.subfolder("vae"))
    np.testing.assert_array_equal(np.array(load_safetensors(files[0])["x"]), np.ones(2))
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    save_file({"x": np.ones(2, np.float32)}, str(other / "sha2"))
    (snap / "diffusion_pytorch_model.safetensors").unlink()
    (snap / "diffusion_pytorch_model.safetensors").symlink_to(other / "sha2")
    with pytest.raises(UnsafeFileError, match="its repo's blobs"):
        shard_files(root.subfolder("vae"))


# ---- pickles --------------------------------------------------------------------------------

def test_pickled_weights_are_refused_with_what_to_do(tmp_path):
    from bonsai_mlx import load_transformer, load_vae

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFileError, match="never unpickles.*Convert them to safetensors"):
        load_vae(d)
    (d / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFileError, match="model.pt is a pickled checkpoint.*Convert it to safetensors"):
        load_transformer(d / "model.pt")


def test_a_vae_in_hugging_face_cache_layout_loads_like_the_plain_folder(tmp_path):
    """Snapshot files are symlinks into the repo's blobs/, as huggingface_hub stores them."""
    from bonsai_mlx import load_vae
    from fixtures import make_vae

    plain = make_vae.make_vae(tmp_path / "plain", "small3")
    repo = tmp_path / "hub" / "models--org--vae"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123" / "vae"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(plain.iterdir())):
        shutil.copy(f, repo / "blobs" / f"sha{i}")
        (snap / f.name).symlink_to(f"../../../blobs/sha{i}")
    a, b = load_vae(plain, dtype=mx.float32), load_vae(snap, dtype=mx.float32)
    for (ka, va), (kb, vb) in zip(sorted(tree_flatten(a.parameters())), sorted(tree_flatten(b.parameters()))):
        assert ka == kb and mx.array_equal(va, vb)
