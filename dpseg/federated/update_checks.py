"""What the server accepts from the sites, shared by the in-process simulator and the Flower
ServerApp: one broken or hostile site must not be able to wreck the global model.

Without secure aggregation the server sees each site's update and checks it before
aggregating (``screen_updates``):

- its entries are exactly the global model's (names, shapes, dtypes);
- every value is finite (one NaN makes every weight NaN after FedAvg);
- its L2 norm is at most ``--max-update-norm``, when given (one site sending an update a
  thousand times too large would otherwise own the average).

An update that fails is left out of that round, and the round's record names the site and
the reason (``refused``). Under SecAgg+ the server sees only the sum of the updates, so
``check_secure_sum`` holds the dequantised sum of n sites to what n honest sites can
produce: finite, each coordinate within n times the clipping range, the norm within n times
``--max-update-norm``; a sum that fails refuses the whole round, and no site can be named.

Last, the new global model must be finite, or the round is refused and the model and the
strategy's moments stay as they were (``Simulator.server_step``): the global model never
takes a non-finite value.

What these checks cannot refuse: an update that is finite, well formed and within the
bounds but chosen to harm (a sign flip, a backdoor), or, under SecAgg+, a site that
misreports inside its masked vector while keeping the sum in range. Refusing bounded
malicious input needs each site to prove in zero knowledge that its update is valid (as in
Prio or ELSA); that is out of scope here.
"""

from __future__ import annotations

import math

import torch

from dpseg.federated.strategies import SiteUpdate, Weights

__all__ = ["check_secure_sum", "check_update", "nonfinite", "screen_updates"]


def nonfinite(weights: Weights) -> list[str]:
    """Names of the entries holding a NaN or an infinity."""
    return [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]


def _norm(delta: Weights) -> float:
    # float64: a float32 sum of squares overflows to inf for an update of norm ~1e19,
    # which is exactly the kind of update this has to measure.
    return math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))


def check_update(delta: Weights, template: Weights, max_norm: float | None = None) -> str | None:
    """Why the server must refuse ``delta`` against the global ``template``, or None."""
    missing, extra = sorted(set(template) - set(delta)), sorted(set(delta) - set(template))
    if missing or extra:
        return f"entries differ from the model's (missing {missing[:3]}, unknown {extra[:3]})"
    for k, ref in template.items():
        d = delta[k]
        if d.shape != ref.shape or d.dtype != ref.dtype:
            return (
                f"{k} is {d.dtype} {tuple(d.shape)}, the model's is {ref.dtype} {tuple(ref.shape)}"
            )
    bad = nonfinite(delta)
    if bad:
        return f"non-finite values in {bad[:3]}"
    if max_norm is not None:
        norm = _norm(delta)
        if norm > max_norm:
            return f"update norm {norm:.4g} above --max-update-norm {max_norm:g}"
    return None


def screen_updates(
    template: Weights, updates: list[SiteUpdate], max_norm: float | None = None
) -> tuple[list[SiteUpdate], list[dict]]:
    """(the updates to aggregate, [{"site", "reason"} for each refused one])."""
    accepted, refused = [], []
    for u in updates:
        reason = check_update(u.delta, template, max_norm)
        if reason is None:
            accepted.append(u)
        else:
            refused.append({"site": u.site, "reason": reason})
    return accepted, refused


def check_secure_sum(
    total: Weights, n: int, clip_range: float, max_norm: float | None = None
) -> str | None:
    """Why the server must refuse a round whose securely aggregated ``total`` (the
    dequantised sum of ``n`` sites' weighted updates, each weighted by at most 1) is not
    one that n honest sites could send, or None. Each honest site's coordinates lie in
    [-clip_range, clip_range] and its norm is at most ``max_norm``, so the sum's are within
    n times those."""
    bad = nonfinite(total)
    if bad:
        return f"the securely aggregated sum is not finite (in {bad[:3]})"
    peak = max((float(v.abs().max()) for v in total.values() if v.numel()), default=0.0)
    if peak > n * clip_range:
        return (
            f"a coordinate of the sum is {peak:.4g}, beyond {n} sites x --secagg-clip-range "
            f"{clip_range:g}"
        )
    if max_norm is not None:
        norm = _norm(total)
        if norm > n * max_norm:
            return f"the sum's norm {norm:.4g} is beyond {n} sites x --max-update-norm {max_norm:g}"
    return None
