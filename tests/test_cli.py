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
