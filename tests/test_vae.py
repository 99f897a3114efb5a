"""FLUX.2 VAE: parity with diffusers' AutoencoderKLFlux2 + Flux2KleinPipeline latent handling.

Reference side is diffusers itself (the model loaded back from the fixture directory and
the pipeline's own static patchify/pack/unpack helpers); the fixture script imports
nothing from bonsai_mlx.

Bounds (relative error ||ours - ref|| / ||ref||): float32 <= 1e-4 (measured ~1e-6: only
summation order differs), float16 <= 2e-2 (measured ~1.5e-3: fp16 weights and
activations, GroupNorm and BatchNorm statistics in fp32).
"""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2 as RefVAE  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as RefPipe  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from bonsai_mlx.execution import Execution
from bonsai_mlx.errors import BonsaiError, ConfigError, WeightsError  # noqa: E402
from bonsai_mlx.vae import load_vae, patchify, unpatchify  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_vae", Path(__file__).parent / "fixtures" / "make_vae.py")
make_vae_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_vae_mod)

REL = {mx.float32: 1e-4, mx.float16: 2e-2}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return {
        "small4": make_vae_mod.make_vae(root / "small4", "small4", seed=1),
        "small3": make_vae_mod.make_vae(root / "small3", "small3", seed=2),
        "decoder_only": make_vae_mod.make_vae(root / "dec", "small4", seed=1, decoder_only=True),
        "tiles": make_vae_mod.make_vae(root / "tiles", "tiles", seed=3),
    }


def ref_model(path):
    return RefVAE.from_pretrained(path).eval()


def bn_torch(ref):
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return mean, std


def ref_encode_tokens(ref, img):
    """img [B, 3, H, W] in [0, 1] -> tokens, as Flux2KleinPipeline does for reference images."""
    with torch.no_grad():
        lat = ref.encode(2 * img - 1).latent_dist.mode()  # preprocess normalizes to [-1, 1]
        p = RefPipe._patchify_latents(lat)
        mean, std = bn_torch(ref)
        return RefPipe._pack_latents((p - mean) / std)


def ref_decode_tokens(ref, tokens, h, w):
    """tokens [B, h*w, 4C] -> (raw decoder output [B, 3, H, W], postprocessed image in [0, 1])."""
    with torch.no_grad():
        ids = RefPipe._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, h, w))
        lat = RefPipe._unpack_latents_with_ids(tokens, ids, h, w)
        mean, std = bn_torch(ref)
        lat = RefPipe._unpatchify_latents(lat * std + mean)
        raw = ref.decode(lat).sample
        return raw, (raw / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.postprocess(do_denormalize)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("lazy", [False, True])
def test_encode_matches_diffusers(vae_dirs, name, dtype, lazy):
    ref, ours = ref_model(vae_dirs[name]), load_vae(vae_dirs[name], dtype=dtype, lazy_encoder=lazy)
    assert ours.encoder_resident != lazy
    f = 2 * ours.encoder_factor
    torch.manual_seed(0)
    img = torch.rand(2, 3, 3 * f, 5 * f)  # batch 2, non-square
    want = ref_encode_tokens(ref, img).numpy()
    got = np.array(ours.encode(mx.array(nhwc(img))))
    assert got.shape == want.shape
    assert rel_err(got, want) <= REL[dtype]


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_decode_matches_diffusers(vae_dirs, name, dtype):
    ref, ours = ref_model(vae_dirs[name]), load_vae(vae_dirs[name], dtype=dtype)
    f = 2 * ours.decoder_factor
    h, w = 5, 3  # non-square, taller than wide
    torch.manual_seed(1)
    tokens = torch.randn(2, h * w, ours.config.patched_channels)
    raw, img = ref_decode_tokens(ref, tokens, h, w)
    got = np.array(ours.decode_tokens(mx.array(tokens.numpy()), h * f, w * f))
    assert got.shape == (2, h * f, w * f, 3)
    assert rel_err(got, nhwc(img)) <= REL[dtype]
    # The clamp hides errors in saturated pixels, so also check the raw decoder output.
    z = unpatchify(ours.denormalize(mx.array(tokens.numpy()).reshape(2, h, w, -1)))
    assert rel_err(np.array(ours.decode(z)), nhwc(raw)) <= REL[dtype]


@pytest.mark.parametrize("ex", [Execution(sync=True), Execution(sync=True, overlap=True),
                                Execution(sync=True, overlap=True, reduce_block=64)])
def test_decoding_in_parts_matches_diffusers(vae_dirs, ex):
    """Block by block, two parts in flight, GroupNorm statistics over many row blocks
    (reduce_block=64 elements: every row its own block): the reference's image within the
    same bound, and our own whole-graph image up to float rounding."""
    ref, ours = ref_model(vae_dirs["small4"]), load_vae(vae_dirs["small4"], dtype=mx.float32)
    f = 2 * ours.decoder_factor
    torch.manual_seed(3)
    tokens = torch.randn(1, 5 * 3, ours.config.patched_channels)
    _, img = ref_decode_tokens(ref, tokens, 5, 3)
    whole = np.array(ours.decode_tokens(mx.array(tokens.numpy()), 5 * f, 3 * f))
    parts = np.array(ours.decode_tokens(mx.array(tokens.numpy()), 5 * f, 3 * f, execution=ex))
    assert rel_err(parts, nhwc(img)) <= REL[mx.float32]
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5)



