"""Quantization-aware training of the DiT's block linears (PyTorch).

The forward pass uses exactly the weights `packing.quantize` would pack (docs/formats.md):
per group of 128 along K,
  binary   b = +1 where w >= 0 else -1,          s = mean|w|
  ternary  t = sign(w) where |w| > 0.7 mean|w|, s = mean of |w| over t != 0 (0 if none)
with s rounded once to float16. The backward pass is the straight-through estimator: the
gradient of the quantized weight is applied to the latent full-precision weight as is.

Saving with the parametrization folded in writes s * t, which float16 and float32 hold
exactly (s is a float16 value, t is -1, 0 or +1); packing those weights again gives back
the same t and s, so `--quantize` / `convert` on the saved model is lossless.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import BonsaiError
from ..packing import GROUP_SIZE, TWN_THRESHOLD
from ..weight_names import block_linear_names

QAT_FORMATS = ("binary", "ternary")


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """s * t for W [N, K] (K a multiple of 128), in w's dtype; no gradient."""
    n, k = w.shape
    if k % GROUP_SIZE:
        raise BonsaiError(f"a packed linear needs K a multiple of {GROUP_SIZE}, got {k}")
    g = w.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    mag = g.abs()
    if fmt == "binary":
        t = torch.where(g >= 0, 1.0, -1.0)
        s = mag.mean(dim=-1, keepdim=True)
    elif fmt == "ternary":
        keep = mag > TWN_THRESHOLD * mag.mean(dim=-1, keepdim=True)
        t = torch.where(keep, torch.sign(g), 0.0)
        count = keep.sum(dim=-1, keepdim=True)
        s = torch.where(count > 0, (mag * keep).sum(dim=-1, keepdim=True) / count.clamp(min=1), 0.0)
    else:
        raise BonsaiError(f"QAT format must be one of {QAT_FORMATS}, got {fmt!r}")
    s = s.half().float()  # the pack stores float16 scales
    return (s * t).reshape(n, k).to(w.dtype)


class FakeQuant(nn.Module):
    """weight -> quantized weight in the forward pass, identity in the backward pass."""

    def __init__(self, fmt: str):
        super().__init__()
        if fmt not in QAT_FORMATS:
            raise BonsaiError(f"QAT format must be one of {QAT_FORMATS}, got {fmt!r}")
        self.fmt = fmt

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake_quantize(w, self.fmt) - w).detach()


def block_linears(transformer: nn.Module) -> dict[str, nn.Linear]:
    cfg = transformer.config
    modules = dict(transformer.named_modules())
    return {name: modules[name] for name in block_linear_names(cfg.num_layers, cfg.num_single_layers)}


def attach(transformer: nn.Module, fmt: str) -> None:
    """Quantize the forward pass of every block linear (the 100 of klein 4B)."""
    for lin in block_linears(transformer).values():
        if lin.bias is not None:
            raise BonsaiError("a packed block linear has no bias; this transformer's block linears have one")
        parametrize.register_parametrization(lin, "weight", FakeQuant(fmt))


def fold(transformer: nn.Module) -> None:
    """Replace each parametrized weight by its quantized value, ready to save."""
    for lin in block_linears(transformer).values():
        if parametrize.is_parametrized(lin, "weight"):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
