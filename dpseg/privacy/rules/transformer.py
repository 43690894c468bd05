"""The 3-D transformers' parts in closed form: no torch.func replay.

Two kinds of parameter in MONAI's SwinUNETR and UNETR have no layer of their own: Swin's
relative position bias table, gathered by index and added to every window's attention
logits, and UNETR's position embedding, added by broadcast to every sample's tokens. Their
modules (WindowAttention, PatchEmbeddingBlock) own them beside child layers, which made
each module a torch.func unit: a second forward and backward of the module per step
(SwinUNETR's DP step at 2.0-2.3x the non-private one). Here each such module gets a forward
override: the module's own forward, re-spelt so that its child layers (the qkv and
projection Linears, the patch-embedding conv) run through their ordinary closed-form rules
and each own parameter enters through a small autograd Function whose backward writes that
parameter's per-sample gradient:

- relative position bias: g_table[u] = scatter_add over the index of the attention-logit
  gradients summed over unit u's windows (and heads kept apart): one reduction of a tensor
  the backward has anyway, and a gather of size (units, table);
- position embedding: g_pos[u] = the gradient at the embedding's output summed over unit
  u's rows (a broadcast add's per-sample gradient is the output gradient itself).

Swin's window attention sees B x windows rows, each sample's windows consecutive (MONAI's
window_partition keeps the batch outermost); the override declares that layout to the
capture (ForwardPasses.batch_major), so the qkv and projection Linears sum each sample's
windows' gradients as the unit map says, the same map that groups a patient's rows. The
override is exact only for the forward it re-spells: the test suite holds SwinUNETR and
UNETR end to end against the float64 oracle (tests/test_monai_networks.py), which fails
if MONAI changes these forwards.
"""

from __future__ import annotations

import torch

from dpseg.privacy.grad_sample import accumulate_per_sample


class _AddRelativeBias(torch.autograd.Function):
    """attn (R, heads, n, n) + table[index].reshape(n, n, heads).permute(2, 0, 1)."""

    @staticmethod
    def forward(ctx, attn, table, index, n, name, pass_info):
        bias = table[index].reshape(n, n, -1).permute(2, 0, 1)
        ctx.table, ctx.n, ctx.name, ctx.pass_info = table, n, name, pass_info
        ctx.save_for_backward(index)
        return attn + bias.unsqueeze(0).to(attn.dtype)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        _, _, call_units = ctx.pass_info
        table, n = ctx.table, ctx.n
        per_unit = call_units.reduce(grad) if call_units is not None else grad
        heads = per_unit.shape[1]
        flat = per_unit.permute(0, 2, 3, 1).reshape(per_unit.shape[0], n * n, heads)
        g = flat.new_zeros((per_unit.shape[0], table.shape[0], heads))
        g.index_add_(1, index, flat)
        accumulate_per_sample(table, g, ctx.name, ctx.pass_info, reduced=True)
        return grad, None, None, None, None, None


class _AddBroadcast(torch.autograd.Function):
    """x (R, ...) + p, p broadcast over the rows (and any leading size-1 dims)."""

    @staticmethod
    def forward(ctx, x, p, name, pass_info):
        ctx.p, ctx.name, ctx.pass_info = p, name, pass_info
        return x + p.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.p
        _, _, call_units = ctx.pass_info
        per_unit = call_units.reduce(grad) if call_units is not None else grad
        # A unit's gradient of p: its rows' output gradient, of shape S = grad.shape[1:],
        # summed over what p broadcast along. p's shape right-aligns with S (dims of p past
        # S's, which line up with the rows, are 1): sum S's leading dims p lacks and the
        # dims where p is 1 and S is not.
        shape = p.shape
        while len(shape) > per_unit.dim() - 1:
            shape = shape[1:]  # a leading 1 broadcast over the rows
        lead = per_unit.dim() - 1 - len(shape)
        g = per_unit.sum(dim=tuple(range(1, 1 + lead))) if lead > 0 else per_unit
        ones = [1 + i for i, n in enumerate(shape) if n == 1 and g.shape[1 + i] != 1]
        if ones:
            g = g.sum(dim=tuple(ones), keepdim=True)
        accumulate_per_sample(p, g.reshape(g.shape[0], *p.shape), ctx.name, ctx.pass_info, True)
        return grad, None, None, None


def _trainable(p) -> bool:
    return isinstance(p, torch.nn.Parameter) and p.requires_grad and torch.is_grad_enabled()


def window_attention_forward(override, x, mask=None):
    """MONAI's WindowAttention.forward (monai.networks.nets.swin_unetr), the training path."""
    m = override.module
    b, n, c = x.shape
    passes = override.passes
    with passes.batch_major(b):
        qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        index = m.relative_position_index.clone()[:n, :n].reshape(-1)
        q = q * m.scale
        attn = q @ k.transpose(-2, -1)
        table = m.relative_position_bias_table
        if _trainable(table):
            info = passes.pass_info(passes.units_for(b))
            attn = _AddRelativeBias.apply(attn, table, index, n, override.param_name(table), info)
        else:
            bias = table[index].reshape(n, n, -1).permute(2, 0, 1).contiguous()
            attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, m.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, m.num_heads, n, n)
        attn = m.softmax(attn)
        attn = m.attn_drop(attn).to(v.dtype)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = m.proj(x)
        return m.proj_drop(x)


def patch_embedding_forward(override, x):
    """MONAI's PatchEmbeddingBlock.forward (monai.networks.blocks.patchembedding)."""
    m = override.module
    x = m.patch_embeddings(x)
    if m.proj_type == "conv":
        x = x.flatten(2).transpose(-1, -2)
    pos = m.position_embeddings
    if _trainable(pos):
        passes = override.passes
        info = passes.pass_info(passes.units_for(x.shape[0]))
        embeddings = _AddBroadcast.apply(x, pos, override.param_name(pos), info)
    else:
        embeddings = x + pos
    return m.dropout(embeddings)


# Keyed by "module.QualName" (no import of MONAI here); each entry re-spells that class's
# forward (see the module docstring) and is held to the oracle by the MONAI network tests.
FORWARD_OVERRIDES = {
    "monai.networks.nets.swin_unetr.WindowAttention": window_attention_forward,
    "monai.networks.blocks.patchembedding.PatchEmbeddingBlock": patch_embedding_forward,
}


def register_forward_override(qualname: str, fn) -> None:
    """``fn(override, *args, **kwargs)`` re-spells the forward of the class ``qualname``
    ("module.QualName"): for dpseg's own modules (the audit's windowed canary) and tests.
    An override is trusted to be exact; the oracle tests are what hold it to that."""
    FORWARD_OVERRIDES[qualname] = fn
