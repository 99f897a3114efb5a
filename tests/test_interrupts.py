"""Generations that go wrong or are stopped: NaN/Inf named by stage and step, interrupted
generate and convert leaving nothing half-written, and pipelines used from threads."""

import threading

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline, cli
from bonsai_mlx.convert import convert_pipeline, is_our_pack
from bonsai_mlx.errors import NonFiniteError, PipelineBusyError
from fixtures import make_pipeline as mp

W = H = 64
PROMPT = "a bonsai tree"


def ours(path):
    return BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mp.make_pipeline(tmp_path_factory.mktemp("intr") / "tiny")[1]


@pytest.fixture(scope="module")
def pipe(tiny):
    return ours(tiny)


@pytest.fixture(scope="module")
def reference(tiny):
    """Uninterrupted images from a pipeline of their own, by seed."""
    p = ours(tiny)
    return {s: p.generate(PROMPT, width=W, height=H, seed=s).array for s in (1, 2, 3)}


# ---- NaN / Inf -----------------------------------------------------------------------------------

def test_nan_in_the_text_embeddings_names_the_stage(pipe, monkeypatch):
    te = pipe.text_encoder
    monkeypatch.setattr(te, "encode", lambda *a, **k: mx.full((1, 512, 192), mx.nan))
    with pytest.raises(NonFiniteError, match="text encoding produced NaN or Inf") as e:
        pipe.generate("a prompt never cached", width=W, height=H, seed=1)
    assert e.value.stage == "text encoding" and e.value.step is None


def test_nan_in_the_latents_stops_at_the_step_it_appears(pipe, monkeypatch):
    model = pipe.transformer
    forward, calls = model.forward, []

    def poisoned(x, *a, **k):
        calls.append(1)
        v = forward(x, *a, **k)
        return v * mx.nan if len(calls) == 2 else v

    monkeypatch.setattr(model, "forward", poisoned)
    seen = []
    with pytest.raises(NonFiniteError, match="denoising step 2 of 4 produced NaN or Inf") as e:
        pipe.generate(PROMPT, width=W, height=H, seed=1, callback=seen.append)
    assert e.value.stage == "denoising" and e.value.step == 2
    assert [s.step for s in seen] == [1] and len(calls) == 2  # stopped there, not after the last step


def test_inf_in_the_decoded_image_names_the_stage(pipe, monkeypatch):
    vae = pipe.vae
    decode = vae.decode_tokens
    monkeypatch.setattr(vae, "decode_tokens", lambda *a, **k: decode(*a, **k) + mx.inf)
    with pytest.raises(NonFiniteError, match="decoding produced NaN or Inf") as e:
        pipe.generate(PROMPT, width=W, height=H, seed=1)
    assert e.value.stage == "decoding"


# ---- interrupted generate -----------------------------------------------------------------------

def test_keyboard_interrupt_from_a_callback_then_a_rerun(pipe, reference):
    def interrupt(event):
        if event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.generate(PROMPT, width=W, height=H, seed=2, callback=interrupt)
    # The pipeline is free again and gives what an uninterrupted pipeline gives.
    np.testing.assert_array_equal(pipe.generate(PROMPT, width=W, height=H, seed=2).array, reference[2])


def test_cli_interrupted_writes_nothing_and_a_rerun_succeeds(tiny, tmp_path, monkeypatch, capsys):
    from PIL import Image

    model = tmp_path / "m"  # the CLI reads text layers (9, 18, 27): pass a pipeline that has them
    mp.make_pipeline(model, text_layers=(9, 18, 27))
    argv = ["generate", PROMPT, "-o", str(tmp_path / "out" / "img.png"), "--model", str(model), "--width", "64",
            "--height", "64", "--seed", "3", "--count", "2"]
    (tmp_path / "out").mkdir()
    update = cli.ProgressBar.update

    def interrupt(self, step, extra=""):
        if self.label.startswith("image 2") and step == 2:
            raise KeyboardInterrupt
        update(self, step, extra)

    monkeypatch.setattr(cli.ProgressBar, "update", interrupt)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 130 and "cancelled" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img-1.png"]  # image 2 never appeared
    monkeypatch.setattr(cli.ProgressBar, "update", update)
    cli.main(argv)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img-1.png", "img-2.png"]
    assert Image.open(tmp_path / "out" / "img-2.png").size == (64, 64)


# ---- interrupted convert ------------------------------------------------------------------------

def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_convert_failing_mid_write_leaves_no_pack_and_reruns(tiny, tmp_path, monkeypatch):
    real_save = mx.save_safetensors

    def half_then_fail(fh, arrays, metadata=None):
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"half\"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", half_then_fail)
    out = tmp_path / "pack"
    with pytest.raises(OSError, match="No space left"):
        convert_pipeline(tiny, out, "binary", dtype=mx.float32)
    assert not out.exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    convert_pipeline(tiny, out, "binary", dtype=mx.float32)
    assert is_our_pack(out) and _leftovers(tmp_path) == []
    ours(out).generate(PROMPT, width=W, height=H, seed=1)


