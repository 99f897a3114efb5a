"""The training loop every stage shares: AdamW, warm-up then cosine learning rate, gradient
clipping, checkpoints every N steps and at the time limit, and resuming.

A checkpoint is step-NNNNNNN.safetensors (the module's state and AdamW's moments, in the
checkpoint dtype: bfloat16 by default, float32 for exact resumption) beside
step-NNNNNNN.json (step, AdamW's step counts, the loop settings). Step k's batch, noise
and noise levels come from (seed, stage, k) alone, so a resumed run draws what an
uninterrupted one would; the learning rate is a function of k. With float32 checkpoints a
resumed run computes the same numbers as an uninterrupted one on the same device; with
bfloat16 the weights and moments restart rounded to bfloat16.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import BonsaiError

CHECKPOINT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 500
    checkpoint_every: int = 1000
    keep: int = 3  # checkpoints kept on disk, newest first
    max_minutes: float = float("inf")
    checkpoint_dtype: str = "bfloat16"
    grad_clip: float = 1.0
    log_every: int = 50

    def __post_init__(self):
        if self.steps < 1 or self.checkpoint_every < 1 or self.keep < 1:
            raise BonsaiError("steps, checkpoint_every and keep must be positive")
        if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise BonsaiError(f"checkpoint dtype must be one of {sorted(CHECKPOINT_DTYPES)}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup` steps, then cosine down to a tenth by the last step."""
        warm = min(self.warmup, max(self.steps // 10, 1))
        if step < warm:
            return self.lr * (step + 1) / warm
        frac = (step - warm) / max(self.steps - warm, 1)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def checkpoints(folder: Path) -> list[Path]:
    """The folder's checkpoints, oldest first."""
    return sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []


def save_checkpoint(folder: Path, step: int, module: torch.nn.Module, opt: torch.optim.Optimizer,
                    cfg: LoopConfig, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dt = CHECKPOINT_DTYPES[cfg.checkpoint_dtype]
    tensors = {f"module.{k}": v.detach().to("cpu", dt).contiguous() for k, v in module.state_dict().items()
               if v.is_floating_point()}
    tensors.update({f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()
                    if not v.is_floating_point()})
    counts = {}
    for i, st in opt.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            tensors[f"adam.{i}.{name}"] = st[name].detach().to("cpu", dt).contiguous()
        counts[str(i)] = float(st["step"])
    stem = folder / f"step-{step:07d}"
    tmp = stem.with_suffix(".partial")
    save_file(tensors, str(tmp))
    stem.with_suffix(".json").write_text(json.dumps({"step": step, "adam_steps": counts, "loop": asdict(cfg),
                                                     **meta}, indent=2))
    tmp.replace(stem.with_suffix(".safetensors"))  # last: a checkpoint exists only when complete
    for old in checkpoints(folder)[:-cfg.keep]:
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)
    return stem.with_suffix(".safetensors")


def strip_moments(path: Path) -> None:
    """Drop AdamW's moments from a checkpoint in place (a third of its size): a run resumed
    from it restarts AdamW, with a ramp of the learning rate (RESTART_RAMP steps)."""
    tensors = {k: v for k, v in load_file(str(path)).items() if k.startswith("module.")}
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["adam_steps"] = {}
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


RESTART_RAMP = 100  # steps over which the learning rate ramps up after AdamW restarts


def load_checkpoint(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore module and optimizer in place; returns the checkpoint's JSON."""
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path))
    state = module.state_dict()
    module.load_state_dict({k: tensors[f"module.{k}"].to(v.dtype) for k, v in state.items()})
    if not meta["adam_steps"]:
        return meta  # weights only (strip_moments): AdamW starts afresh
    params = [p for g in opt.param_groups for p in g["params"]]
    opt_state = {}
    for i, n in meta["adam_steps"].items():
        p = params[int(i)]
        opt_state[int(i)] = {"step": torch.tensor(n), "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device, p.dtype),
                             "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device, p.dtype)}
    sd = opt.state_dict()
    sd["state"] = opt_state
    opt.load_state_dict(sd)
    return meta


def train(module: torch.nn.Module, loss_at: Callable[[int], torch.Tensor], folder: Path, cfg: LoopConfig,
          meta: dict, resume: bool, log: Callable[[str], None] = print, reschedule: bool = False) -> bool:
    """Optimise module's trainable parameters on loss_at(step) for steps [start, cfg.steps),
    start = 0 or the newest checkpoint's step. Returns True when every step is done,
    False when the time limit stopped it first (a checkpoint is written either way).
    `reschedule` lets a resumed run end at a different step count than the checkpoint was
    made for: the learning rate follows the new schedule from the resumed step on."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, restart = 0, None
    found = checkpoints(folder)
    if found and not resume:
        raise BonsaiError(f"{folder} already has checkpoints; pass --resume to continue, or use a new run folder")
    if resume and found:
        saved = load_checkpoint(found[-1], module, opt)
        if saved["loop"]["steps"] != cfg.steps and not reschedule:
            raise BonsaiError(f"the checkpoint was made for {saved['loop']['steps']} steps, not {cfg.steps}: the "
                              "learning-rate schedule depends on it; pass the same --steps, or --reschedule")
        if saved["step"] > cfg.steps:
            raise BonsaiError(f"the checkpoint is at step {saved['step']}, past the {cfg.steps} steps asked for")
        start = saved["step"]
        restart = None if saved["adam_steps"] else start
        log(f"resumed from {found[-1].name} at step {start}" + (" (weights only: AdamW restarts)" if restart is not None else "") + (
            f" (made for {saved['loop']['steps']} steps, now {cfg.steps})" if saved["loop"]["steps"] != cfg.steps else ""))
    t0, last = time.perf_counter(), start
    step = start
    while step < cfg.steps:
        ramp = 1.0 if restart is None else min(1.0, (step - restart + 1) / RESTART_RAMP)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step) * ramp
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        out_of_time = time.perf_counter() - t0 >= 60 * cfg.max_minutes
        if step % cfg.log_every == 0 or step == cfg.steps or out_of_time:
            rate = (step - last) / max(time.perf_counter() - t0, 1e-9)
            log(f"step {step}/{cfg.steps} loss {loss.item():.5f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({rate:.2f} steps/s)")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
            save_checkpoint(folder, step, module, opt, cfg, meta)
        if out_of_time and step < cfg.steps:
            log(f"time limit reached at step {step}/{cfg.steps}; run again with --resume")
            return False
    return True
