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

from dpseg.privacy.ranges import profiled
from dpseg.privacy.rules import Rule, rule_for
from dpseg.privacy.rules.conv_weight_grad import force_strategy
from dpseg.privacy.rules.fallback import FuncFallbackRule
from dpseg.privacy.units import RowUnits


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
        self.batch: int | None = None  # the running pass's batch size (rows), when known
        self.units: RowUnits | None = None  # which rows are one unit (dpseg.privacy.units)

    @contextmanager
    def running(self, batch: int | None = None, units: RowUnits | None = None):
        outer = self._current, self.batch, self.units
        if outer[0] is None:  # a nested call (a model calling itself) stays in the outer pass
            self._count += 1
            self._current = self._count
            self.batch, self.units = batch, units
        try:
            yield
        finally:
            self._current, self.batch, self.units = outer

    def id_for_call(self) -> int:
        if self._current is not None:
            return self._current
        if not self.strict:
            return 0
        self._count += 1
        return self._count


class _PerSampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, state, names, pass_info, x, *params):
        out, saved = layer.rule.forward(layer.module, x, state)
        ctx.layer, ctx.state, ctx.names, ctx.params = layer, state, names, params
        ctx.pass_info = pass_info  # (pass number, its RowUnits or None)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        need_input_grad = ctx.needs_input_grad[4]
        strategy = force_strategy(layer.conv_strategy) if layer.conv_strategy else nullcontext()
        with strategy, profiled(f"dpseg::backward[{type(layer.module).__name__}]"):
            grad_input, grads = layer.rule.backward(
                layer.module,
                ctx.saved_tensors,
                ctx.state,
                grad_out.contiguous(),
                need_input_grad,
                ctx.names,
            )
        pass_id, units = ctx.pass_info
        for param, name, g in zip(ctx.params, ctx.names, grads, strict=True):
            where = f"{layer.name}.{name}" if layer.name else name
            _accumulate(param, g, where, pass_id, units)
        return (None, None, None, None, grad_input, *([None] * len(ctx.params)))


def _accumulate(
    param: torch.Tensor, g: torch.Tensor, name: str, pass_id: int, units: RowUnits | None
) -> None:
    """Adds one call's per-row gradients, reduced to per-unit sums (in the parameter's
    dtype, not autocast's), to ``grad_sample``."""
    g = g.to(param.dtype)
    if units is not None:
        g = units.reduce(g)
    existing = getattr(param, "grad_sample", None)
    if existing is None:
        param.grad_sample = g
        param._dpseg_pass = pass_id
        param._dpseg_units = units
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
    """One captured unit whose forward now goes through _PerSampleFunction: a trainable
    leaf layer with its rule, or (``unit=True``) a module whose whole subtree's parameters
    go through torch.func together (dpseg.privacy.rules.fallback)."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        rule: Rule | None,
        passes: ForwardPasses,
        conv_strategy: str | None = None,
        unit: bool = False,
    ):
        self.name, self.module, self.passes, self.unit = name, module, passes, unit
        self.rule = rule if rule is not None else FuncFallbackRule(self)
        self.bypass = False
        self.conv_strategy = conv_strategy  # e.g. "triton" when the engine runs backend="triton"
        self.random_modules = _random_modules(module) if unit else []

    def __call__(self, x, *args, **kwargs):
        module = self.module
        params = [(n, p) for n, p in module.named_parameters(recurse=self.unit) if p.requires_grad]
        if self.bypass or not params or not torch.is_grad_enabled():
            return type(module).forward(module, x, *args, **kwargs)
        if not isinstance(x, torch.Tensor) or (args and not self.unit):
            raise TypeError(
                f"layer {self.name!r} ({type(module).__name__}) was called with "
                f"{1 + len(args)} positional inputs; dpseg's per-sample capture handles "
                "layers called with one tensor. Wrap the extra inputs into the module."
            )
        batch = self.passes.batch
        if batch is not None and x.shape[0] != batch:
            raise ValueError(
                f"layer {self.name!r} ({type(module).__name__}) got an input of leading "
                f"size {x.shape[0]} in a forward pass over a batch of {batch}: the model "
                "reshapes the batch (into windows or tokens, say), so this layer's rows are "
                "not samples and its per-sample gradients cannot be read off them. Register "
                "the enclosing block that restores the batch with "
                "dpseg.privacy.register_functional_block(BlockClass): its parameters then "
                "go through torch.func per sample."
            )
        if self.unit:
            drawing = _drawing(self.random_modules)
            if drawing:
                raise ValueError(
                    f"{self.name or 'model'} ({type(module).__name__}) is trained per sample "
                    "through torch.func, which replays its forward; random layers inside it "
                    f"would not replay the same draws: {drawing}. Set their drop rate to 0."
                )
            differentiable = [
                i for i, a in enumerate((*args, *kwargs.values()))
                if isinstance(a, torch.Tensor) and a.requires_grad
            ]  # fmt: skip
            if differentiable:
                raise TypeError(
                    f"{self.name!r} ({type(module).__name__}) was called with more than one "
                    "input that requires grad (self-attention as attn(x, x, x), say); dpseg's "
                    "torch.func unit differentiates its first input only, and the gradient "
                    "through the others would be lost. Call it with one tensor input."
                )
            state = (args, kwargs)  # constants of the call (a Swin block's attention mask)
        else:
            x, state = self.rule.prepare(module, x, **kwargs)
        names = tuple(n for n, _ in params)
        pass_info = (self.passes.id_for_call(), self.passes.units)
        return _PerSampleFunction.apply(self, state, names, pass_info, x, *(p for _, p in params))


def _needs_fallback(module: nn.Module, rule: Rule | None) -> bool:
    if rule is None:
        return True
    names = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    return not names <= set(rule.param_names)


# Blocks whose inside reshapes the batch (Swin's windows: its attention sees B x windows
# rows): their parameters go through torch.func over the block, whose input and output
# keep the batch. Keyed by "module.QualName", so no import of the library is needed.
_FUNCTIONAL_BLOCKS: set[str] = {"monai.networks.nets.swin_unetr.SwinTransformerBlock"}


def register_functional_block(block: type | str) -> None:
    """Treat every module of this class as one unit whose subtree's per-sample gradients
    come from torch.func (vmap over the block's input batch): for blocks that reshape the
    batch inside. Extra positional inputs of the block are passed on as constants."""
    key = block if isinstance(block, str) else f"{block.__module__}.{block.__qualname__}"
    _FUNCTIONAL_BLOCKS.add(key)


def _is_functional_block(module: nn.Module) -> bool:
    return any(
        f"{k.__module__}.{k.__qualname__}" in _FUNCTIONAL_BLOCKS for k in type(module).__mro__
    )


def _random_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Dropout-like modules under a torch.func unit (nn.Dropout*, and MONAI's DropPath with
    its drop_prob): in training they draw random numbers, and the per-sample replay would
    draw other numbers than the forward did."""
    return [
        (name or ".", sub) for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.dropout._DropoutNd) or hasattr(sub, "drop_prob")
    ]  # fmt: skip


