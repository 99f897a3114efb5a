"""The demo model inside the package: the binary QAT model of the coloured-shapes task
(docs/quality.md), run offline on the CPU and judged by the task's scorer."""

import json

import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline, export_bundle, load_bundle
from bonsai_mlx.layouts import DEMO_TERNARY_TRANSFORMER
from bonsai_mlx.loading import DEMO_DIR, resolve_model
from bonsai_mlx.packed_linear import PackedLinear
from bonsai_mlx.shapes import score
from bonsai_mlx.shapes.scenes import evaluation_specs

# The shipped files stay small enough to live in the package.
SIZE_LIMIT = 20 * 10**6
# Held-out prompt 3 ("an image of a red square", colours), generated with eval-shapes' seed
# for it (3). The scorer, not a stored image, decides whether the picture is right.
HELD_OUT_INDEX = 3
# The frugal plan evaluates in other orders and chunks (bfloat16): pixels may move by a few levels.
FRUGAL_BOUND = 8 / 255
# Steps of the checks beyond the first (the model's own 50 with CFG take over a minute a picture
# on the CI's CPU): the held-out prompt is drawn right from 12, while most other prompts of the
# evaluation are not (7 of 12 fail the scorer at 12 steps), so the scorer still decides.
FEW_STEPS = 12


def test_demo_is_in_the_package_and_small():
    assert resolve_model("demo") == DEMO_DIR == resolve_model("demo-ternary")
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert total < SIZE_LIMIT, f"{total / 1e6:.1f} MB"
    assert json.loads((DEMO_DIR / "bonsai.json").read_text()) == {"width": 128, "height": 128,
                                                                  "max_sequence_length": 32}
    for folder, fmt in (("transformer-packed-mflux", "binary"), (DEMO_TERNARY_TRANSFORMER, "ternary")):
        qc = json.loads((DEMO_DIR / folder / "quantization_config.json").read_text())
        assert qc["format"] == "bonsai" and qc["weight_format"] == fmt


@pytest.fixture(scope="module")
def demo():
    return BonsaiPipeline.from_pretrained("demo")


@pytest.fixture(scope="module")
def drawn(demo):
    spec = evaluation_specs()[HELD_OUT_INDEX]
    return spec, demo.generate(spec.prompt, seed=HELD_OUT_INDEX)


@pytest.fixture(scope="module")
def drawn_fast(demo):
    """The held-out prompt in FEW_STEPS steps, the default plan."""
    spec = evaluation_specs()[HELD_OUT_INDEX]
    result = demo.generate(spec.prompt, seed=HELD_OUT_INDEX, steps=FEW_STEPS)
    assert score.check(spec, score.detect(result.image))
    return spec, result


def test_demo_draws_a_held_out_prompt_the_scorer_passes(drawn):
    spec, result = drawn
    assert spec.category == "colors"
    assert result.image.size == (128, 128) and result.steps == 50 and result.guidance == 4.0  # the model's defaults
    found = score.detect(result.image)
    assert score.check(spec, found), f"{spec.prompt}: detected {found}"
    # The same picture is wrong for prompts that name another colour or shape, so the check
    # above says something about the model.
    for other in evaluation_specs():
        if other.category == "colors" and other.prompt != spec.prompt:
            assert not score.check(other, found), other.prompt


def test_demo_under_its_most_frugal_plan_draws_the_same_picture(demo, drawn_fast):
    """A trained model through the most frugal plan (text encoder streamed, transformer
    released for decoding, token chunks, strips or tiles as the plan says): the picture is
    the one the default plan draws in as many steps, and it is still right."""
    spec, ref = drawn_fast
    plan = demo.smallest_plan(128, 128, cfg=True)
    assert plan.estimated_peak_bytes < demo.plan(128, 128, cfg=True).estimated_peak_bytes
    result = demo.generate(spec.prompt, seed=HELD_OUT_INDEX, plan=plan, steps=FEW_STEPS)
    diff = np.abs(result.array - ref.array).max()
    assert diff <= FRUGAL_BOUND, f"max abs difference {diff * 255:.1f}/255"
    assert score.check(spec, score.detect(result.image))


def test_demo_bundle_for_apps_draws_the_prompt(drawn_fast, tmp_path):
    """The demo exported as an app bundle (4-bit text encoder, as the bundle ships it) and
    loaded back keeps its size and prompt length, and still draws the held-out prompt."""
    spec, _ = drawn_fast
    out = export_bundle("demo", tmp_path / "bundle", "binary")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"]["default_size"] == [128, 128]
    assert manifest["components"]["text_encoder"]["max_sequence_length"] == 32
    pipe = load_bundle(out)
    assert pipe.default_size == (128, 128) and pipe.max_sequence_length == 32
    result = pipe.generate(spec.prompt, seed=HELD_OUT_INDEX, steps=FEW_STEPS)
    assert result.image.size == (128, 128)
    assert score.check(spec, score.detect(result.image))


def test_ternary_demo_shares_the_parts_and_draws_the_prompt(drawn_fast, tmp_path):
    """demo-ternary: the ternary QAT transformer beside the binary one, with the same text
    encoder, VAE and defaults; it draws the held-out prompt too, and exports as ternary."""
    spec, binary = drawn_fast
    pipe = BonsaiPipeline.from_pretrained("demo-ternary")
    fmts = {m.packed.fmt for _, m in pipe.transformer.named_modules() if isinstance(m, PackedLinear)}
    assert fmts == {"ternary"} and pipe.default_size == (128, 128) and pipe.max_sequence_length == 32
    result = pipe.generate(spec.prompt, seed=HELD_OUT_INDEX, steps=FEW_STEPS)
    assert score.check(spec, score.detect(result.image))
    assert np.abs(result.array - binary.array).max() > 0.05  # another transformer, another picture
    out = export_bundle("demo-ternary", tmp_path / "bundle", "ternary")
    qc = json.loads((out / "transformer" / "quantization_config.json").read_text())
    assert qc["weight_format"] == "ternary"


def test_a_missing_local_model_says_to_reinstall(monkeypatch, tmp_path):
    from bonsai_mlx import loading
    from bonsai_mlx.errors import WeightsError

    monkeypatch.setitem(loading.LOCAL_MODELS, "demo-ternary", (DEMO_DIR, tmp_path / "gone"))
    with pytest.raises(WeightsError, match="reinstall"):
        resolve_model("demo-ternary")
    assert loading.transformer_source("demo", DEMO_DIR) == DEMO_DIR
    assert loading.transformer_source(str(DEMO_DIR), DEMO_DIR) == DEMO_DIR  # a path is its own root
