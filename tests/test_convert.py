"""`python -m bonsai_mlx convert`: dense or official packs -> our native packs."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.errors import ConfigError
from bonsai_mlx.convert import convert_pipeline
from bonsai_mlx.packed_linear import PackedLinear
from fixtures import make_packs
from fixtures import make_pipeline as mp

W, H = 64, 64


def ours(path, **kw):
    return BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS, backend="reference", **kw)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return mp.make_pipeline(tmp_path_factory.mktemp("conv") / "dense")


def test_convert_dense_equals_quantize_on_load(dense, tmp_path):
    ref_pipe, src = dense
    r = subprocess.run([sys.executable, "-m", "bonsai_mlx", "convert", str(src), str(tmp_path / "bin"),
                        "--format", "ternary", "--dtype", "float32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    qc = json.loads((tmp_path / "bin" / "transformer-packed-mflux" / "quantization_config.json").read_text())
    assert qc == {"format": "bonsai", "weight_format": "ternary", "group_size": 128}
    packed = ours(tmp_path / "bin")
    assert {m.fmt for _, m in packed.transformer.named_modules() if isinstance(m, PackedLinear)} == {"ternary"}
    on_load = ours(src, quantize="ternary")
    codes = lambda p: {n: m for n, m in p.transformer.named_modules() if isinstance(m, PackedLinear)}
    for name, m in codes(packed).items():  # the same trits and scales as quantizing on load
        other = codes(on_load)[name]
        assert mx.array_equal(m.weight, other.weight) and mx.array_equal(m.scales, other.scales), name
    a = packed.generate("a bonsai", width=W, height=H, seed=2).array
    b = on_load.generate("a bonsai", width=W, height=H, seed=2).array
    np.testing.assert_array_equal(a, b)


def test_convert_official_pack_is_lossless(dense, tmp_path):
    ref_pipe, src = dense
    root = tmp_path / "official"
    for part in ("text_encoder", "tokenizer", "vae", "model_index.json"):
        (shutil.copytree if (src / part).is_dir() else shutil.copy)(src / part, root / part)
    make_packs.make_official_pack(ref_pipe.transformer, root / "transformer-packed-mflux", bits=1)
    out = convert_pipeline(root, tmp_path / "ours", "binary", dtype=mx.float32)
    a = ours(out).generate("x", width=W, height=H, seed=4).array
    b = ours(root).generate("x", width=W, height=H, seed=4).array
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="bits=1 pack; it converts losslessly only to binary"):
        convert_pipeline(root, tmp_path / "t", "ternary")
    with pytest.raises(ConfigError, match="exists"):
        convert_pipeline(root, tmp_path / "ours", "binary")
