"""Routes every trainable leaf layer through one autograd Function that records per-sample
gradients in ``param.grad_sample`` (shape (B, *param.shape), summed over repeated calls).

Why a Function rather than Opacus-style module hooks: with hooks, autograd still computes
each parameter's summed gradient, and the hook then computes per-sample gradients on top,
so a conv's weight gradient (half of its backward) is paid twice. Here the Function's
backward returns no parameter gradient at all; ``p.grad`` is written once, by the DP step,
from the clipped per-sample gradients. Only what the rule needs is saved: for a conv, its
input, as ordinary autograd would keep.

Per-sample gradients of one forward pass add up (a layer used twice, or two backward passes
from one forward: the same samples). Those of two forward passes never do: sample i of one
batch and sample i of another are different patients, and adding them before clipping would
clip two patients as one. Every forward pass through a private model is numbered
(:class:`ForwardPasses`), each per-sample gradient carries the number of the pass that made
it, and gradients of different passes meeting in one parameter are refused.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.autograd.profiler import record_function

from dpseg.privacy.rules import Rule, rule_for
from dpseg.privacy.rules.conv_weight_grad import force_strategy
from dpseg.privacy.rules.fallback import FuncFallbackRule


class ForwardPasses:
    """Numbers forward passes, so that per-sample gradients of two of them never merge.

    ``running()`` wraps one pass through the whole model (PrivateModule.forward): every layer
    called inside it gets that pass's number. A layer called outside any pass (a submodule
    called on its own) gets a number of its own when ``strict``, so two such calls are never
    merged either; ``strict=False`` (bare ``capture_layers``) gives them all pass 0.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self._count = 0
        self._current: int | None = None

    @contextmanager
    def running(self):
        outer = self._current
        if outer is None:  # a nested call (a model calling itself) stays in the outer pass
            self._count += 1
            self._current = self._count
        try:
            yield
        finally:
            self._current = outer

    def id_for_call(self) -> int:
        if self._current is not None:
            return self._current
        if not self.strict:
            return 0
        self._count += 1
        return self._count


class _PerSampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, state, names, pass_id, x, *params):
        out, saved = layer.rule.forward(layer.module, x, state)
        ctx.layer, ctx.state, ctx.names, ctx.params = layer, state, names, params
        ctx.pass_id = pass_id
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        need_input_grad = ctx.needs_input_grad[4]
        strategy = force_strategy(layer.conv_strategy) if layer.conv_strategy else nullcontext()
        with strategy, record_function(f"dpseg::backward[{type(layer.module).__name__}]"):
            grad_input, grads = layer.rule.backward(
                layer.module,
                ctx.saved_tensors,
                ctx.state,
                grad_out.contiguous(),
                need_input_grad,
                ctx.names,
            )
        for param, name, g in zip(ctx.params, ctx.names, grads, strict=True):
            _accumulate(param, g, f"{layer.name}.{name}" if layer.name else name, ctx.pass_id)
        return (None, None, None, None, grad_input, *([None] * len(ctx.params)))


def _accumulate(param: torch.Tensor, g: torch.Tensor, name: str, pass_id: int) -> None:
    g = g.to(param.dtype)
    existing = getattr(param, "grad_sample", None)
    if existing is None:
        param.grad_sample = g
        param._dpseg_pass = pass_id
    elif getattr(param, "_dpseg_pass", pass_id) != pass_id:
        raise RuntimeError(
            f"{name}: per-sample gradients of two different forward passes met before "
            "optimizer.step(). DP-SGD would add them sample by sample, clipping sample i of "
            "one batch and sample i of the other as one patient. To accumulate a logical "
            "batch larger than memory, use dpseg.BatchMemoryManager(data_loader=..., "
            "max_physical_batch_size=..., optimizer=...); if both passes hold the same "
            "samples, run them through one forward call."
        )
    elif existing.shape[0] != g.shape[0]:
        raise RuntimeError(
            f"{name}: per-sample gradients of batches of {existing.shape[0]} and {g.shape[0]} "
            "met before optimizer.step(); DP-SGD clips each sample of ONE batch. Call "
            "optimizer.step() (or zero_grad()) between batches."
        )
    else:
        existing.add_(g)


class CapturedLayer:
    """One trainable leaf module whose forward now goes through _PerSampleFunction."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        rule: Rule | None,
        passes: ForwardPasses,
        conv_strategy: str | None = None,
    ):
        self.name, self.module, self.passes = name, module, passes
        self.rule = rule if rule is not None else FuncFallbackRule(self)
        self.bypass = False
        self.conv_strategy = conv_strategy  # e.g. "triton" when the engine runs backend="triton"

    def __call__(self, x, *args, **kwargs):
        module = self.module
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if self.bypass or not params or not torch.is_grad_enabled():
            return type(module).forward(module, x, *args, **kwargs)
        if args or not isinstance(x, torch.Tensor):
            raise TypeError(
                f"layer {self.name!r} ({type(module).__name__}) was called with "
                f"{1 + len(args)} positional inputs; dpseg's per-sample capture handles "
                "layers called with one tensor. Wrap the extra inputs into the module."
            )
        x, state = self.rule.prepare(module, x, **kwargs)
        names = tuple(n for n, _ in params)
        pass_id = self.passes.id_for_call()
        return _PerSampleFunction.apply(self, state, names, pass_id, x, *(p for _, p in params))


def _needs_fallback(module: nn.Module, rule: Rule | None) -> bool:
    if rule is None:
        return True
    names = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    return not names <= set(rule.param_names)


def capture_layers(
    model: nn.Module,
    allow_fallback: bool = True,
    conv_strategy: str | None = None,
    passes: ForwardPasses | None = None,
) -> list[CapturedLayer]:
    """Installs the capture on every module that owns trainable parameters.

    ``conv_strategy`` forces the per-sample conv weight-gradient strategy (default: the
    measured per-shape choice). ``passes`` numbers the forward passes (PrivateModule's own);
    without it every call counts as one pass, as for a single forward and backward."""
    passes = passes if passes is not None else ForwardPasses(strict=False)
    layers, fallback_types = [], set()
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if any(True for _ in module.children()):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) owns trainable parameters "
                f"{own} and also has submodules; dpseg computes per-sample gradients per "
                "leaf layer. Move those parameters into a leaf module (or freeze them)."
            )
        rule = rule_for(module)
        if _needs_fallback(module, rule):
            if not allow_fallback:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) has no per-sample rule in "
                    "dpseg; pass allow_fallback=True to use the (slower) torch.func path."
                )
            fallback_types.add(type(module).__name__)
            rule = None
        layer = CapturedLayer(name, module, rule, passes, conv_strategy)
        module.forward = layer  # instance attribute: nn.Module.__call__ (and hooks) still run
        layers.append(layer)
    if fallback_types:
        warnings.warn(
            f"dpseg has no per-sample rule for {sorted(fallback_types)}; their per-sample "
            "gradients go through torch.func (correct, but recomputes those layers).",
            stacklevel=3,
        )
    return layers


def release_layers(layers: list[CapturedLayer]) -> None:
    """Undoes capture_layers: the modules get their class's forward back."""
    for layer in layers:
        if layer.module.__dict__.get("forward") is layer:
            del layer.module.forward
