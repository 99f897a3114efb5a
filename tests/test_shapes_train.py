"""Demo training on the CPU at the tiny size: stages, checkpoints, resuming, QAT, export, and
the tokenizer through our text-encoder path."""

import importlib.util
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.packed_linear import PackedLinear
from bonsai_mlx.packing import dequantize, quantize
from bonsai_mlx.shapes import batches, qat, scenes, train
from bonsai_mlx.shapes.models import load_part
from bonsai_mlx.shapes.tokenizer import build_tokenizer, render_chat
from bonsai_mlx.shapes.trainer import LoopConfig, strip_moments
from bonsai_mlx.text_encoder import load_text_encoder

# --max-length 64 keeps the frozen 28-layer encoder quick on a CPU; the run records it, and the
# export's bonsai.json makes the pipeline pad prompts to it.
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COMMON = ["--size", "tiny", "--workers", "0", "--max-length", "64", "--log-every", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-train") / "run"
    assert train.main(["vae", str(root), *COMMON, "--steps", "2"]) == 0
    assert train.main(["dit", str(root), *COMMON, "--steps", "4", "--checkpoint-every", "2"]) == 0
    assert train.main(["qat-binary", str(root), *COMMON, "--steps", "2"]) == 0
    assert train.main(["qat-ternary", str(root), *COMMON, "--steps", "1"]) == 0
    return root


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_stages_write_parts_and_small_checkpoints(run):
    for part in ("tokenizer", "text_encoder", "vae", "transformer", "transformer-binary", "transformer-ternary"):
        assert (run / part).is_dir(), part
    ckpts = sorted((run / "checkpoints" / "dit").glob("step-*.safetensors"))
    assert [c.name for c in ckpts] == ["step-0000002.safetensors", "step-0000004.safetensors"]
    meta = json.loads(ckpts[-1].with_suffix(".json").read_text())
    assert meta["step"] == 4 and meta["stage"] == "dit" and meta["loop"]["checkpoint_dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(ckpts[-1]), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}  # weights and AdamW moments
    bn = _weights(run / "vae")
    assert not np.allclose(bn["bn.running_var"], 1.0)  # latent statistics were measured
    assert json.loads((run / "run.json").read_text()) == {"size": "tiny", "seed": 0, "max_length": 64}


def test_qat_weights_are_exactly_packable(run):
    fp = _weights(run / "transformer")
    for fmt in ("binary", "ternary"):
        w = _weights(run / f"transformer-{fmt}")
        names = [n for n in w if n.startswith(("transformer_blocks", "single_transformer_blocks"))
                 and n.endswith(".weight") and w[n].ndim == 2]
        assert len(names) == 14  # 10 per double block + 2 per single block
        for n in names:
            again = np.array(dequantize(quantize(w[n], fmt), mx.float32))
            assert np.array_equal(again, w[n]), n
            assert not np.array_equal(w[n], fp[n])
        levels = len(np.unique(np.abs(w[names[0]][:, :128])))
        assert levels <= (w[names[0]].shape[0] + 1)  # one magnitude (and 0 for ternary) per group


def test_resume_continues_the_same_run(run, tmp_path):
    other = tmp_path / "run"
    other.mkdir()
    for part in ("run.json", "tokenizer", "text_encoder", "vae"):
        src = run / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, other / part)
    args = ["--steps", "4", "--checkpoint-every", "2", "--checkpoint-dtype", "float32"]
    assert train.main(["dit", str(other), *COMMON, *args, "--max-minutes", "0"]) == 3  # stopped after step 1
    meta = json.loads((other / "checkpoints" / "dit" / "step-0000001.json").read_text())
    assert meta["step"] == 1 and not (other / "transformer").exists()
    with pytest.raises(BonsaiError, match="--resume"):
        train.main(["dit", str(other), *COMMON, *args])
    with pytest.raises(BonsaiError, match="same --steps"):
        train.main(["dit", str(other), *COMMON, "--steps", "5", "--resume"])
    assert train.main(["dit", str(other), *COMMON, *args, "--resume"]) == 0
    a, b = _weights(run / "transformer"), _weights(other / "transformer")
    # Same step counter, batches, noise and learning rates: the interrupted run ends where the
    # uninterrupted one did, bit for bit (float32 checkpoints; bfloat16 ones restart rounded).
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(BonsaiError, match="same --size, --seed"):
        train.main(["dit", str(other), *COMMON, "--seed", "1", "--resume"])


def test_weights_only_checkpoint_resumes_under_a_new_schedule(run, tmp_path):
    """What a GPU call brings back when AdamW's moments do not fit: the weights, resumed with
    AdamW restarted (and a ramp), onto a step count the checkpoint was not made for."""
    other = tmp_path / "run"
    other.mkdir()
    for part in ("run.json", "tokenizer", "text_encoder", "vae"):
        src = run / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, other / part)
    assert train.main(["dit", str(other), *COMMON, "--steps", "4", "--max-minutes", "0"]) == 3
    ckpt = other / "checkpoints" / "dit" / "step-0000001.safetensors"
    full = ckpt.stat().st_size
    strip_moments(ckpt)
    assert ckpt.stat().st_size < 0.4 * full
    from safetensors import safe_open
    with safe_open(str(ckpt), "pt") as f:
        assert f.keys() and not any(k.startswith("adam.") for k in f.keys())
    with pytest.raises(BonsaiError, match="--reschedule"):
        train.main(["dit", str(other), *COMMON, "--steps", "3", "--resume"])
    assert train.main(["dit", str(other), *COMMON, "--steps", "3", "--resume", "--reschedule"]) == 0
    meta = json.loads((other / "checkpoints" / "dit" / "step-0000003.json").read_text())
    assert meta["step"] == 3 and meta["loop"]["steps"] == 3 and meta["adam_steps"]  # moments again
    assert (other / "transformer" / "config.json").exists()
    with pytest.raises(BonsaiError, match="past the 2 steps"):
        train.main(["dit", str(other), *COMMON, "--steps", "2", "--resume", "--reschedule"])
    shutil.rmtree(other / "transformer")  # a finished stage whose part is lost: resuming writes it again
    assert train.main(["dit", str(other), *COMMON, "--steps", "3", "--resume"]) == 0
    assert (other / "transformer" / "config.json").exists()