def test_a_16_bit_decode_on_a_gpu_takes_its_statistics_from_the_moments_kernel(vae_dirs, monkeypatch):
    """With a GPU back-end, a float16 decode's GroupNorm statistics (every norm, batch of two,
    block by block with two in flight as the default decodes) come from the column_moments
    kernel, here its exact Metal source run by the CPU harness (in few row blocks: the harness
    runs a thread per GPU thread): the image is the reference's within the float16 bound, and
    this CPU's float32-copy statistics give the same image within float16 rounding."""
    import sys

    from bonsai_mlx import kernels

    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_helpers import run_moments

    ref, ours = ref_model(vae_dirs["small4"]), load_vae(vae_dirs["small4"], dtype=mx.float16)
    f = 2 * ours.decoder_factor
    ex = Execution(sync=True, overlap=True)
    torch.manual_seed(5)
    tokens = torch.randn(2, 4 * 3, ours.config.patched_channels)
    _, img = ref_decode_tokens(ref, tokens, 4, 3)
    plain = np.array(ours.decode_tokens(mx.array(tokens.numpy()), 4 * f, 3 * f, execution=ex).astype(mx.float32))
    calls = []

    def moments(x, mean=None, backend=None):
        calls.append((backend, x.dtype, mean is not None))
        return mx.array(run_moments(x, mean, threads=1024).astype(np.float32))

    monkeypatch.setattr(kernels, "moments_backend", lambda dt: "metal" if dt in (mx.float16, mx.bfloat16) else None)
    monkeypatch.setattr(kernels, "column_moments", moments)
    got = np.array(ours.decode_tokens(mx.array(tokens.numpy()), 4 * f, 3 * f, execution=ex).astype(mx.float32))
    norms = sum(1 for _, m in ours.decoder.named_modules() if type(m).__name__ == "GroupNorm")
    assert len(calls) == 2 * norms and set(calls) == {("metal", mx.float16, False), ("metal", mx.float16, True)}
    assert rel_err(got, nhwc(img)) <= REL[mx.float16]
    assert rel_err(got, plain) <= 2e-3 and np.abs(got - plain).max() <= 2 / 255

