"""Every user error of the command line is one line on stderr and exit code 2, checked
before anything loads where it can be; nothing is written under a final name."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bonsai_mlx import cli
from fixtures import make_pipeline as mp


def run(capsys, *argv):
    """(exit code, stderr lines, stdout) of `python -m bonsai_mlx *argv`, in this process."""
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, err.splitlines(), out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # The CLI reads the real text layers (9, 18, 27): a 28-layer tiny Qwen3.
    return mp.make_pipeline(tmp_path_factory.mktemp("clie") / "tiny", text_layers=(9, 18, 27))[1]


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "--count must be in 1..10000, got 0"),
    (["--count", "10001"], "--count must be in 1..10000, got 10001"),
    (["--count", "many"], "'many' is not an integer"),
    (["--seed", "-1"], "--seed must be in 0..18446744073709551615, got -1"),
    (["--seed", str(2**64)], "--seed must be in 0..18446744073709551615"),
    (["--seed", str(2**64 - 2), "--count", "3"], "runs past the largest seed"),
    (["--steps", "0"], "--steps must be in 1..1000"),
    (["--guidance", "nan"], "guidance must be a finite number >= 0"),
    (["--width", "100"], "100 is not a positive multiple of 16"),
    (["--memory-budget", "lots"], "memory budget 'lots' is not a size"),
    (["--quantize", "ternary3"], "invalid choice: 'ternary3'"),
])
def test_bad_options_are_one_line_before_loading(capsys, tmp_path, args, message):
    # The model does not exist: each error must come before anything is loaded.
    code, err, out = run(capsys, "generate", "x", "-o", tmp_path / "o.png", "--model", tmp_path / "nowhere", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_output_and_preview_paths(capsys, tmp_path):
    code, err, _ = run(capsys, "generate", "x", "-o", tmp_path, "--model", tmp_path / "nowhere")
    assert code == 2 and len(err) == 1 and "is a folder; -o names the PNG file" in err[0]
    (tmp_path / "img-2.png").mkdir()
    code, err, _ = run(capsys, "generate", "x", "-o", tmp_path / "img.png", "--count", "2", "--model", tmp_path / "no")
    assert code == 2 and len(err) == 1 and "img-2.png is a folder" in err[0]
    (tmp_path / "file").write_text("x")
    code, err, _ = run(capsys, "generate", "x", "-o", tmp_path / "o.png", "--preview-dir", tmp_path / "file",
                       "--model", tmp_path / "no")
    assert code == 2 and len(err) == 1 and "exists and is not a folder" in err[0]
    code, err, _ = run(capsys, "generate", "x", "-o", tmp_path / "missing" / "o.png", "--model", tmp_path / "no")
    assert code == 2 and len(err) == 1 and "does not exist; create it first" in err[0]


def test_multi_line_errors_become_one_line(capsys, tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "p")
    f = tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd.pop("proj_out.weight")
    sd["extra.weight"] = np.zeros(2, np.float32)
    save_file(sd, str(f))
    code, err, _ = run(capsys, "generate", "x", "-o", tmp_path / "o.png", "--model", tmp_path / "p")
    assert code == 2 and len(err) == 1, err
    assert "missing weights (1): proj_out.weight" in err[0] and "unexpected weights (1): extra.weight" in err[0]
    assert not (tmp_path / "o.png").exists()


def test_convert_overwrite_refuses_files_and_foreign_folders(capsys, tiny, tmp_path):
    (tmp_path / "file").write_text("keep me")
    code, err, _ = run(capsys, "convert", tiny, tmp_path / "file", "--overwrite")
    assert code == 2 and len(err) == 1 and "exists and is not a directory" in err[0]
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, err, _ = run(capsys, "convert", tiny, tmp_path / "mine", "--overwrite")
    assert code == 2 and len(err) == 1 and "is not a pack written by convert" in err[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    code, err, _ = run(capsys, "convert", tiny, tiny / "packed")
    assert code == 2 and len(err) == 1 and "must not contain one another" in err[0]


def test_nan_weights_stop_the_generation_and_nothing_is_written(capsys, tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "p")
    f = tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["proj_out.weight"][0, 0] = np.nan
    save_file(sd, str(f))
    code, err, out = run(capsys, "generate", "x", "-o", tmp_path / "o.png", "--model", tmp_path / "p", "--width", 64,
                         "--height", 64, "--seed", 1)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: denoising step 1 of 4 produced NaN or Inf in bfloat16"), err
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png" or p.name.endswith(".partial")]


def test_ternary2_on_a_gpu_warns_once_in_one_line(capsys, tiny, tmp_path, monkeypatch):
    """What a GPU machine prints, with MLX's availability answer faked on this one."""
    import mlx.core as mx
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    code, err, out = run(capsys, "generate", "x", "-o", tmp_path / "o.png", "--model", tiny, "--width", 64,
                         "--height", 64, "--seed", 1, "--steps", 1, "--quantize", "ternary2", "--dtype", "float32")
    assert code == 0, err
    assert [e for e in err if not e.startswith("image 1/1 [")] == ["warning: ternary2 weights have no metal kernels: they run on the reference matmul (slower). "
                   "Pack as binary or ternary to use the kernels."]
    assert (tmp_path / "o.png").exists()