def test_pieces_pack_and_restore_the_run(run, tmp_path):
    """examples/shapes_train_all.py: a run folder packed into pieces comes back whole."""
    spec = importlib.util.spec_from_file_location("shapes_train_all", EXAMPLES / "shapes_train_all.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.pack(run, tmp_path / "pieces")
    pieces = sorted((tmp_path / "pieces").iterdir())
    assert pieces and all(p.stat().st_size <= tool.PIECE_BYTES for p in pieces)
    tool.restore(tmp_path / "pieces", tmp_path / "back")
    back = tmp_path / "back" / run.name
    for part in ("vae", "transformer", "transformer-binary", "transformer-ternary", "text_encoder"):
        a, b = _weights(run / part), _weights(back / part)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), part
    assert not list((back / "checkpoints").rglob("*.safetensors"))  # finished stages keep no checkpoints


def test_exported_pipelines_load_and_generate(run, tmp_path):
    assert train.main(["export", str(run), "--weights", "fp", "--out", str(tmp_path / "fp")]) == 0
    assert train.main(["export", str(run), "--weights", "binary", "--out", str(tmp_path / "bin")]) == 0
    index = json.loads((tmp_path / "fp" / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    assert json.loads((tmp_path / "fp" / "bonsai.json").read_text()) == {
        "width": 128, "height": 128, "max_sequence_length": 64}
    pipe = BonsaiPipeline.from_pretrained(tmp_path / "fp", dtype=mx.float32)
    assert pipe.max_sequence_length == 64 and pipe.default_size == (128, 128)  # as trained
    img = pipe.generate("an image of a red circle", steps=2, seed=3)
    assert img.image.size == (128, 128) and img.guidance == 4.0  # a base model: guidance by default

    packed = BonsaiPipeline.from_pretrained(tmp_path / "bin", dtype=mx.float32, quantize="binary")
    saved = _weights(tmp_path / "bin" / "transformer")
    layers = [(n, m) for n, m in packed.transformer.named_modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14
    for name, m in layers:  # packing the exported QAT weights loses nothing
        assert np.array_equal(np.array(dequantize(m.packed, mx.float32)), saved[f"{name}.weight"].astype(np.float32))
    assert packed.generate("an image of two squares", width=128, height=128, steps=2, seed=3).image.size == (128, 128)
    with pytest.raises(BonsaiError, match="exists"):
        train.main(["export", str(run), "--weights", "fp", "--out", str(tmp_path / "fp")])


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_fake_quantize_is_the_packing_rule_with_a_straight_through_gradient(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 384, generator=g) * 0.05
    w[0, :128] = 0.0  # an all-zero group: ternary scale 0
    ours = qat.fake_quantize(w, fmt)
    ref = np.array(dequantize(quantize(w.numpy(), fmt), mx.float32))
    assert np.array_equal(ours.numpy(), ref)
    p = torch.nn.Parameter(w.clone())
    c = torch.randn(24, 384, generator=g)
    (qat.FakeQuant(fmt)(p) * c).sum().backward()
    assert torch.equal(p.grad, c)
    with pytest.raises(BonsaiError, match="multiple of 128"):
        qat.fake_quantize(torch.zeros(4, 100), fmt)


def test_batches_are_pure_functions_of_seed_stage_and_step():
    a = batches.batch(0, "dit", 7, 3, prompt_dropout=0.5)
    b = batches.batch(0, "dit", 7, 3, prompt_dropout=0.5)
    c = batches.batch(0, "dit", 8, 3, prompt_dropout=0.5)
    d = batches.batch(0, "qat-binary", 7, 3, prompt_dropout=0.5)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    held = {s.prompt for s in scenes.evaluation_specs()}
    prompts = [p for k in range(40) for p in batches.batch(1, "dit", k, 4, prompt_dropout=0.25)[1]]
    assert not set(prompts) & held
    assert 0.1 < prompts.count("") / len(prompts) < 0.4
    with pytest.raises(BonsaiError, match="stage"):
        batches.batch(0, "pretrain", 0, 1)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_processes_deliver_the_steps_in_order(context, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", _with_context(multiprocessing.get_context(context)))
    feed = train.Feed(batches.StepBatch(0, "vae", 2), total=6, workers=2)
    for k in (3, 4, 5):  # a resumed run starts mid-way
        images, prompts, tseed = feed(k)
        want = batches.batch(0, "vae", k, 2)
        assert np.array_equal(images.numpy(), want[0]) and list(prompts) == want[1] and tseed == want[2]


def _with_context(ctx, _init=torch.utils.data.DataLoader.__init__):
    def init(self, *a, **kw):
        _init(self, *a, multiprocessing_context=ctx, **kw)
    return init


def test_learning_rate_schedule():
    cfg = LoopConfig(steps=1000, lr=1e-3, warmup=100)
    assert cfg.lr_at(0) == pytest.approx(1e-5) and cfg.lr_at(99) == pytest.approx(1e-3)
    assert cfg.lr_at(999) == pytest.approx(1e-4, rel=1e-3)
    with pytest.raises(BonsaiError):
        LoopConfig(steps=0, lr=1e-3)


def test_tokenizer_through_our_text_encoder_path(run, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    prompt = "an image of an orange circle left of a square"
    enc = load_text_encoder(run, dtype=mx.float32)  # default taps (9, 18, 27)
    ids, mask = enc.tokenize(prompt, max_length=32)
    hf = AutoTokenizer.from_pretrained(run / "tokenizer")
    text = hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)
    assert text == render_chat(prompt)
    ref = hf(text, padding="max_length", max_length=32, truncation=True)
    assert np.array(ids)[0].tolist() == ref["input_ids"] and np.array(mask)[0].tolist() == ref["attention_mask"]
    raw = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json")).encode(text).ids
    n = len(raw)
    assert ref["input_ids"][:n] == raw and set(ref["input_ids"][n:]) == {hf.pad_token_id}  # right padding
    assert hf.pad_token == "<|endoftext|>" and n == 12 + 10  # the template's 12 tokens, one per word
    for word in scenes.vocabulary():
        assert len(hf(" " + word, add_special_tokens=False)["input_ids"]) == 1, word

    from diffusers import Flux2KleinPipeline
    te = load_part(run, "text_encoder", "cpu")
    with torch.no_grad():
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(te, hf, [prompt], dtype=torch.float32, device="cpu",
                                                           max_sequence_length=32).numpy()
    got = np.array(enc.encode(prompt, max_length=32))
    assert got.shape == want.shape == (1, 32, 3 * 32)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    again = build_tokenizer(tmp_path / "tok")  # the build is deterministic
    assert (again / "tokenizer.json").read_text() == (run / "tokenizer" / "tokenizer.json").read_text()