def test_statistics_from_the_moments_kernel_are_a_part_of_their_own_over_large_tensors(vae_dirs, monkeypatch):
    """Decoding block by block with the column_moments kernel (a GPU back-end), a GroupNorm's
    statistics ([B, C] sums) of a tensor of at most `Execution.stats_apart` values join the part
    that reads them: the pacer starts the resnets' and blocks' parts only, where this CPU's
    float32-copy statistics are parts of their own (row blocks bounded in memory). Over more
    values they are parts of their own again. The image is the same every way."""
    from bonsai_mlx import execution, kernels

    ours = load_vae(vae_dirs["small4"], dtype=mx.float16)
    tokens = mx.random.normal((1, 4 * 3, ours.config.patched_channels), key=mx.random.key(3))
    f = 2 * ours.decoder_factor
    parts = []
    paced = execution.Pace.__call__

    def spy(self, *arrays, wait=()):
        parts.append([a.shape for a in arrays])
        return paced(self, *arrays, wait=wait)

    monkeypatch.setattr(execution.Pace, "__call__", spy)
    ex = Execution(sync=True, ahead=True)
    plain = np.array(ours.decode_tokens(tokens, 4 * f, 3 * f, execution=ex).astype(mx.float32))
    copies = len(parts)
    assert any(len(s) == 2 for p in parts for s in p)  # float32-copy sums: parts of their own

    def moments(x, mean=None, backend=None):  # the kernel's sums, in float32 as it reads x
        x32 = x.astype(mx.float32)
        return mx.sum(x32 if mean is None else mx.square(x32 - mean[:, None]), axis=1)

    monkeypatch.setattr(kernels, "moments_backend", lambda dt: "metal" if dt in (mx.float16, mx.bfloat16) else None)
    monkeypatch.setattr(kernels, "column_moments", moments)
    parts.clear()
    got = np.array(ours.decode_tokens(tokens, 4 * f, 3 * f, execution=ex).astype(mx.float32))
    norms = sum(1 for _, m in ours.decoder.named_modules() if type(m).__name__ == "GroupNorm")
    assert not any(len(s) == 2 for p in parts for s in p), parts
    assert len(parts) <= copies - 2 * norms, (len(parts), copies, norms)
    assert np.abs(got - plain).max() <= 2 / 255
    small = len(parts)
    parts.clear()
    large = np.array(ours.decode_tokens(tokens, 4 * f, 3 * f, execution=replace(ex, stats_apart=0)).astype(mx.float32))
    assert sum(1 for p in parts if len(p[0]) == 2) == 2 * norms and len(parts) == small + 2 * norms
    np.testing.assert_array_equal(large, got)


def test_decoder_only_checkpoint(vae_dirs):
    """FLUX.2-small-decoder style: decoder.*, post_quant_conv.*, bn.* only."""
    keys = load_file(str(vae_dirs["decoder_only"] / "diffusion_pytorch_model.safetensors")).keys()
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in keys)
    ours = load_vae(vae_dirs["decoder_only"], dtype=mx.float32)
    assert not ours.has_encoder
    assert ours.config.decoder_channels != ours.config.block_out_channels
    ref = ref_model(vae_dirs["small4"])  # same seed: identical decoder weights
    torch.manual_seed(2)
    tokens = torch.randn(2, 4 * 2, ours.config.patched_channels)
    _, img = ref_decode_tokens(ref, tokens, 4, 2)
    got = np.array(ours.decode_tokens(mx.array(tokens.numpy()), 64, 32))
    assert rel_err(got, nhwc(img)) <= REL[mx.float32]
    with pytest.raises(BonsaiError, match="no encoder"):
        ours.encode(mx.zeros((1, 32, 32, 3)))


def test_patchify_layout_matches_pipeline():
    x = torch.randn(2, 3, 6, 4)
    want = nhwc(RefPipe._patchify_latents(x))  # channel = c*4 + pi*2 + pj
    got = patchify(mx.array(nhwc(x)))
    np.testing.assert_array_equal(np.array(got), want)
    np.testing.assert_array_equal(np.array(unpatchify(got)), nhwc(x))


@pytest.mark.parametrize("tile, overlap", [(768, 256), (512, 16)])
def test_tiled_decode_1024(vae_dirs, tile, overlap):
    """1024x1024, tiles of 768 px with 256 px overlap (2x2 tiles) or of 512 px with 16 px
    overlap (3x3 tiles, the pipeline's narrow cross-fade), float32.

    Bound: max |tiled - untiled| <= 0.5/255 on the [0, 1] output. Why that is invisible:
    an 8-bit image stores round(255 x); moving x by less than half a level changes a
    pixel by at most one level, and only where it sits on a rounding boundary. Measured
    here: 0.049/255 max, 0.006/255 mean, spread over the whole image (no seam
    structure): float32 summation-order noise, of the same size as the difference
    between diffusers and bonsai_mlx decoding these latents untiled (0.032/255 max).

    Why it is that small: each tile carries the up path's full receptive field as
    context (so zero padding at the cut never reaches kept pixels) and every tile uses
    whole-image GroupNorm statistics (tile_stats="exact"). With per-tile statistics
    (tile_stats="tile", what diffusers' tiled decode does) the same decode differs by
    73/255 max, 3.8/255 mean: visible seams. The latents are deliberately
    non-stationary (a brighter right third, a vertical ramp, a disc) because per-tile
    statistics only go wrong where the content differs between tiles.
    """
    ours = load_vae(vae_dirs["tiles"], dtype=mx.float32)
    h = w = 64
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    noise = rng.standard_normal((1, h, w, ours.config.patched_channels))
    lat = (1 + 2 * (xx > 0.3))[None, :, :, None] * noise + 3 * yy[None, :, :, None] \
        + 2 * ((xx ** 2 + yy ** 2) < 0.2)[None, :, :, None]
    tokens = mx.array(lat.reshape(1, h * w, -1).astype(np.float32))
    full = np.array(ours.decode_tokens(tokens, 1024, 1024))
    tiled = np.array(ours.decode_tokens(tokens, 1024, 1024, tile_size=tile, overlap=overlap, tile_stats="exact"))
    assert full.std() > 0.05  # the comparison is not between two flat images
    assert np.abs(tiled - full).max() <= 0.5 / 255


