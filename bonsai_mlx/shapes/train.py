"""Train the shapes demo model (PyTorch; meant for a GPU, runs on a CPU at --size tiny).

    python -m bonsai_mlx.shapes.train vae RUN            # VAE: reconstruction, then latent statistics
    python -m bonsai_mlx.shapes.train dit RUN            # DiT: flow matching on VAE latents
    python -m bonsai_mlx.shapes.train qat-binary RUN     # DiT block linears, binary, from the dit weights
    python -m bonsai_mlx.shapes.train qat-ternary RUN
    python -m bonsai_mlx.shapes.train export RUN --weights fp|binary|ternary --out DIR

Every stage checkpoints every --checkpoint-every steps and when --max-minutes runs out
(then it exits with status 3); `--resume` continues from the newest checkpoint. The first stage writes RUN/run.json (size,
seed) and the frozen text side: the tokenizer (tokenizer.py) and a Qwen3 initialised from
the seed. The text encoder stays frozen: the prompts are a few hundred templated strings
over 27 words, a fixed random Qwen3 already gives every token and position a distinct,
deterministic feature that the DiT's text projection and joint attention learn to read
(klein too trains its DiT against a frozen Qwen3), the embeddings can be computed once per
prompt, and the FP / binary / ternary models share one encoder, so their scores compare
DiTs only.

Flow matching as the klein sampler runs it: x_sigma = (1 - sigma) x0 + sigma noise, the
DiT predicts the velocity noise - x0 at timestep sigma; sigma is a logit-normal draw pushed
through the sampler's exponential shift with mu for the task's 64 image tokens at 50 steps
(the default steps of a base model), so training is densest where sampling spends its
steps. Prompts are dropped to "" with probability --prompt-dropout for guidance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from ..errors import BonsaiError
from ..scheduler import compute_empirical_mu
from . import qat
from .batches import StepBatch, batch
from .configs import MAX_SEQUENCE_LENGTH, size as model_size
from .models import (PromptEmbeddings, build_transformer, build_vae, export_pipeline, images_to_tensor,
                     latent_tokens, load_part, save_part, patchify, position_ids, prepare_text_side)
from .scenes import IMAGE_SIZE
from .trainer import CHECKPOINT_DTYPES, LoopConfig, train

STAGES = ("vae", "dit", "qat-binary", "qat-ternary")
KL_WEIGHT = 1e-6
BN_STAT_BATCHES = 32
DEFAULT_STEPS = 50  # a base model's sampling steps: the shift that training matches


class Feed:
    """Step k's batch from `make(k)`, built ahead in worker processes, in step order."""

    def __init__(self, make, total: int, workers: int):
        self.make, self.total, self.workers, self.it = make, total, workers, None

    def __call__(self, step: int):
        if self.it is None:
            loader = torch.utils.data.DataLoader(_Steps(self.make), batch_size=None,
                                                 sampler=range(step, self.total), num_workers=self.workers,
                                                 prefetch_factor=4 if self.workers else None)
            self.it = iter(loader)
        k, data = next(self.it)
        if k != step:
            raise BonsaiError(f"data for step {k} arrived at step {step}")
        return data


class _Steps(torch.utils.data.Dataset):
    def __init__(self, make):
        self.make = make

    def __getitem__(self, k):
        return k, self.make(k)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def _run_meta(run: Path, size: str, seed: int, max_length: int) -> dict:
    path = run / "run.json"
    meta = {"size": size, "seed": seed, "max_length": max_length}
    if path.exists():
        saved = json.loads(path.read_text())
        saved.setdefault("max_length", 512)  # a run.json without it padded prompts to 512, as klein does
        if saved != meta:
            raise BonsaiError(f"{run} was started with {saved}; pass the same --size, --seed and --max-length, "
                              "or a new folder")
    else:
        run.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta))
    return meta


def vae_stage(run: Path, a, loop: LoopConfig, log) -> bool:
    cfg = model_size(a.size)
    vae = build_vae(cfg["vae"], a.seed).to(a.device).train()
    feed = Feed(StepBatch(a.seed, "vae", a.batch), loop.steps, a.workers)

    def loss_at(step):
        images, _, tseed = feed(step)
        x = images_to_tensor(images.numpy(), a.device)
        with _autocast(a.device):
            post = vae.encode(x).latent_dist
            eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(tseed)).to(a.device)
            rec = vae.decode(post.mean + post.std * eps).sample.float()
        return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + KL_WEIGHT * post.kl().mean()

    done = train(vae, loss_at, run / "checkpoints" / "vae", loop, {"stage": "vae", "seed": a.seed}, a.resume, log,
                 a.reschedule)
    if done:
        set_latent_statistics(vae.eval(), a.seed, a.batch, a.device)
        save_part(vae, run / "vae")
        log(f"wrote {run / 'vae'}")
    return done


@torch.no_grad()
def set_latent_statistics(vae, seed: int, batch_size: int, device: str) -> None:
    """The pipeline normalises patchified latents by vae.bn's running mean and variance;
    they are set to the statistics of the training images' posterior modes."""
    zs = []
    for k in range(BN_STAT_BATCHES):
        images, _, _ = batch(seed, "vae-stats", k, batch_size)
        z = patchify(vae.encode(images_to_tensor(images, device)).latent_dist.mode())
        zs.append(z.permute(1, 0, 2, 3).reshape(z.shape[1], -1))
    z = torch.cat(zs, dim=1)
    vae.bn.running_mean.copy_(z.mean(dim=1))
    vae.bn.running_var.copy_(z.var(dim=1))