def test_convert_interrupted_while_overwriting_keeps_the_old_pack(tiny, tmp_path, monkeypatch):
    import bonsai_mlx.convert as conv

    out = tmp_path / "pack"
    convert_pipeline(tiny, out, "binary", dtype=mx.float32)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    copy, copied = conv._copy_part, []

    def interrupt(*a):
        copied.append(a)
        if len(copied) == 3:
            raise KeyboardInterrupt
        copy(*a)

    monkeypatch.setattr(conv, "_copy_part", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_pipeline(tiny, out, "ternary", overwrite=True, dtype=mx.float32)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(conv, "_copy_part", copy)
    convert_pipeline(tiny, out, "ternary", overwrite=True, dtype=mx.float32)
    assert '"ternary"' in (out / "transformer-packed-mflux" / "quantization_config.json").read_text()


# ---- threads ----------------------------------------------------------------------------------

def test_one_pipeline_refuses_a_second_generation_while_busy(pipe, reference):
    started, release, result = threading.Event(), threading.Event(), {}

    def hold(event):
        started.set()
        release.wait(60)

    def first():
        result["a"] = pipe.generate(PROMPT, width=W, height=H, seed=1, callback=hold).array

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(60)
    with pytest.raises(PipelineBusyError, match="already running a generation"):
        pipe.generate(PROMPT, width=W, height=H, seed=2)
    with pytest.raises(PipelineBusyError):  # a stream too, at its first step
        next(pipe.stream(PROMPT, width=W, height=H, seed=2))
    release.set()
    t.join(120)
    np.testing.assert_array_equal(result["a"], reference[1])
    np.testing.assert_array_equal(pipe.generate(PROMPT, width=W, height=H, seed=2).array, reference[2])


def test_a_closed_stream_frees_the_pipeline(pipe, reference):
    stream = pipe.stream(PROMPT, width=W, height=H, seed=3)
    next(stream)
    stream.close()
    np.testing.assert_array_equal(pipe.generate(PROMPT, width=W, height=H, seed=3).array, reference[3])


def test_models_do_not_change_under_a_running_generation(pipe, reference):
    """LoRA changes and a transformer release wait for the generation's end: an open stream
    refuses them (before reading anything: the path need not exist) and keeps its image."""
    stream = pipe.stream(PROMPT, width=W, height=H, seed=3)
    next(stream)
    for change in (lambda: pipe.load_lora("no-such-lora.safetensors"), lambda: pipe.set_lora_scale("x", 0.5),
                   lambda: pipe.unload_lora(), pipe.release_transformer):
        with pytest.raises(PipelineBusyError, match="running a generation"):
            change()
    result = [item for item in stream][-1]
    np.testing.assert_array_equal(result.array, reference[3])
    pipe.unload_lora()  # between generations: allowed again
    with pytest.raises(Exception) as missing:
        pipe.load_lora("no-such-lora.safetensors")
    assert not isinstance(missing.value, PipelineBusyError)


def test_a_stream_planned_before_a_model_change_plans_again_at_its_first_step(pipe, reference, monkeypatch):
    """A stream is planned at the call and takes the pipeline at its first step: a LoRA change
    or a release in between changed the models the plan was made for, so it plans again."""
    calls, plan = [], pipe.plan
    monkeypatch.setattr(pipe, "plan", lambda *a, **kw: calls.append(1) or plan(*a, **kw))
    for change, planned in ((lambda: None, 1), (pipe.unload_lora, 2), (pipe.release_transformer, 2)):
        calls.clear()
        stream = pipe.stream(PROMPT, width=W, height=H, seed=2)
        change()
        result = [item for item in stream][-1]
        assert len(calls) == planned
        np.testing.assert_array_equal(result.array, reference[2])


def test_on_a_gpu_model_changes_wait_for_other_pipelines_generations(tiny, pipe, monkeypatch):
    """On a GPU a LoRA change evaluates on the device too: it takes the device's turn, so it
    waits for another pipeline's generation, and a thread holding one open is refused."""
    import bonsai_mlx.pipeline as pl
    monkeypatch.setattr(pl, "serialized_device", lambda: True)
    other = ours(tiny)
    stream = other.stream(PROMPT, width=W, height=H, seed=1)
    next(stream)  # this thread holds the device's turn
    with pytest.raises(PipelineBusyError, match="this thread has another generation open"):
        pipe.unload_lora()
    done = threading.Event()
    waiting = threading.Thread(target=lambda: (pipe.unload_lora(), done.set()))
    waiting.start()
    assert not done.wait(0.5)  # waits its turn
    stream.close()
    waiting.join(60)
    assert done.is_set()


def test_two_pipelines_in_two_threads_match_sequential_runs(tiny, pipe, reference):
    other = ours(tiny)
    out, errors = {}, []

    def go(p, seed):
        try:
            out[seed] = p.generate(PROMPT, width=W, height=H, seed=seed).array
        except BaseException as e:  # reported below
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=go, args=(p, s)) for p, s in ((pipe, 1), (other, 2))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert not errors and not any(t.is_alive() for t in threads)
        for s in (1, 2):
            np.testing.assert_array_equal(out[s], reference[s])


def test_on_a_gpu_pipelines_in_threads_take_turns(tiny, pipe, reference, monkeypatch):
    """MLX's GPU back-ends are not thread-safe: there, generations run one at a time."""
    import bonsai_mlx.pipeline as pl
    monkeypatch.setattr(pl, "serialized_device", lambda: True)
    other = ours(tiny)
    log, lock, out = [], threading.Lock(), {}

    def go(p, seed):
        def note(event):
            with lock:
                log.append((seed, event.step))
        out[seed] = p.generate(PROMPT, width=W, height=H, seed=seed, callback=note).array

    threads = [threading.Thread(target=go, args=(p, s)) for p, s in ((pipe, 1), (other, 2))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    first = log[0][0]
    assert [s for s, _ in log] == [first] * 4 + [3 - first] * 4  # no interleaving
    for s in (1, 2):
        np.testing.assert_array_equal(out[s], reference[s])
    # One thread holding a generation open cannot start another on the GPU (it would wait on itself).
    stream = other.stream(PROMPT, width=W, height=H, seed=1)
    next(stream)
    with pytest.raises(PipelineBusyError, match="this thread has another generation open"):
        pipe.generate(PROMPT, width=W, height=H, seed=1)
    stream.close()
