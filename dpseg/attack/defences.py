"""What a site shares for one batch, undefended or through dpseg's DP-SGD, and the random
baseline an attack must beat.

A defence is written ``none`` (the plain mean-loss gradient), ``clip`` or ``clip:C``
(per-sample clipping to C, default 1, no noise) or ``dp:SIGMA`` / ``dp:SIGMA:C`` (clipping
plus Gaussian noise of std SIGMA * C). Defended updates are produced by the engine itself
(``PrivacyEngine.make_private`` + ``DPOptimizer.pre_step``/``step``) on a copy of the model,
so the attack sees exactly what a dpseg site would send:

    (sum_b clip_C(g_b) + N(0, sigma^2 C^2)) / B.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpseg.privacy.engine import PrivacyEngine
from dpseg.train.losses import DiceCELoss

from .inversion import trainable_params

__all__ = ["Defence", "parse_defence", "parse_defences", "random_update", "shared_update"]

_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_SPEC = re.compile(rf"^(none|clip(?::({_NUMBER}))?|dp:({_NUMBER})(?::({_NUMBER}))?)$")


@dataclass(frozen=True)
class Defence:
    """``max_grad_norm`` None means no clipping (and then no noise)."""

    name: str
    noise_multiplier: float = 0.0
    max_grad_norm: float | None = None

    @property
    def clips(self) -> bool:
        return self.max_grad_norm is not None


def parse_defence(spec: str) -> Defence:
    """``none`` | ``clip[:C]`` | ``dp:SIGMA[:C]`` (C defaults to 1); ValueError otherwise."""
    text = spec.strip()
    m = _SPEC.match(text)
    if m is None:
        raise ValueError(
            f"bad defence {spec!r}: use none, clip, clip:C, dp:SIGMA or dp:SIGMA:C with numbers "
            "for SIGMA >= 0 and C > 0 (e.g. dp:1.0 is noise multiplier 1 at C = 1)"
        )
    if text == "none":
        return Defence("none")
    if text.startswith("clip"):
        c = float(m.group(2)) if m.group(2) else 1.0
        sigma = 0.0
    else:
        sigma, c = float(m.group(3)), float(m.group(4)) if m.group(4) else 1.0
    if not (c > 0 and math.isfinite(c) and math.isfinite(sigma)):
        raise ValueError(f"bad defence {spec!r}: the clipping bound C must be > 0")
    return Defence(text, noise_multiplier=sigma, max_grad_norm=c)


def parse_defences(text: str | Sequence[str]) -> list[Defence]:
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [parse_defence(t) for t in items if t.strip()]
    if not out:
        raise ValueError("no defence given; e.g. none,clip,dp:1.0")
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a defence is listed twice: {names}")
    return out


def _plain_update(
    model: nn.Module,
    loss: DiceCELoss,
    x: torch.Tensor,
    y: torch.Tensor,
    local_steps: int,
    local_lr: float,
) -> list[torch.Tensor]:
    params = list(trainable_params(model).values())
    if local_steps == 0:
        return [g.detach() for g in torch.autograd.grad(loss(model(x), y), params)]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=local_lr)
    for _ in range(local_steps):
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        opt.step()
    return [s - p.detach() for s, p in zip(start, params, strict=True)]


def shared_update(
    model: nn.Module,
    loss: DiceCELoss,
    x: torch.Tensor,
    y: torch.Tensor,
    defence: Defence,
    *,
    local_steps: int = 0,
    local_lr: float = 0.01,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The update the site sends for batch (x, y), one tensor per trainable parameter.

    local_steps=0: the (defended) gradient of the mean loss. local_steps=k: theta_0 - theta_k
    after k full-batch SGD steps at ``local_lr`` (DP-SGD steps under a clipping defence, each
    with fresh noise). ``model`` itself is never changed; ``seed`` keys the DP noise.
    """
    if loss.reduction != "mean":
        raise ValueError(
            "shared_update models the engine's loss_reduction='mean'; pass a mean loss"
        )
    site = copy.deepcopy(model)
    site.train()
    if not defence.clips:
        return _plain_update(site, loss, x, y, local_steps, local_lr)
    params = list(trainable_params(site).values())
    start = [p.detach().clone() for p in params]
    # The loader only tells the engine the batch size (sample rate 1, expected batch B); the
    # batch itself is fed directly, without Poisson resampling, so the attack targets a
    # known batch.
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    opt = torch.optim.SGD(params, lr=local_lr)
    private, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=site,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=defence.noise_multiplier,
        max_grad_norm=defence.max_grad_norm,
        poisson_sampling=False,
        loss_reduction="mean",
        noise_seed=seed,
    )
    try:
        for _ in range(max(local_steps, 1)):
            dp_opt.zero_grad(set_to_none=True)
            loss(private(x), y).backward()
            if local_steps == 0:
                dp_opt.pre_step()  # clipped + noised gradient in p.grad, no update
                return [p.grad.detach().clone() for p in params]
            dp_opt.step()
        return [s - p.detach() for s, p in zip(start, params, strict=True)]
    finally:
        private.release()


def random_update(
    reference: Sequence[torch.Tensor], seed: int = 0, per_layer: bool = False
) -> list[torch.Tensor]:
    """Gaussian tensors shaped like ``reference``, rescaled to its total norm (isotropic,
    like DP's noise; or to its norm per layer): what the attack is fed for the baseline. An
    attack on a defended update that scores no better than on this one has learned nothing
    from the update."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(r.shape, generator=gen, dtype=r.dtype) for r in reference]
    if per_layer:
        return [z * (r.norm() / (z.norm() + 1e-12)) for z, r in zip(out, reference, strict=True)]
    total = math.sqrt(sum(float(r.norm()) ** 2 for r in reference))
    now = math.sqrt(sum(float(z.norm()) ** 2 for z in out))
    return [z * (total / (now + 1e-12)) for z in out]
