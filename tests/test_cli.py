"""`python -m bonsai_mlx generate` run as a user would: in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fixtures import make_pipeline as mp

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "bonsai_mlx", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The CLI uses the real text layers (9, 18, 27): a 28-layer tiny Qwen3.
    return mp.make_pipeline(tmp_path_factory.mktemp("cli") / "tiny", text_layers=(9, 18, 27))[1]


def test_generate_writes_pngs_with_metadata_and_previews(model_dir, tmp_path):
    r = cli("generate", "a red bonsai", "-o", tmp_path / "img.png", "--model", model_dir, "--width", 96,
            "--height", 64, "--seed", 5, "--count", 2, "--preview-dir", tmp_path / "prev", "--dtype", "float32", "-v")
    assert r.returncode == 0, r.stderr
    for i, seed in ((1, 5), (2, 6)):
        path = tmp_path / f"img-{i}.png"
        img = Image.open(path)
        assert img.size == (96, 64)
        meta = img.text
        assert meta["prompt"] == "a red bonsai" and json.loads(meta["seed"]) == seed
        assert json.loads(meta["steps"]) == 4 and json.loads(meta["width"]) == 96 and json.loads(meta["height"]) == 64
        assert json.loads(meta["parameters"])["model"] == str(model_dir)
        assert f"wrote {path}" in r.stdout
    assert len(list((tmp_path / "prev").glob("img-1-step*.png"))) == 4
    assert "4/4" in r.stderr  # the progress bar reached the end
    assert "active+cached (sampled)" in r.stderr  # -v reports what MLX held, its cache included
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_same_seed_same_image(model_dir, tmp_path):
    for name in ("a.png", "b.png"):
        assert cli("generate", "x", "-o", tmp_path / name, "--model", model_dir, "--width", 64, "--height", 64,
                   "--seed", 1).returncode == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


@pytest.mark.parametrize("args, message", [
    (["--width", "100"], "100 is not a positive multiple of 16"),
    (["--height", "4096"], "outside the supported range"),
    (["--count", "0"], "--count must be in 1..10000"),
])
def test_bad_sizes_are_clear_errors(model_dir, tmp_path, args, message):
    r = cli("generate", "x", "-o", tmp_path / "o.png", "--model", model_dir, *args)
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.png").exists()


def test_missing_model_is_a_clear_error(tmp_path):
    r = cli("generate", "x", "-o", tmp_path / "o.png", "--model", tmp_path / "nowhere")
    assert r.returncode == 2 and "neither a model directory nor a known model name" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("generate", "x", "-o", tmp_path / "o.png", "--model", "bonsai-ternary", env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and "huggingface-cli download prism-ml/bonsai-image-ternary-4B-mlx-2bit" in r.stderr
    r = cli("generate", "x", "-o", tmp_path / "no-such-dir" / "o.png", "--model", tmp_path)
    assert r.returncode == 2 and "does not exist; create it first" in r.stderr


def test_help_explains_the_options():
    r = cli("generate", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--width", "--height", "--steps", "--seed", "--guidance", "--negative-prompt", "--count",
                "--preview-dir", "example:"):
        assert opt in r.stdout


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    """Atomic output: an image whose write fails half-way leaves nothing behind."""
    from bonsai_mlx.pipeline import GenerationResult

    result = GenerationResult(image=Image.new("RGB", (16, 16)), prompt="p", negative_prompt=None, seed=1, steps=4,
                              guidance=1.0, width=16, height=16, model="m")

    def broken_save(fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(result.image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_prompt_file_runs_every_prompt_with_one_load(model_dir, tmp_path):
    """Plain and JSON lines (per-prompt seed, size, reference image, inpainting, output) and a
    LoRA, in one process that loads the model once."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    g = np.random.default_rng(0)
    pic = Image.fromarray(g.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    pic.resize((100, 70)).save(tmp_path / "ref.png")
    pic.resize((64, 64)).save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    save_file({"transformer.x_embedder.lora_A.weight": torch.randn(2, 16),
               "transformer.x_embedder.lora_B.weight": torch.randn(128, 2) * 0.1}, str(tmp_path / "style.safetensors"))
    lines = ["a plain prompt", "# a comment", "",
             json.dumps({"prompt": "edit it", "image": str(tmp_path / "ref.png"), "seed": 3}),
             json.dumps({"prompt": "repaint", "init_image": str(tmp_path / "init.png"),
                         "mask": str(tmp_path / "mask.png"), "strength": 0.75, "output": str(tmp_path / "mine.png")}),
             json.dumps({"prompt": "wide", "width": 96, "height": 64})]
    (tmp_path / "prompts.txt").write_text("\n".join(lines))
    r = cli("generate", "--prompt-file", tmp_path / "prompts.txt", "-o", tmp_path / "img.png", "--model", model_dir,
            "--seed", 10, "--lora", f"{tmp_path / 'style.safetensors'}:0.5", "--width", 64, "--height", 64,
            "--dtype", "float32", "-v")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("loaded ") == 1  # one load for every prompt
    expect = [("img-001.png", "a plain prompt", 10, (64, 64)), ("img-002.png", "edit it", 3, (64, 64)),
              ("mine.png", "repaint", 12, (64, 64)), ("img-004.png", "wide", 13, (96, 64))]
    for name, prompt, seed, size in expect:
        img = Image.open(tmp_path / name)
        meta = json.loads(img.text["parameters"])
        assert img.size == size and meta["prompt"] == prompt and meta["seed"] == seed, (name, meta)
        assert meta["loras"] == [{"name": "style", "file": str(tmp_path / "style.safetensors"), "scale": 0.5}]
    assert json.loads(Image.open(tmp_path / "img-002.png").text["edit"]) == {"references": 1}
    assert json.loads(Image.open(tmp_path / "mine.png").text["edit"]) == {"init_image": True, "strength": 0.75,
                                                                          "mask": True}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "colour": "red"}', "prompts.txt:2: unknown key 'colour'"),
    ('{"prompt": "x", "seed": "7"}', "prompts.txt:2: seed has the wrong type"),
    ('{"prompt": "x", "image": "nowhere.png"}', "prompts.txt:2: reference image nowhere.png does not exist"),
    ('{"prompt": "x", "mask": "m.png"}', "prompts.txt:2: a mask needs an init image"),
    ("{not json", "prompts.txt:2: not valid JSON"),
])
def test_bad_prompt_files_fail_before_loading(tmp_path, line, message, capsys, monkeypatch):
    from bonsai_mlx.cli import main

    (tmp_path / "prompts.txt").write_text("fine\n" + line + "\n")
    monkeypatch.chdir(tmp_path)
    # the model does not exist: a prompt-file error must come first, before any loading
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--prompt-file", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "o.png"),
              "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
    assert not list(tmp_path.glob("*.png"))


def test_a_prompt_file_encodes_its_prompts_ahead_in_one_encode(model_dir, tmp_path, monkeypatch):
    """The prompts of a prompt file are encoded before the first image, in one encode (a
    streamed encoder read once for all of them); the generations then encode nothing."""
    from bonsai_mlx.cli import main
    from bonsai_mlx.text_encoder import Qwen3TextEncoder

    calls, encode = [], Qwen3TextEncoder.encode
    monkeypatch.setattr(Qwen3TextEncoder, "encode",
                        lambda self, prompts, **kw: calls.append((list(prompts), kw.get("stream"))) or encode(self, prompts, **kw))
    (tmp_path / "prompts.txt").write_text("a fern\na larch\na fern\n")
    main(["generate", "--prompt-file", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "img.png"),
          "--model", str(model_dir), "--width", "64", "--height", "64", "--steps", "1", "--dtype", "float32"])
    assert calls == [(["a fern", "a larch"], True)]  # the default streams the encoder
    assert all((tmp_path / f"img-00{i}.png").exists() for i in (1, 2, 3))