def sigmas(u_normal: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """Logit-normal draws shifted as the sampler shifts its schedule (scheduler.time_shift)."""
    e = math.exp(compute_empirical_mu(image_tokens, DEFAULT_STEPS))
    u = torch.sigmoid(u_normal)
    return e / (e + (1.0 / u - 1.0))


def dit_stage(run: Path, a, loop: LoopConfig, log, fmt: str | None) -> bool:
    cfg = model_size(a.size)
    stage = "dit" if fmt is None else f"qat-{fmt}"
    vae = load_part(run, "vae", a.device)
    embed = PromptEmbeddings(load_part(run, "text_encoder", a.device), load_part(run, "tokenizer", a.device),
                             a.device, a.max_length)
    if fmt is None:
        model = build_transformer(cfg["transformer"], a.seed).to(a.device)
    else:
        model = load_part(run, "transformer", a.device)
        qat.attach(model, fmt)
    model.train()
    grid = IMAGE_SIZE // 16
    feed = Feed(StepBatch(a.seed, stage, a.batch, a.prompt_dropout), loop.steps, a.workers)

    def loss_at(step):
        images, prompts, tseed = feed(step)
        x0 = latent_tokens(vae, images_to_tensor(images.numpy(), a.device))
        text = embed(list(prompts))
        g = torch.Generator().manual_seed(tseed)
        noise = torch.randn(x0.shape, generator=g).to(a.device)
        sigma = sigmas(torch.randn(x0.shape[0], generator=g), grid * grid).to(a.device)
        s = sigma.view(-1, 1, 1)
        img_ids, txt_ids = position_ids(x0.shape[0], grid, text.shape[1], a.device)
        with _autocast(a.device):
            v = model(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=text, timestep=sigma,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        return ((v.float() - (noise - x0)) ** 2).mean()

    done = train(model, loss_at, run / "checkpoints" / stage, loop, {"stage": stage, "seed": a.seed}, a.resume, log,
                 a.reschedule)
    if done:
        out = run / ("transformer" if fmt is None else f"transformer-{fmt}")
        if fmt is not None:
            qat.fold(model)
        save_part(model, out)
        log(f"wrote {out}")
    return done


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bonsai_mlx.shapes.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "export"])
    ap.add_argument("run", type=Path, help="run folder (created by the first stage)")
    ap.add_argument("--size", default="full", choices=["full", "tiny"], help="model size (configs.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="optimizer steps of the stage (default: configs.py)")
    ap.add_argument("--batch", type=int, help="images per step (default: configs.py)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: configs.py)")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--checkpoint-dtype", default="bfloat16", choices=sorted(CHECKPOINT_DTYPES),
                    help="bfloat16: small files; float32: resuming reproduces an uninterrupted run exactly")
    ap.add_argument("--max-minutes", type=float, default=float("inf"), help="stop (with a checkpoint) after this")
    ap.add_argument("--resume", action="store_true", help="continue from the stage's newest checkpoint")
    ap.add_argument("--reschedule", action="store_true",
                    help="with --resume: accept a checkpoint made for another --steps (the learning rate "
                         "follows the new schedule from there)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=8, help="data loader processes (0: build batches inline)")
    ap.add_argument("--prompt-dropout", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=MAX_SEQUENCE_LENGTH,
                    help="prompt padding length; the export's bonsai.json tells the pipeline to pad to it")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--weights", default="fp", choices=["fp", "binary", "ternary"], help="export: which DiT")
    ap.add_argument("--out", type=Path, help="export: the pipeline folder to write")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                    help="export: weight precision (float16 holds the QAT weights exactly)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    log = lambda line: print(line, flush=True)
    if a.stage == "export":
        if a.out is None:
            raise BonsaiError("export needs --out DIR")
        part = "transformer" if a.weights == "fp" else f"transformer-{a.weights}"
        out = export_pipeline(a.run, a.out, part, getattr(torch, a.dtype))
        log(f"wrote {out}" + ("" if a.weights == "fp" else
                              f"; pack it with: python -m bonsai_mlx convert {out} PACK --format {a.weights}"))
        return 0
    cfg = model_size(a.size)
    _run_meta(a.run, a.size, a.seed, a.max_length)
    prepare_text_side(a.run, cfg["text_encoder"], a.seed)
    defaults = cfg["train"]["vae" if a.stage == "vae" else "dit" if a.stage == "dit" else "qat"]
    a.batch = a.batch or defaults["batch"]
    loop = LoopConfig(steps=a.steps or defaults["steps"], lr=a.lr or defaults["lr"], warmup=a.warmup,
                      checkpoint_every=a.checkpoint_every, max_minutes=a.max_minutes,
                      checkpoint_dtype=a.checkpoint_dtype, log_every=a.log_every)
    torch.backends.cuda.matmul.allow_tf32 = True
    if a.stage == "vae":
        done = vae_stage(a.run, a, loop, log)
    else:
        done = dit_stage(a.run, a, loop, log, None if a.stage == "dit" else a.stage.split("-")[1])
    return 0 if done else 3


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BonsaiError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
