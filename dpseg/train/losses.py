"""Segmentation losses whose value for one sample depends on that sample alone.

DP-SGD clips each sample's gradient, so the loss must be a sum (or mean) of per-sample
terms: the Dice here is computed per sample and class over the spatial dims, never over
the whole batch as a "batch Dice" would (that couples the samples and makes per-sample
clipping bound the wrong thing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """``lambda_dice * (1 - soft Dice) + lambda_ce * cross-entropy``, per sample.

    Inputs: ``logits`` (B, C, *S) and integer ``target`` (B, *S) with labels in [0, C).

    For sample b, with p = softmax(logits_b) (or sigmoid when ``softmax=False``) and
    y = one_hot(target_b), for each class c kept::

        dice_bc = (2 * sum_S p_c y_c + smooth) / (sum_S p_c + sum_S y_c + smooth)

    ``loss_b = lambda_dice * mean_c (1 - dice_bc) + lambda_ce * mean_S CE_b``. The batch
    loss is ``mean_b loss_b`` (reduction "mean"), ``sum_b loss_b`` ("sum"), or the vector
    of ``loss_b`` ("none"). A class absent from both prediction and target has Dice 1
    (the smooth terms), so it adds no loss. An empty batch gives 0 (with a grad_fn).

    ``include_background=False`` drops class 0 from the Dice term (CE always uses every
    class, on the raw logits). ``softmax=False`` takes the Dice probabilities as a sigmoid
    per channel instead of a softmax over channels. With a single output channel and
    ``softmax=False`` the channel is a foreground logit against ``target == 1``, with binary
    CE (and the Dice always counts that channel).
    """

    def __init__(
        self,
        include_background: bool = False,
        softmax: bool = True,
        smooth: float = 1e-5,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError("lambda_dice and lambda_ce must be >= 0")
        self.include_background = include_background
        self.softmax = softmax
        self.smooth = float(smooth)
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.reduction = reduction

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The vector ``loss_b`` of shape (B,)."""
        if logits.dim() < 3:
            raise ValueError(f"logits must be (B, C, *S), got shape {tuple(logits.shape)}")
        b, c = logits.shape[:2]
        if target.shape != (b, *logits.shape[2:]):
            # Accept (B, 1, *S) label maps, the layout some loaders produce.
            if target.dim() == logits.dim() and target.shape[1] == 1:
                target = target[:, 0]
            else:
                raise ValueError(
                    f"target must be (B, *S) = {(b, *logits.shape[2:])} integer labels, "
                    f"got shape {tuple(target.shape)}"
                )
        target = target.long()
        spatial = tuple(range(2, logits.dim()))

        if c == 1 and not self.softmax:
            # Binary: one foreground channel.
            prob = torch.sigmoid(logits)
            onehot = (target == 1).unsqueeze(1).to(logits.dtype)
            ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            ce = ce.flatten(1).mean(1)
            dice_prob, dice_ref = prob, onehot
        else:
            # CE always works on the raw logits; `softmax` only picks the Dice probabilities.
            prob = torch.softmax(logits, dim=1) if self.softmax else torch.sigmoid(logits)
            ce = F.cross_entropy(logits, target, reduction="none")
            ce = ce.flatten(1).mean(1) if ce.dim() > 1 else ce
            onehot = F.one_hot(target, c).movedim(-1, 1).to(logits.dtype)
            first = 0 if self.include_background else 1
            dice_prob, dice_ref = prob[:, first:], onehot[:, first:]

        if dice_prob.shape[1] == 0:
            dice_loss = logits.new_zeros(b)
        else:
            inter = (dice_prob * dice_ref).sum(spatial)
            denom = dice_prob.sum(spatial) + dice_ref.sum(spatial)
            dice = (2.0 * inter + self.smooth) / (denom + self.smooth)
            dice_loss = (1.0 - dice).mean(1)
        return self.lambda_dice * dice_loss + self.lambda_ce * ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.per_sample(logits, target)
        if self.reduction == "none":
            return losses
        if self.reduction == "sum" or losses.numel() == 0:
            # An empty batch: sum over nothing is 0 and keeps the graph (mean would be NaN).
            return losses.sum()
        return losses.mean()