def _drawing(random_modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Those of them that draw now (training, a rate above 0): checked at every call, since
    the model may be put in training mode, or a rate changed, after make_private."""
    found = []
    for name, sub in random_modules:
        p = getattr(sub, "drop_prob", getattr(sub, "p", 0))
        if sub.training and isinstance(p, int | float) and p > 0:
            found.append(f"{name} ({type(sub).__name__}, p={p})")
    return found


def capture_layers(
    model: nn.Module,
    allow_fallback: bool = True,
    conv_strategy: str | None = None,
    passes: ForwardPasses | None = None,
) -> list[CapturedLayer]:
    """Installs the capture on every module that owns trainable parameters.

    A leaf layer gets its rule (or the torch.func fallback). A module that owns trainable
    parameters and also has submodules (a position embedding beside its patch conv, a
    relative-position bias table beside its attention's linears), and every registered
    functional block, becomes one unit: its subtree's parameters go through torch.func per
    sample, exactly, at the cost of recomputing it.

    ``conv_strategy`` forces the per-sample conv weight-gradient strategy (default: the
    measured per-shape choice). ``passes`` numbers the forward passes (PrivateModule's own);
    without it every call counts as one pass, as for a single forward and backward."""
    passes = passes if passes is not None else ForwardPasses(strict=False)
    layers, fallback_types, unit_types = [], set(), set()
    units: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{u}.") or u == "" for u in units):
            continue  # inside a unit: its parameters are the unit's
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        has_children = any(True for _ in module.children())
        trainable = any(p.requires_grad for p in module.parameters())
        if trainable and has_children and (own or _is_functional_block(module)):
            layer = CapturedLayer(name, module, None, passes, conv_strategy, unit=True)
            units.append(name)
            unit_types.add(type(module).__name__)
        elif own and not has_children:
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
        else:
            continue
        module.forward = layer  # instance attribute: nn.Module.__call__ (and hooks) still run
        layers.append(layer)
    if fallback_types or unit_types:
        warnings.warn(
            "dpseg computes the per-sample gradients of "
            + ", ".join(
                [f"{sorted(fallback_types)} (no per-sample rule)"] * bool(fallback_types)
                + [f"{sorted(unit_types)} (parameters beside submodules)"] * bool(unit_types)
            )
            + " through torch.func: exact, but it recomputes those modules.",
            stacklevel=3,
        )
    return layers


def release_layers(layers: list[CapturedLayer]) -> None:
    """Undoes capture_layers: the modules get their class's forward back."""
    for layer in layers:
        if layer.module.__dict__.get("forward") is layer:
            del layer.module.forward
