"""Fuzz cases for the loaders: tiny model folders with one file mutated, and the worker that
loads them (`python tests/fuzz_cases.py BASE_DIR WORK_DIR SEED` reads case numbers from
stdin, one JSON line per case on stdout).

Case `i` is a pure function of (SEED, i): the target file comes round-robin from TARGETS,
the mutation from numpy's generator seeded with [SEED, i], so any failure replays alone
(`replay(base, work, seed, i)`). The base folders are written by `build_bases` with the
reference libraries' own savers (diffusers, transformers, mlx-lm, safetensors); the one
pack in our own format is written by bonsai_mlx's converter.

Each case must load, or raise one of bonsai_mlx's documented errors (errors.py) whose
message names the mutated file; anything else (another exception, a hang, a signal, a
blow-up past the memory cap) is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np

# (base folder, file mutated, kind of content)
TARGETS = [
    ("dense", "transformer/config.json", "config"),
    ("dense", "transformer/diffusion_pytorch_model.safetensors", "safetensors"),
    ("sharded", "transformer/diffusion_pytorch_model.safetensors.index.json", "index"),
    ("sharded", "transformer/diffusion_pytorch_model-00001-of-*.safetensors", "safetensors"),
    ("bfl", "flux2.safetensors", "safetensors"),
    ("official", "transformer-packed-mflux/quantization_config.json", "config"),
    ("official", "transformer-packed-mflux/diffusion_pytorch_model.safetensors", "safetensors"),
    ("bonsai", "transformer-packed-mflux/quantization_config.json", "config"),
    ("bonsai", "transformer-packed-mflux/model.safetensors", "safetensors"),
    ("vae", "vae/config.json", "config"),
    ("vae", "vae/diffusion_pytorch_model.safetensors", "safetensors"),
    ("text", "text_encoder/config.json", "config"),
    ("text", "text_encoder/model.safetensors", "safetensors"),
    ("text", "tokenizer/tokenizer.json", "tokenizer"),
    ("text", "tokenizer/tokenizer_config.json", "config"),
    ("text", "tokenizer/chat_template.jinja", "text"),
    ("text4", "text_encoder-mlx-4bit/config.json", "config"),
    ("text4", "text_encoder-mlx-4bit/model.safetensors", "safetensors"),
    ("bundle", "manifest.json", "config"),
    ("bundle", "transformer/model.safetensors", "safetensors"),
    ("bundle", "text_encoder/layer_01.safetensors", "safetensors"),
    ("bundle", "vae/vae.safetensors", "safetensors"),
    ("bundle", "kernels/kernels.json", "config"),
]
CASE_SECONDS = 20  # in-process bound on one case (the parent also watches the process)
BFL_CONFIG = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
                  joint_attention_dim=32, timestep_guidance_channels=32, mlp_ratio=2.0,
                  axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)


# ------------------------------------------------------------------------------ bases

def build_bases(base: Path) -> Path:
    """Write every base folder under `base` (about 20 MB); returns `base`."""
    import torch
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    from fixtures import make_flux2, make_packs, make_qwen3, make_vae

    base = Path(base)
    model = make_flux2.build_model("packable")
    make_flux2.save_diffusers(model, base / "dense" / "transformer")
    make_flux2.save_diffusers(model, base / "sharded" / "transformer", max_shard_size="1MB")
    torch.manual_seed(1)
    bfl = Flux2Transformer2DModel(**BFL_CONFIG).eval()
    with torch.no_grad():
        for _, p in bfl.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / np.sqrt(p.shape[1]))
    (base / "bfl").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in make_flux2.to_bfl_state_dict(bfl).items()},
              str(base / "bfl" / "flux2.safetensors"))
    make_packs.make_official_pack(make_flux2.build_model("packable"), base / "official" / "transformer-packed-mflux",
                                  bits=2)
    make_vae.make_vae(base / "vae" / "vae", "small4")
    q = make_qwen3.make_all(base / "_qwen", num_layers=4, quantized=True)
    for name, sub in (("text", "text_encoder"), ("text4", "text_encoder-mlx-4bit")):
        shutil.copytree(q / sub, base / name / sub)
        shutil.copytree(q / "tokenizer", base / name / "tokenizer")
    shutil.rmtree(base / "_qwen")

    import mlx.core as mx

    from bonsai_mlx import load_transformer, save_packed
    save_packed(load_transformer(base / "dense", dtype=mx.float32, quantize="ternary2", backend="reference"),
                base / "bonsai" / "transformer-packed-mflux")

    from bonsai_mlx import export_bundle
    from bonsai_mlx.random_weights import write_random_pack
    from test_random_weights import TEXT_LAYERS, TINY

    pack = write_random_pack(base / "_pack", "binary", **TINY)
    export_bundle(pack, base / "bundle", "binary", text_layers=TEXT_LAYERS)
    shutil.rmtree(pack)
    return base


# ------------------------------------------------------------------------------ mutations

VALUES = [0, -1, 1, 2, 3, 7, 31, 64, 127, 128, 129, 2**31, 2**63, 10**30, 0.5, 1.5, -0.0, 1e-300, 1e300, True, False,
          None, "", "x", "128", "float16", [], [1], [1, 2, 3, 4], [[1]], {}, {"a": 1}, [128] * 9]
NAMES = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.7.ff.linear_in.weight",
         "single_transformer_blocks.-1.attn.to_out.scales", "single_transformer_blocks.x.attn.to_out.weight",
         "transformer_blocks.00.attn.to_k.biases", "proj_out.scales", "x_embedder.biases", "config.scales",
         "model.layers.9.mlp.up_proj.weight", "model.embed_tokens.scales", "model.layers.0.self_attn.q_proj.scales",
         "decoder.conv_in.weight", "encoder.extra.weight", "bn.running_mean", "double_blocks.0.img_attn.qkv.weight",
         "img_in.weight", "final_layer.adaLN_modulation.1.weight", "__metadata__x", "", "../x", "a" * 300]
DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1, "I64": 8, "U16": 2}
BAD_DTYPES = ["F64", "F8_E4M3", "C64", "f32", "", 4, None, ["F32"]]
TEMPLATES = ["{{", "{% for m in messages %}", "{{ raise_exception('no') }}", "", "{{ messages[99]['content'] }}",
             "{% if %}", "\xff\xfe", "{{ messages }}" * 50, "plain text, no variables"]


def _choice(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _value(rng, old=None):
    """A replacement value: often near the old one, otherwise from VALUES."""
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.4:
        return _choice(rng, [old + 1, old - 1, old * 2, old // 2 if isinstance(old, int) else old / 2, -old, 0,
                             float(old) if isinstance(old, int) else int(old)])
    if isinstance(old, list) and old and rng.random() < 0.5:
        new = list(old)
        op = int(rng.integers(3))
        if op == 0:
            new[int(rng.integers(len(new)))] = _value(rng, new[int(rng.integers(len(new)))])
        elif op == 1:
            new.pop(int(rng.integers(len(new))))
        else:
            new.append(_choice(rng, new))
        return new
    return _choice(rng, VALUES)


def _deep(n):
    v = 1
    for _ in range(n):
        v = [v]
    return v


def mutate_json_value(rng, obj, extra_keys=()):
    """One change to a parsed JSON object (in place when it is a dict): a value replaced,
    a key deleted or added, or a list element changed. Returns (object, description)."""
    if not isinstance(obj, dict) or not obj:
        return _value(rng), "replaced the whole value"
    keys = list(obj)
    op = int(rng.integers(10))
    if op < 5:
        k = _choice(rng, keys)
        obj[k] = _value(rng, obj[k])
        return obj, f"set {k!r} to {str(obj[k])[:40]}"
    if op < 7:
        k = _choice(rng, keys)
        del obj[k]
        return obj, f"deleted {k!r}"
    if op < 9:
        k = _choice(rng, list(extra_keys) + ["unknown_option", "_private", "auto_map", "quantization"])
        obj[k] = _value(rng)
        return obj, f"added {k!r}"
    k = _choice(rng, keys)
    obj[k] = _deep(int(rng.integers(20, 200)))
    return obj, f"nested {k!r} deeply"


def mutate_text(rng, data: bytes):
    """Byte-level changes: flips, truncation, appended junk, or a whole replacement."""
    op = int(rng.integers(8))
    if op < 3 and data:
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        return bytes(b), "flipped bytes"
    if op < 5 and data:
        cut = int(rng.integers(len(data)))
        return data[:cut], f"truncated at {cut} of {len(data)}"
    if op == 5:
        return data + rng.bytes(int(rng.integers(1, 64))), "appended random bytes"
    return _choice(rng, [b"", b"\x00" * 16, rng.bytes(64), b"[]", b'"str"', b"5", b"null", b"{", b"{\"a\":1,\"a\":2}",
                         b"{\"a\": NaN}", b"{\"a\":" + b"[" * 5000 + b"]" * 5000 + b"}",
                         b"{" + b" " * (2 << 20) + b"}"]), "replaced the file"


def mutate_config(rng, data: bytes, extra_keys=()):
    if rng.random() < 0.25:
        return mutate_text(rng, data)
    obj, what = mutate_json_value(rng, json.loads(data), extra_keys)
    return json.dumps(obj).encode(), what


def mutate_index(rng, data: bytes):
    obj = json.loads(data)
    wm = obj.get("weight_map", {})
    second_shard = sorted(set(wm.values()))[1]
    op = int(rng.integers(4))
    if op < 2 and wm:
        k = _choice(rng, list(wm))
        wm[k] = _choice(rng, ["../outside.safetensors", "/etc/hostname", "missing.safetensors", "x\u0000.safetensors",
                              "", 5, None, second_shard,
                              "sub/../" + second_shard, "model.bin",
                              "diffusion_pytorch_model.safetensors.index.json"])
        return json.dumps(obj).encode(), f"weight_map[{k!r}] = {wm[k]!r}"
    if op == 2:
        obj["weight_map"] = _choice(rng, [[], {}, None, "x", {"a": 1}, _deep(100)])
        return json.dumps(obj).encode(), "replaced weight_map"
    return mutate_config(rng, data)


def _walk(rng, obj, depth=0):
    """A random (container, key) inside a JSON tree, for tokenizer.json."""
    node = obj
    for _ in range(int(rng.integers(1, 5))):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        k = _choice(rng, keys)
        if not isinstance(node[k], (dict, list)) or rng.random() < 0.3:
            return node, k
        node = node[k]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    return (node, _choice(rng, keys)) if keys else (None, None)


def mutate_tokenizer(rng, data: bytes):
    if rng.random() < 0.2:
        return mutate_text(rng, data)
    obj = json.loads(data)
    op = int(rng.integers(4))
    if op == 0:  # a token's id
        vocab = obj["model"]["vocab"]
        tok = _choice(rng, list(vocab))
        vocab[tok] = _choice(rng, [448, 5000, 2**31 - 1, -1, 0, 1.5, "3", None, vocab[_choice(rng, list(vocab))]])
        return json.dumps(obj).encode(), f"vocab[{tok!r}] = {vocab[tok]!r}"
    if op == 1 and obj.get("added_tokens"):
        t = _choice(rng, obj["added_tokens"])
        k = _choice(rng, list(t))
        t[k] = _value(rng, t[k])
        return json.dumps(obj).encode(), f"added token field {k!r} = {str(t[k])[:30]}"
    node, k = _walk(rng, obj)
    if node is None:
        return mutate_text(rng, data)
    if rng.random() < 0.3 and isinstance(node, dict):
        del node[k]
        return json.dumps(obj).encode(), f"deleted {k!r}"
    node[k] = _value(rng, node[k])
    return json.dumps(obj).encode(), f"set {k!r} to {str(node[k])[:30]}"


# -- safetensors

def _parse(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    body = data[8 + n:]
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return meta, [[k, v["dtype"], list(v["shape"]), body[v["data_offsets"][0]:v["data_offsets"][1]]] for k, v in items]


def _serialize(meta, items) -> bytes:
    header, off = {}, 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, dtype, shape, blob in items:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        off += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(i[3] for i in items)


def _raw(header: dict, body: bytes, length=None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + body


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bytes_for(rng, dtype, shape, old: bytes | None = None) -> bytes:
    n = _size(shape) * DTYPES[dtype]
    if old is not None and rng.random() < 0.5:
        return (old * (n // max(len(old), 1) + 1))[:n] if old else bytes(n)
    return rng.bytes(n) if n < (1 << 22) else bytes(n)


def mutate_safetensors(rng, data: bytes):
    meta, items = _parse(data)
    i = int(rng.integers(len(items)))
    name, dtype, shape, blob = items[i]
    op = int(rng.integers(20))
    if op == 0:  # consistent reshape: a valid file whose tensor does not fit the model
        new = list(shape)
        if new and rng.random() < 0.8:
            d = int(rng.integers(len(new)))
            new[d] = max(0, _choice(rng, [new[d] + 1, new[d] - 1, new[d] * 2, new[d] // 2, 0, 1]))
        else:
            new = _choice(rng, [new[::-1], [_size(new)], new + [1], [1] + new, []])
        items[i] = [name, dtype, new, _bytes_for(rng, dtype, new, blob)]
        return _serialize(meta, items), f"reshaped {name} {shape} -> {new}"
    if op == 1:
        items.pop(i)
        return _serialize(meta, items), f"dropped {name}"
    if op == 2:
        extra = _choice(rng, NAMES)
        dt = _choice(rng, list(DTYPES))
        sh = _choice(rng, [[4], [2, 3], [128, 4], [0], [1, 1, 1, 1], list(shape)])
        items.append([extra, dt, sh, _bytes_for(rng, dt, sh)])
        return _serialize(meta, items), f"added {extra} {dt} {sh}"
    if op == 3:
        new_name = _choice(rng, NAMES + [name.replace("0", "1"), name + ".scales", name.replace(".weight", ".scale"),
                                         items[int(rng.integers(len(items)))][0]])
        items[i][0] = new_name
        if sum(it[0] == new_name for it in items) > 1:  # a duplicate: only raw text can hold it
            h = "{" + ", ".join(f'"{n}": {{"dtype": "{d}", "shape": {json.dumps(s)}, "data_offsets": [{o}, {o + len(b)}]}}'
                                for (n, d, s, b), o in zip(items, np.cumsum([0] + [len(it[3]) for it in items]))) + "}"
            hb = h.encode()
            return struct.pack("<Q", len(hb)) + hb + b"".join(it[3] for it in items), f"duplicated {new_name}"
        return _serialize(meta, items), f"renamed {name} -> {new_name}"
    if op == 4:  # consistent dtype change
        dt = _choice(rng, list(DTYPES))
        items[i] = [name, dt, shape, _bytes_for(rng, dt, shape, blob)]
        return _serialize(meta, items), f"retyped {name} {dtype} -> {dt}"
    if op in (5, 6, 7) and blob:  # data only: special floats, random bytes
        b = bytearray(blob)
        pattern = _choice(rng, [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x7e", b"\xff\xff\xff\xff", b"\x03"])
        for _ in range(int(rng.integers(1, 16))):
            at = int(rng.integers(len(b)))
            b[at:at + len(pattern)] = pattern[:len(b) - at]
        items[i][3] = bytes(b)
        return _serialize(meta, items), f"wrote {pattern.hex()} into {name}'s data"
    if op == 8:  # swap two tensors' data of the same size
        same = [j for j, it in enumerate(items) if len(it[3]) == len(blob) and j != i]
        if same:
            j = _choice(rng, same)
            items[i][3], items[j][3] = items[j][3], items[i][3]
            return _serialize(meta, items), f"swapped data of {name} and {items[j][0]}"
    # raw: an invalid header or file
    header, off = ({} if meta is None else {"__metadata__": meta}), 0
    for n, d, s, b in items:
        header[n] = {"dtype": d, "shape": s, "data_offsets": [off, off + len(b)]}
        off += len(b)
    body = b"".join(it[3] for it in items)
    entry = header[name]
    if op == 9:
        entry["dtype"] = _choice(rng, BAD_DTYPES)
        what = f"dtype of {name} = {entry['dtype']!r}"
    elif op == 10:
        entry["shape"] = _choice(rng, [[-1], [2**40, 2**40], [1.5], ["2"], [True], [[2]], list(range(1, 20)), None,
                                       [2**31], shape + [2], [0] * len(shape)])
        what = f"shape of {name} = {entry['shape']}"
    elif op == 11:
        s0, e0 = entry["data_offsets"]
        entry["data_offsets"] = _choice(rng, [[s0 + 1, e0 + 1], [e0, s0], [-1, e0], [s0, e0 + 2**40], [s0], None,
                                             [s0, float(e0)], [0, e0 - s0], [s0 - 4, e0 - 4]])
        what = f"data_offsets of {name} = {entry['data_offsets']}"
    elif op == 12:
        k = _choice(rng, ["dtype", "shape", "data_offsets"])
        del entry[k]
        entry[_choice(rng, ["x", "offsets"])] = 1
        what = f"removed {k} of {name}"
    elif op == 13:
        header["__metadata__"] = _choice(rng, [{"a": 1}, [], "x", {"format": None}, _deep(50)])
        what = "__metadata__ replaced"
    elif op == 14:
        header = _choice(rng, [[], "x", 5, None, {"a": _deep(300)}])
        what = f"header = {str(header)[:30]}"
    elif op == 15:
        length = _choice(rng, [0, 1, 2, 7, len(json.dumps(header)) - 1, len(json.dumps(header)) + 1, len(data),
                               2**32, 2**63, 2**64 - 1])
        return _raw(header, body, length), f"header length field = {length}"
    elif op == 16:
        return data[: int(rng.integers(len(data)))], "truncated"
    elif op == 17:
        return data + rng.bytes(int(rng.integers(1, 100))), "appended bytes"
    else:
        raw = bytearray(_raw(header, body))
        hn = struct.unpack("<Q", raw[:8])[0]
        for _ in range(int(rng.integers(1, 6))):
            raw[8 + int(rng.integers(hn))] = int(rng.integers(32, 127)) if rng.random() < 0.7 else int(rng.integers(256))
        return bytes(raw), "flipped header bytes"
    return _raw(header, body), what


# Mutation descriptions by their first word -> the family the outcome table counts.
FAMILIES = {
    "reshaped": "tensors changed, header valid", "dropped": "tensors changed, header valid",
    "added": "tensors changed, header valid", "renamed": "tensors changed, header valid",
    "duplicated": "header invalid", "retyped": "tensors changed, header valid",
    "wrote": "tensor data changed", "swapped": "tensor data changed",
    "dtype": "header invalid", "shape": "header invalid", "data_offsets": "header invalid",
    "removed": "header invalid", "__metadata__": "header invalid", "header": "header invalid",
    "flipped": "bytes flipped", "truncated": "truncated or extended", "appended": "truncated or extended",
    "set": "JSON value changed", "deleted": "JSON key deleted", "nested": "JSON nested deeply",
    "vocab": "JSON value changed", "weight_map": "index entry changed",
    "replaced": "file replaced", "template": "file replaced",
}


def family(target, what: str) -> str:
    if what.startswith("replaced by "):
        return "not a regular file / link"
    if what.startswith("added") and target[2] != "safetensors":
        return "JSON key added"
    if what.startswith("added token"):
        return "JSON value changed"
    return FAMILIES.get(what.split(" ")[0].split("[")[0], what)


FILE_KINDS = ["fifo", "folder", "symlink out", "symlink loop", "dangling symlink", "empty"]


def mutate_file_kind(rng, path: Path, work: Path) -> str:
    kind = _choice(rng, FILE_KINDS)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink out":
        outside = work / "outside.json"
        outside.write_text('{"x": 1}')
        path.symlink_to(outside)
    elif kind == "symlink loop":
        path.symlink_to(path.name + ".loop")
        (path.parent / (path.name + ".loop")).symlink_to(path.name)
    elif kind == "dangling symlink":
        path.symlink_to(path.name + ".gone")
    else:
        path.write_bytes(b"")
    return f"replaced by {kind}"


def target_path(case: Path, rel: str) -> Path:
    """`rel` in `case`; a `*` in it stands for the part of a shard name that varies."""
    return sorted(case.glob(rel))[0] if "*" in rel else case / rel


def make_case(base: Path, work: Path, seed: int, i: int):
    """Case i's folder under `work` (base files hard-linked, the target replaced): returns
    (case folder, target, description)."""
    rng = np.random.default_rng([seed, i])
    target = TARGETS[i % len(TARGETS)]
    name, rel, kind = target
    case = work / f"case{i}"
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(base / name, case, copy_function=os.link)  # hard links: nothing copied
    path = target_path(case, rel)
    data = path.read_bytes()
    if rng.random() < 0.03:
        return case, target, mutate_file_kind(rng, path, work)
    if kind == "safetensors":
        new, what = mutate_safetensors(rng, data)
    elif kind == "index":
        new, what = mutate_index(rng, data)
    elif kind == "tokenizer":
        new, what = mutate_tokenizer(rng, data)
    elif kind == "text":
        new, what = (_choice(rng, TEMPLATES).encode("utf-8", "surrogateescape"), "template replaced") \
            if rng.random() < 0.5 else mutate_text(rng, data)
    else:
        new, what = mutate_config(rng, data, extra_keys=("use_sliding_window", "rope_scaling", "tokenizer_class",
                                                          "pad_token", "padding_side", "chat_template"))
    path.unlink()  # never write through the hard link into the base
    path.write_bytes(new)
    return case, target, what


# ------------------------------------------------------------------------------ running a case

class CaseTimeout(BaseException):
    pass


def load_case(case: Path, target) -> str:
    import warnings

    import mlx.core as mx

    from bonsai_mlx import load_bundle, load_transformer, load_vae
    from bonsai_mlx.text_encoder import load_text_encoder

    name, rel, _ = target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "bundle":
            pipe = load_bundle(case, memory_budget=None)
            mx.eval(pipe.transformer.parameters(), pipe.vae.parameters())
        elif name == "vae":
            model = load_vae(case / "vae", dtype=mx.float32)
            mx.eval(model.parameters())
        elif name in ("text", "text4"):
            enc = load_text_encoder(case, dtype=mx.float32, layers=(1, 2, 3))
            mx.eval(enc.encode("a bonsai tree at dawn", max_length=16))
        else:
            path = target_path(case, rel) if name == "bfl" else case
            model = load_transformer(path, dtype=mx.float32, backend="reference")
            mx.eval(model.parameters())
    return "loaded"


def run_case(base: Path, work: Path, seed: int, i: int) -> dict:
    from bonsai_mlx import errors

    documented = tuple(v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.BonsaiError))
    t = time.perf_counter()
    target = TARGETS[i % len(TARGETS)]
    out = {"case": i, "target": f"{target[0]}:{target[1]}"}
    try:
        case, target, out["mutation"] = make_case(base, work, seed, i)
    except Exception:  # a bug of this harness: reported as a failure, the worker goes on
        import traceback
        return {**out, "outcome": "harness error", "where": traceback.format_exc()[-1200:]}
    out["family"] = family(target, out["mutation"])
    signal.alarm(CASE_SECONDS)
    try:
        out["outcome"] = load_case(case, target)
    except CaseTimeout:
        out["outcome"] = "timeout"
    except documented as e:
        msg = str(e)
        file = target_path(case, target[1])
        out["error"] = type(e).__name__
        out["message"] = msg[:400]
        out["outcome"] = "refused" if file.name in msg or str(file) in msg else "refused, file not named"
    except MemoryError:
        out["outcome"] = "memory"
    except Exception as e:  # a failure: an exception that is not ours
        import traceback
        out["outcome"] = "foreign exception"
        out["error"] = type(e).__name__
        out["message"] = str(e)[:400]
        out["where"] = traceback.format_exc()[-1200:]
    finally:
        signal.alarm(0)
    out["seconds"] = round(time.perf_counter() - t, 3)
    shutil.rmtree(case, ignore_errors=True)
    return out


def _on_alarm(signum, frame):
    raise CaseTimeout


def worker(base: Path, work: Path, seed: int) -> None:
    """Run the case numbers read from stdin (one JSON list), one result line each."""
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    signal.signal(signal.SIGALRM, _on_alarm)
    work.mkdir(parents=True, exist_ok=True)
    for i in json.loads(sys.stdin.readline()):
        print(json.dumps(run_case(base, work, seed, i)), flush=True)


def replay(base, work, seed: int, i: int) -> dict:
    """One case, in this process, for debugging a failure."""
    signal.signal(signal.SIGALRM, _on_alarm)
    Path(work).mkdir(parents=True, exist_ok=True)
    return run_case(Path(base), Path(work), seed, i)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
