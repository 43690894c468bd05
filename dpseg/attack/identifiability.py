"""How much of the input the undefended update pins down near the original: the Jacobian.

The attack matches the *direction* of the update U(x) (cosine distance). Near the original
x0 a small change dx moves that direction by P J dx / ||U||, where J = dU/dx and P removes
the component along U (which only rescales it). The singular values of that map say, per
direction of image space, how strongly the update responds: a zero singular value is a
change the update cannot see at all (the first conv of dpseg's U-Net feeds a GroupNorm, so
U(a x) = U(x) and x0 itself is such a direction), a small one a change it barely sees.
Nonzero singular values everywhere else mean that locally the update identifies the image,
and a reconstruction that still misses it was stopped by the optimisation, not by the
update (docs/results/attack). Exact but costly: one forward-mode pass per input voxel.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from dpseg.train.losses import DiceCELoss

from .inversion import trainable_params

__all__ = ["direction_singular_values", "update_jacobian"]


def update_jacobian(
    model: nn.Module, loss: DiceCELoss, x: torch.Tensor, labels: torch.Tensor, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, J): the undefended update (the gradient of the batch's mean loss, flattened over
    ``trainable_params`` in order) at ``x`` (B, 1, *S) with known ``labels`` (B, *S), and
    its Jacobian dU/dx of shape (len(U), x.numel()), computed in ``x``'s dtype by
    forward-mode differentiation, ``chunk`` input directions at a time."""
    names = list(trainable_params(model))
    params = {n: p.detach().to(x.dtype) for n, p in model.named_parameters()}
    frozen = {n: p for n, p in params.items() if n not in names}

    def update(flat: torch.Tensor) -> torch.Tensor:
        def mean_loss(trainable: dict[str, torch.Tensor]) -> torch.Tensor:
            out = functional_call(model, {**frozen, **trainable}, (flat.view_as(x),))
            return loss.per_sample(out, labels).mean()

        g = grad(mean_loss)({n: params[n] for n in names})
        return torch.cat([g[n].flatten() for n in names])

    x0 = x.detach().flatten()
    u = update(x0)
    n = x0.numel()

    def unit_vectors(start: int) -> torch.Tensor:
        # One chunk of the identity at a time: the whole of it is n^2 (8 GiB at 32^3).
        idx = torch.arange(start, min(start + chunk, n))
        return torch.zeros(len(idx), n, dtype=x.dtype).index_put_(
            (torch.arange(len(idx)), idx), torch.ones((), dtype=x.dtype)
        )

    columns = [
        vmap(lambda v: jvp(update, (x0,), (v,))[1])(unit_vectors(s)) for s in range(0, n, chunk)
    ]
    return u, torch.cat(columns).T


def direction_singular_values(u: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of the map dx -> change in the direction U / ||U||:
    (I - uu^T) J / ||U|| with u = U / ||U||, what the cosine distance responds to."""
    norm = u.norm()
    unit = u / norm
    projected = (jac - unit[:, None] * (unit @ jac)) / norm
    return torch.linalg.svdvals(projected)