def test_tiled_decode_small_and_options(vae_dirs):
    ours = load_vae(vae_dirs["small4"], dtype=mx.float32)
    tokens = mx.random.normal((1, 12 * 10, ours.config.patched_channels), key=mx.random.key(0))
    full = np.array(ours.decode_tokens(tokens, 192, 160))
    # Tile at least as big as the image: the untiled path.
    same = np.array(ours.decode_tokens(tokens, 192, 160, tile_size=256))
    np.testing.assert_array_equal(same, full)
    # (Tiled numerics are checked at 1024x1024 in test_tiled_decode_1024; tiles of this
    # 4-level VAE would need the whole 13-latent-pixel context and cost ~20 s on CPU.)
    with pytest.raises(BonsaiError, match="multiples"):
        ours.decode_tokens(tokens, 192, 160, tile_size=60, overlap=16)
    with pytest.raises(BonsaiError, match="tile_stats"):
        ours.decode_tokens(tokens, 192, 160, tile_size=64, overlap=16, tile_stats="nope")
    with pytest.raises(BonsaiError, match="tokens"):
        ours.decode_tokens(tokens, 192, 192)


# ----------------------------------------------------------------------------- loading errors

def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_weights(d, fn):
    f = d / "diffusion_pytorch_model.safetensors"
    sd = dict(load_file(str(f)))
    fn(sd)
    save_file(sd, str(f))


