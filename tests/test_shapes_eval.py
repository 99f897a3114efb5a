"""eval-shapes: the evaluation loop on stand-in pipelines, and the CLI on a tiny random model."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.results import GenerationResult
from bonsai_mlx.shapes import evaluate, render, scenes
from fixtures import make_pipeline as mp

SPECS = scenes.evaluation_specs(12)  # every category (single_object has one held-out prompt)


class Painter:
    """A stand-in pipeline: draws the ground truth of the prompt, or a blank image."""

    def __init__(self, blank=False):
        self.blank = blank
        self.by_prompt = {s.prompt: s for s in scenes.evaluation_specs()}
        self.calls = []

    def generate(self, prompt, width, height, steps, seed, guidance):
        self.calls.append((prompt, seed, width))
        img = np.full((height, width, 3), 255, np.uint8) if self.blank else \
            render.example(self.by_prompt[prompt], seed, size=width)[0]
        return GenerationResult(Image.fromarray(img), prompt, None, seed, steps or 4, guidance or 1.0, width, height,
                                "painter")


def test_ground_truth_pipeline_scores_one_and_blank_scores_zero(tmp_path):
    painter = Painter()
    report = evaluate.evaluate(painter, SPECS, tmp_path / "gt", seed=5)
    assert report["overall"] == 1.0 and report["images"] == 12
    assert {c: v["images"] for c, v in report["categories"].items()} == dict(Counter(s.category for s in SPECS))
    assert set(report["categories"]) == set(scenes.CATEGORIES)
    assert [c[1] for c in painter.calls] == list(range(5, 17))  # seed + i
    item = report["items"][3]
    assert item["prompt"] == SPECS[3].prompt and item["seed"] == 8 and item["correct"] is True
    assert item["detections"] and {"shape", "color", "box", "area"} <= set(item["detections"][0])
    on_disk = json.loads((tmp_path / "gt" / "report.json").read_text())
    assert on_disk["overall"] == 1.0 and len(on_disk["items"]) == 12
    grid = Image.open(tmp_path / "gt" / "grid.png")
    assert grid.size == (8 * (128 + 2 * evaluate.FRAME), 2 * (128 + 2 * evaluate.FRAME))
    assert np.asarray(grid)[0, 0].tolist() == list(evaluate._GOOD)
    assert Image.open(tmp_path / "gt" / "images" / "011.png").size == (128, 128)

    blank = evaluate.evaluate(Painter(blank=True), SPECS, tmp_path / "blank")
    assert blank["overall"] == 0.0 and all(not it["correct"] for it in blank["items"])
    assert np.asarray(Image.open(tmp_path / "blank" / "grid.png"))[0, 0].tolist() == list(evaluate._BAD)


def test_out_must_be_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BonsaiError, match="is a file"):
        evaluate.evaluate(Painter(), SPECS[:1], f)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "bonsai_mlx", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def test_eval_shapes_cli_on_a_tiny_random_pipeline(tmp_path):
    model = mp.make_pipeline(tmp_path / "tiny", text_layers=(9, 18, 27))[1]
    out = tmp_path / "eval"
    r = cli("eval-shapes", "--model", model, "--count", 3, "--seed", 11, "--out", out, "--size", 64, "--steps", 2,
            "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "overall" in r.stdout and "[3/3]" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == 3 and report["images"] == 3 and report["size"] == 64
    assert set(report["categories"]) == {"single_object", "two_object", "counting"}
    assert 0.0 <= report["overall"] <= 1.0  # random weights: whatever they draw is scored, nothing crashes
    assert [it["seed"] for it in report["items"]] == [11, 12, 13]
    assert [it["prompt"] for it in report["items"]] == [s.prompt for s in scenes.evaluation_specs(3)]
    assert all(it["steps"] == 2 for it in report["items"])
    assert Image.open(out / "grid.png").size == (3 * (64 + 2 * evaluate.FRAME), 64 + 2 * evaluate.FRAME)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000.png", "001.png", "002.png"]

    r = cli("eval-shapes", "--model", tmp_path / "nowhere", "--out", tmp_path / "e2")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = cli("eval-shapes", "--model", model, "--out", tmp_path / "e3", "--count", 0)
    assert r.returncode == 2 and "count must be a positive number of prompts" in r.stderr and "Traceback" not in r.stderr
