"""The demo model inside the package: the binary QAT model of the coloured-shapes task
(docs/quality.md), run offline on the CPU and judged by the task's scorer."""

import json

import pytest

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.loading import DEMO_DIR, resolve_model
from bonsai_mlx.shapes import score
from bonsai_mlx.shapes.scenes import evaluation_specs

# The shipped files stay small enough to live in the package.
SIZE_LIMIT = 20 * 10**6
# Held-out prompt 3 ("an image of a red square", colours), generated with eval-shapes' seed
# for it (3). The scorer, not a stored image, decides whether the picture is right.
HELD_OUT_INDEX = 3


def test_demo_is_in_the_package_and_small():
    assert resolve_model("demo") == DEMO_DIR
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert total < SIZE_LIMIT, f"{total / 1e6:.1f} MB"
    assert json.loads((DEMO_DIR / "bonsai.json").read_text()) == {"width": 128, "height": 128,
                                                                  "max_sequence_length": 32}
    qc = json.loads((DEMO_DIR / "transformer-packed-mflux" / "quantization_config.json").read_text())
    assert qc["format"] == "bonsai" and qc["weight_format"] == "binary"


@pytest.fixture(scope="module")
def demo():
    return BonsaiPipeline.from_pretrained("demo")


def test_demo_draws_a_held_out_prompt_the_scorer_passes(demo):
    spec = evaluation_specs()[HELD_OUT_INDEX]
    assert spec.category == "colors"
    result = demo.generate(spec.prompt, seed=HELD_OUT_INDEX)
    assert result.image.size == (128, 128) and result.steps == 50 and result.guidance == 4.0  # the model's defaults
    found = score.detect(result.image)
    assert score.check(spec, found), f"{spec.prompt}: detected {found}"
    # The same picture is wrong for prompts that name another colour or shape, so the check
    # above says something about the model.
    for other in evaluation_specs():
        if other.category == "colors" and other.prompt != spec.prompt:
            assert not score.check(other, found), other.prompt
