"""Export a bundle that a Swift/iOS app (stock mlx-swift) can run with no Python.

    bundle/
      manifest.json                 format, components and configs, sampler, memory plans,
                                    every file's size and sha256, every tensor (bundle.py reads it)
      transformer/                  config.json, quantization_config.json, model.safetensors:
                                    block linears packed (binary/ternary, no bias), the rest 16-bit
      text_encoder/                 config.json, embed.safetensors, layer_NN.safetensors (one per
                                    decoder layer the taps need), norm.safetensors when tapped,
                                    model.safetensors.index.json; MLX affine 4-bit by default
      tokenizer/                    tokenizer.json and its config files
      vae/                          config.json, vae.safetensors, float16, convolutions
                                    channels-last [out, kh, kw, in] as MLX stores them
      kernels/                      the Metal kernels' source and header strings, kernels.json
      vectors/                      (--test-vectors) small inputs and outputs to check a port

The spec a Swift developer implements from is docs/export-format.md. Everything is written
into a temporary sibling directory and renamed into place at the end: an interrupted export
leaves nothing under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import bundle, kernel_spec
from .errors import BonsaiError
from .layouts import BUNDLE, BUNDLE_KERNELS, BUNDLE_VECTORS
from .convert import transformer_in_format
from .packed_checkpoint import save_packed
from .packed_linear import PackedLinear
from .scheduler import compute_empirical_mu
from .vae import ENCODER_KEYS

TEXT_GROUP_SIZE = 64
# Budgets and sizes the manifest carries memory plans for (bytes, pixels).
PLAN_BUDGETS = (1.5e9, 1.9e9, 2.2e9, 3e9, 4e9)
PLAN_SIZES = (512, 1024)


def export_bundle(source, output, fmt: str = "binary", text_bits: int = 4, vae: str = "full",
                  dtype=mx.bfloat16, test_vectors: bool = False, overwrite: bool = False,
                  text_layers=(9, 18, 27)) -> Path:
    """Write `source` (anything `BonsaiPipeline.from_pretrained` loads: official packs, our
    packs, diffusers directories) as a bundle at `output`. `fmt`: the transformer's block
    linears' format; `text_bits`: 4 or 8 (MLX affine, group 64) or 16 (kept in `dtype`);
    `vae`: "full" (encoder and decoder) or "small" (decoder only)."""
    from .loading import resolve_model, transformer_source
    from .pipeline import BonsaiPipeline

    if fmt not in ("binary", "ternary"):
        raise BonsaiError(f"bundle format must be binary or ternary (the kernels' formats), got {fmt!r}")
    if text_bits not in (4, 8, 16):
        raise BonsaiError(f"--text-encoder-bits must be 4, 8 or 16, got {text_bits!r}")
    if vae not in ("full", "small"):
        raise BonsaiError(f"--vae must be 'full' or 'small', got {vae!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise BonsaiError(f"{output} exists; choose a new directory or pass --overwrite")
    root = resolve_model(source)
    pipe = BonsaiPipeline.from_pretrained(root, dtype=dtype, backend="reference", memory_budget=None,
                                          text_layers=text_layers)
    pipe.release_transformer()  # read again below in the bundle's format
    transformer = transformer_in_format(transformer_source(source, root), fmt, dtype)

    tmp = output.with_name(f".{output.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_packed(transformer, tmp / BUNDLE.transformer)
        layers = _write_text_encoder(pipe.text_encoder, tmp / BUNDLE.text_encoder, text_bits, dtype)
        pipe.text_encoder.tokenizer.save_pretrained(str(tmp / BUNDLE.tokenizer))
        _write_vae(pipe.vae, tmp / BUNDLE.vae, decoder_only=vae == "small")
        kernel_spec.write_kernels(tmp / BUNDLE_KERNELS, (fmt,))
        if test_vectors:
            from .vectors import write_vectors

            write_vectors(tmp / BUNDLE_VECTORS, transformer, pipe, fmt)
        components = {
            "transformer": {"dir": BUNDLE.transformer, "config": transformer.config.to_dict(), "packing": fmt,
                            "group_size": 128, "dtype": str(dtype).split(".")[-1]},
            "text_encoder": _text_component(pipe, layers, text_bits, dtype),
            "tokenizer": {"dir": BUNDLE.tokenizer},
            "vae": {"dir": BUNDLE.vae, "config": json.loads((tmp / BUNDLE.vae / "config.json").read_text()),
                    "variant": vae, "layout": "mlx", "dtype": str(pipe.vae.dtype).split(".")[-1]},
            "kernels": {"dir": BUNDLE_KERNELS, "spec": f"{BUNDLE_KERNELS}/kernels.json"},
        }
        sampler = sampler_spec(pipe.is_distilled, pipe.default_size)
        # planned for the bundle's own models (its transformer's format, its text encoder's bits,
        # its VAE), not the source's
        own = bundle.pipeline_over(tmp, components, sampler, memory_budget=None, transformer=transformer)
        manifest = {"format": bundle.FORMAT, "format_version": bundle.VERSION, "software": "bonsai-mlx",
                    "components": components, "sampler": sampler, "memory_plans": memory_plans(own)}
        packing = {f"{BUNDLE.transformer}/model.safetensors": {n: fmt for n in packed_tensor_names(transformer)}}
        bundle.write_manifest(tmp, manifest, packing)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _write_text_encoder(te, directory: Path, bits: int, dtype) -> list[dict]:
    """One safetensors file per part (embedding, each decoder layer the taps need, the final
    norm when tapped) under the checkpoint's key names, and the index that maps them."""
    directory.mkdir(parents=True)
    w, cfg = te.weights, te.config
    raw = json.loads((w.directory / "config.json").read_text())
    raw.pop("quantization_config", None)
    if bits == 16:
        raw.pop("quantization", None)
    else:
        raw["quantization"] = {"group_size": TEXT_GROUP_SIZE, "bits": bits}
    if w.quantized and bits != 16 and (w.quantization or {}).get("bits") != bits:
        raise BonsaiError(f"the text encoder in {w.directory} is already quantized "
                          f"({w.quantization}); export it with --text-encoder-bits {(w.quantization or {}).get('bits')}")
    if w.quantized and bits == 16:
        raise BonsaiError(f"the text encoder in {w.directory} is quantized; it cannot be exported as 16-bit")
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    parts = [("embed", None)] + [(f"layer_{i:02d}", i) for i in range(cfg.num_layers_needed)]
    weight_map, written = {}, []
    for name, layer in parts:
        tensors = _text_tensors(w.index.load(w.keys_for(layer)), w.quantized, bits, dtype)
        mx.save_safetensors(str(directory / f"{name}.safetensors"), tensors)
        weight_map.update((k, f"{name}.safetensors") for k in tensors)
        written.append({"part": name, "layer": layer, "file": f"{BUNDLE.text_encoder}/{name}.safetensors"})
    if cfg.needs_final_norm:
        norm = {"model.norm.weight": w.index.load(["model.norm.weight"])["model.norm.weight"].astype(dtype)}
        mx.save_safetensors(str(directory / "norm.safetensors"), norm)
        weight_map["model.norm.weight"] = "norm.safetensors"
        written.append({"part": "norm", "layer": None, "file": f"{BUNDLE.text_encoder}/norm.safetensors"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    return written


def _text_tensors(arrays: dict, quantized: bool, bits: int, dtype) -> dict:
    """The tensors of one part as the bundle stores them: quantized checkpoints as they are,
    dense ones quantized (every 2-D weight: the linears and the embedding) or cast."""
    if quantized:
        return {k: v for k, v in arrays.items()}
    out = {}
    for k, v in arrays.items():
        if bits != 16 and v.ndim == 2:
            q, s, b = mx.quantize(v.astype(dtype), group_size=TEXT_GROUP_SIZE, bits=bits)
            base = k[: -len(".weight")]
            out.update({f"{base}.weight": q, f"{base}.scales": s, f"{base}.biases": b})
        else:
            out[k] = v.astype(dtype)
    mx.eval(out)
    return out


def _write_vae(vae, directory: Path, decoder_only: bool) -> None:
    directory.mkdir(parents=True)
    if not decoder_only:
        vae.read_encoder()
    # in name order: the file's layout does not depend on when the encoder was read
    weights = {k: v for k, v in sorted(tree_flatten(vae.parameters()))
               if not (decoder_only and k.startswith(ENCODER_KEYS))}
    cfg = {"_class_name": "AutoencoderKLFlux2", **{k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in vae.config.__dict__.items()}}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    mx.save_safetensors(str(directory / "vae.safetensors"), weights)


def _text_component(pipe, layers: list[dict], bits: int, dtype) -> dict:
    te = pipe.text_encoder
    return {
        "dir": BUNDLE.text_encoder, "config": json.loads((te.weights.directory / "config.json").read_text()),
        "quantization": None if bits == 16 else {"mode": "affine", "bits": bits, "group_size": TEXT_GROUP_SIZE},
        "dtype": str(dtype).split(".")[-1], "parts": layers,
        "hidden_state_taps": list(te.config.layers), "max_sequence_length": pipe.max_sequence_length,
        "prompt": {"chat_template": "tokenizer/tokenizer_config.json (chat_template), one user turn, "
                                    "add_generation_prompt=true, enable_thinking=false",
                   "padding": "right, to max_sequence_length, truncated beyond it", "pad_token_id":
                   te.tokenizer.pad_token_id},
    }


def sampler_spec(is_distilled: bool, default_size=(512, 512)) -> dict:
    return {
        "kind": "flow matching, Euler steps on the velocity (docs/export-format.md, Sampler)",
        "distilled": is_distilled, "default_steps": 4 if is_distilled else 50,
        "default_guidance": 1.0 if is_distilled else 4.0, "default_size": list(default_size),
        "sigmas": "linspace(1, 1/steps, steps) shifted by e^mu / (e^mu + (1/t - 1)), then 0",
        "mu": {"a1": 8.73809524e-05, "b1": 1.89833333, "a2": 0.00016927, "b2": 0.45666666,
               "rule": "L = (H/16)(W/16); L > 4300: a2 L + b2; else interpolate in steps between "
                       "a1 L + b1 (10 steps) and a2 L + b2 (200 steps)"},
        "check": {"L": 1024, "steps": 4, "mu": compute_empirical_mu(1024, 4)},
    }


def memory_plans(pipe) -> list[dict]:
    """Plans for stated budgets and sizes, from the models' footprint with the Apple GPU's
    fused attention and packed kernels (their slab path included) assumed and the VAE's
    scratch taken from `memory.conservative_vae_scratch` (above what an H200 and this
    project's CPU measured; an app follows the plans as they are). No plan counts on the
    pacer's flush: an app need not implement it, and on Metal it is not measured."""
    from dataclasses import replace

    from .executor import packed_info
    from .memory import describe, plan_memory

    model = pipe.transformer
    gpu = packed_info(model, model.dtype, on_gpu=True)  # the slab path where an app's kernels take it
    pipe.vae.read_encoder()  # an app may hold all of the VAE it loads: the plans count its encoder
    fp = replace(pipe.footprint(calibrated=False), fused_attention=True, reference_matmul=False, text_dequant_bytes=0,
                 slab_tokens=gpu["slab_tokens"], whole_slab_tokens=gpu["whole_slab_tokens"])
    plans = []
    sizes = dict.fromkeys([tuple(pipe.default_size)] + [(s, s) for s in PLAN_SIZES])  # the model's own first
    for width, height in sizes:
        for budget in PLAN_BUDGETS:
            try:
                p = plan_memory(fp, width, height, int(budget), flush=False)
            except BonsaiError as e:
                plans.append({"width": width, "height": height, "budget_bytes": int(budget), "refused": str(e)})
                continue
            stages = (["text_encoding"] + (["reload_transformer"] if p.releases_transformer else [])
                      + ([] if p.keep_modulation else ["modulation"]) + ["denoising", "decoding"])
            plans.append({"width": width, "height": height, "budget_bytes": int(budget), "described": describe(p),
                          "stages": stages,
                          "stream_text_encoder": p.stream_text_encoder,
                          "transformer_in_text": p.transformer_in_text,
                          "transformer_in_decode": p.transformer_in_decode, "vae_tile": p.vae_tile,
                          "vae_strip": p.vae_strip,
                          "token_chunk": p.token_chunk, "mlp_hidden_parts": p.hidden_parts,
                          "evaluate_block_by_block": p.sync,
                          "two_blocks_in_flight": p.overlap, "attention_apart": p.execution.attention_apart,
                          "vae_two_parts_in_flight": p.vae_execution.overlap,
                          "decode_each_matrix_whole": p.whole_slabs,
                          "modulation_layers_on_disk": not p.keep_modulation,
                          "context_embedder_on_disk": not p.keep_modulation,
                          "estimated_peak_bytes": p.estimated_peak_bytes,
                          "stage_estimates": p.stage_estimates})
    return plans


def packed_tensor_names(model: nn.Module) -> set[str]:
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, PackedLinear) for p in ("weight", "scales")}