def test_load_errors(vae_dirs, tmp_path):
    src = vae_dirs["small3"]
    with pytest.raises(WeightsError, match="does not exist"):
        load_vae(tmp_path / "nope")

    d = _copy(src, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        load_vae(d)

    d = _copy(src, tmp_path / "noweights")
    (d / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no .safetensors"):
        load_vae(d)

    d = _copy(src, tmp_path / "keys")
    _edit_weights(d, lambda sd: (sd.pop("decoder.conv_out.bias"), sd.update(extra=np.zeros(3, np.float32))))
    with pytest.raises(WeightsError, match=r"missing keys \(1\): decoder.conv_out.bias.*unexpected keys \(1\): extra"):
        load_vae(d)

    d = _copy(src, tmp_path / "shape")
    _edit_weights(d, lambda sd: sd.update({"decoder.conv_out.weight": np.zeros((3, 8, 5, 5), np.float32)}))
    with pytest.raises(WeightsError, match=r"decoder.conv_out.weight: expected \(3, 3, 3, 8\).*got \(3, 5, 5, 8\)"):
        load_vae(d)

    d = _copy(src, tmp_path / "badcfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["up_block_types"] = ["AttnUpDecoderBlock2D"] * 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="AttnUpDecoderBlock2D"):
        load_vae(d)

    d = _copy(src, tmp_path / "groups")
    cfg = json.loads((d / "config.json").read_text())
    cfg["norm_num_groups"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="divisible"):
        load_vae(d)


def _encoder_bytes(vae) -> int:
    return sum(v.nbytes for k, v in tree_flatten(vae.parameters()) if k.startswith(("encoder.", "quant_conv.")))


def test_a_lazy_encoder_stays_on_disk_until_the_first_encode(vae_dirs, tmp_path):
    """load_vae(lazy_encoder=True) holds the decoder only: MLX's active memory grows by the
    eager load's less the encoder's bytes; decoding reads nothing more; the first encode reads
    the encoder and equals the eager VAE's encode exactly."""
    d = make_vae_mod.make_vae(tmp_path / "lazy", "wide", seed=4)
    load_vae(d)  # a first load's one-off allocations (kilobytes) are not a VAE's

    def loaded(**kw):
        mx.synchronize()
        start = mx.get_active_memory()
        vae = load_vae(d, **kw)
        return vae, mx.get_active_memory() - start

    lazy, lazy_bytes = loaded(lazy_encoder=True)
    eager, eager_bytes = loaded()
    enc = _encoder_bytes(eager)
    assert enc > 2e6 and enc > 0.3 * eager_bytes
    # tens of KB of MLX's own allocations either way (other tests' in the same process)
    assert abs(lazy_bytes - (eager_bytes - enc)) <= 0.03 * enc, (lazy_bytes, eager_bytes, enc)
    assert lazy.has_encoder and not lazy.encoder_resident and _encoder_bytes(lazy) == 0
    f = 2 * eager.encoder_factor
    tokens = mx.random.normal((1, 6, eager.config.patched_channels), key=mx.random.key(0))
    assert np.array_equal(np.array(lazy.decode_tokens(tokens, 2 * f, 3 * f)),
                          np.array(eager.decode_tokens(tokens, 2 * f, 3 * f)))
    assert not lazy.encoder_resident
    img = mx.random.uniform(shape=(1, 2 * f, 3 * f, 3), key=mx.random.key(1))
    got = lazy.encode(img)
    assert lazy.encoder_resident and _encoder_bytes(lazy) == enc
    assert np.array_equal(np.array(got), np.array(eager.encode(img)))
    assert sorted(k for k, _ in tree_flatten(lazy.parameters())) == sorted(k for k, _ in tree_flatten(eager.parameters()))


def test_a_lazy_encoder_changed_on_disk_is_refused_at_the_first_encode(vae_dirs, tmp_path):
    img = mx.zeros((1, 16, 16, 3))
    d = _copy(vae_dirs["small3"], tmp_path / "changed")
    vae = load_vae(d, lazy_encoder=True)
    _edit_weights(d, lambda sd: sd.update({"encoder.conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)}))
    with pytest.raises(WeightsError, match="no longer holds the VAE encoder's weights as loaded"):
        vae.encode(img)
    assert not vae.encoder_resident
    d = _copy(vae_dirs["small3"], tmp_path / "removed")
    vae = load_vae(d, lazy_encoder=True)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="could not be read again.*Load the VAE again"):
        vae.encode(img)
    side = 2 * vae.decoder_factor  # one token: decoding needs nothing of the encoder
    assert np.isfinite(np.array(vae.decode_tokens(mx.zeros((1, 1, vae.config.patched_channels)), side, side))).all()


def test_a_lazy_encoder_is_read_in_the_vaes_dtype_and_whole_or_not_at_all(vae_dirs, tmp_path, monkeypatch):
    """Read after set_dtype, the encoder takes the decoder's dtype from the file's values (as a
    load in that dtype does); a read that fails midway leaves it on disk, to be read again."""
    f = 2 * 8  # small4: 4 levels
    img = mx.random.uniform(shape=(1, f, 2 * f, 3), key=mx.random.key(2))
    lazy = load_vae(vae_dirs["small4"], dtype=mx.float16, lazy_encoder=True)
    lazy.set_dtype(mx.float32)
    want = load_vae(vae_dirs["small4"], dtype=mx.float32).encode(img)
    assert np.array_equal(np.array(lazy.encode(img)), np.array(want))
    assert lazy.encoder.conv_in.weight.dtype == mx.float32

    lazy = load_vae(vae_dirs["small4"], lazy_encoder=True)
    real_eval, calls = mx.eval, []

    def failing(*arrays):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("[load] unexpected end of file")
        return real_eval(*arrays)

    monkeypatch.setattr(mx, "eval", failing)
    with pytest.raises(WeightsError, match="could not be read from its checkpoint.*Load the VAE again"):
        lazy.encode(img)
    monkeypatch.setattr(mx, "eval", real_eval)
    assert not lazy.encoder_resident and lazy.has_encoder
    assert np.array_equal(np.array(lazy.encode(img)), np.array(load_vae(vae_dirs["small4"]).encode(img)))
