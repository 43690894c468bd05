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
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpseg.privacy.grad_sample import accumulate_per_sample
from dpseg.privacy.ranges import profiled
from dpseg.privacy.rules import Rule, rule_for
from dpseg.privacy.rules.conv_weight_grad import force_strategy
from dpseg.privacy.rules.fallback import FuncFallbackRule
from dpseg.privacy.rules.transformer import FORWARD_OVERRIDES
from dpseg.privacy.units import RowUnits, UnitMapError


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
        # Leading sizes declared batch-major by a forward override (window attention sees
        # B x windows rows, sample b's windows consecutive): size -> rows per sample.
        self._batch_major: dict[int, int] = {}

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

    @contextmanager
    def batch_major(self, rows: int):
        """Inside: a tensor of ``rows`` leading rows holds rows / batch consecutive rows of
        each sample, sample after sample (what Swin's window partition produces). Only a
        forward override that knows its module's layout declares it."""
        batch = self.batch
        if batch is None or rows == batch or batch == 0:
            yield
            return
        if rows % batch:
            raise ValueError(f"{rows} rows are not a whole number of rows for {batch} samples")
        outer = dict(self._batch_major)
        self._batch_major[rows] = rows // batch
        try:
            yield
        finally:
            self._batch_major = outer

    def units_for(self, rows: int) -> RowUnits | None:
        """The unit map of a tensor of ``rows`` leading rows in the running pass: the pass's
        own, or, for a declared batch-major size, each unit's rows times the rows a sample
        has there. Raises when the rows cannot be read as samples."""
        if self.batch is None or rows == self.batch:
            return self.units
        per_sample = self._batch_major.get(rows)
        if per_sample is None:
            raise UnitMapError(f"{rows} rows in a pass over {self.batch}")
        units = self.units if self.units is not None else RowUnits.identity(self.batch)
        return RowUnits(tuple(k * per_sample for k in units.rows_per_unit), units.unit)

    def pass_info(self, call_units: RowUnits | None) -> tuple:
        """(pass number, the pass's unit map, this call's) for a captured call."""
        return self.id_for_call(), self.units, call_units

    def id_for_call(self) -> int:
        if self._current is not None:
            return self._current
        if not self.strict:
            return 0
        self._count += 1
        return self._count


class _PerSampleFunction(torch.autograd.Function):
    """A captured call. A rule's output is one tensor, or (a torch.func unit's) any nesting
    of tuples, lists and dicts of tensors and None (a ViT's (x, hidden states), a block's
    (x, None) when it keeps no attention map): those go out flattened, the structure in
    ``out_spec`` for the caller to rebuild, and their gradients come back to the rule in the
    same structure (None for a None)."""

    @staticmethod
    def forward(ctx, layer, state, names, pass_info, out_spec, x, *params):
        out, saved = layer.rule.forward(layer.module, x, state)
        ctx.layer, ctx.state, ctx.names, ctx.params = layer, state, names, params
        ctx.pass_info = pass_info  # (pass number, the pass's RowUnits, this call's RowUnits)
        ctx.save_for_backward(*saved)
        if isinstance(out, torch.Tensor):
            ctx.spec = None
            return out
        leaves, ctx.spec = tree_flatten(out)
        out_spec.append(ctx.spec)
        return tuple(leaves)

    @staticmethod
    def backward(ctx, *grad_outs):
        layer = ctx.layer
        need_input_grad = ctx.needs_input_grad[5]
        if ctx.spec is None:
            grad_out = grad_outs[0].contiguous()
        else:  # an output the loss never reached comes back as zeros (materialised), a
            # None output as None
            grads = [g.contiguous() if g is not None else None for g in grad_outs]
            grad_out = tree_unflatten(grads, ctx.spec)
        strategy = force_strategy(layer.conv_strategy) if layer.conv_strategy else nullcontext()
        with strategy, profiled(f"dpseg::backward[{type(layer.module).__name__}]"):
            grad_input, grads = layer.rule.backward(
                layer.module, ctx.saved_tensors, ctx.state, grad_out, need_input_grad, ctx.names
            )
        for param, name, g in zip(ctx.params, ctx.names, grads, strict=True):
            where = f"{layer.name}.{name}" if layer.name else name
            accumulate_per_sample(param, g, where, ctx.pass_info)
        return (None, None, None, None, None, grad_input, *([None] * len(ctx.params)))


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
        if self.unit:
            params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        else:  # a leaf's own parameters, read live (named_parameters' generator costs ~10 us),
            # each once under its first name, as named_parameters gives them: an alias
            # (register_parameter("b2", m.bias)) would otherwise count its gradient twice
            params, seen = [], set()
            for n, p in module._parameters.items():
                if p is not None and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append((n, p))
        if self.bypass or not params or not torch.is_grad_enabled():
            return type(module).forward(module, x, *args, **kwargs)
        if not isinstance(x, torch.Tensor) or (args and not self.unit):
            raise TypeError(
                f"layer {self.name!r} ({type(module).__name__}) was called with "
                f"{1 + len(args)} positional inputs; dpseg's per-sample capture handles "
                "layers called with one tensor. Wrap the extra inputs into the module."
            )
        try:
            call_units = self.passes.units_for(x.shape[0])
        except UnitMapError:
            raise ValueError(
                f"layer {self.name!r} ({type(module).__name__}) got an input of leading "
                f"size {x.shape[0]} in a forward pass over a batch of {self.passes.batch}: "
                "the model reshapes the batch (into windows or tokens, say), so this layer's "
                "rows are not samples and its per-sample gradients cannot be read off them. "
                "Register the enclosing block that restores the batch with "
                "dpseg.privacy.register_functional_block(BlockClass): its parameters then "
                "go through torch.func per sample."
            ) from None
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
        pass_info = self.passes.pass_info(call_units)
        out_spec: list = []  # filled by a structured output's forward
        out = _PerSampleFunction.apply(
            self, state, names, pass_info, out_spec, x, *(p for _, p in params)
        )
        return tree_unflatten(list(out), out_spec[0]) if out_spec else out


class ForwardOverride:
    """A module whose own parameters are used inside its forward (beside its child layers)
    and whose forward dpseg re-spells in closed form (dpseg.privacy.rules.transformer):
    the children keep their rules, the own parameters enter through Functions that write
    their per-sample gradients. No replay, unlike a torch.func unit."""

    unit = False  # its children are captured layers of their own

    def __init__(self, name: str, module: nn.Module, fn, passes: ForwardPasses):
        self.name, self.module, self.fn, self.passes = name, module, fn, passes
        self.bypass = False
        self._names = {id(p): n for n, p in module.named_parameters(recurse=False)}

    def param_name(self, param: torch.Tensor) -> str:
        own = self._names[id(param)]
        return f"{self.name}.{own}" if self.name else own

    def __call__(self, *args, **kwargs):
        module = self.module
        if self.bypass or not torch.is_grad_enabled():
            return type(module).forward(module, *args, **kwargs)
        if self.passes.batch is None:
            raise ValueError(
                f"{self.name!r} ({type(module).__name__}) is captured through its forward "
                "override, which needs the forward pass's batch size: call the model made "
                "private (make_private / PrivateModule), not a bare capture"
            )
        return self.fn(self, *args, **kwargs)


def _forward_override(module: nn.Module):
    for klass in type(module).__mro__:
        fn = FORWARD_OVERRIDES.get(f"{klass.__module__}.{klass.__qualname__}")
        if fn is not None:
            return fn
    return None


def _needs_fallback(module: nn.Module, rule: Rule | None) -> bool:
    if rule is None:
        return True
    names = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    return not names <= set(rule.param_names)


# Blocks whose inside reshapes the batch in a way no rule reads: their parameters go through
# torch.func over the block, whose input and output keep the batch. Keyed by
# "module.QualName", so no import of the library is needed. (MONAI's SwinTransformerBlock
# was one; its window attention now has a forward override, dpseg.privacy.rules.transformer.)
_FUNCTIONAL_BLOCKS: set[str] = set()


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
    parameters beside submodules gets its forward override where dpseg has one (MONAI's
    window attention and patch embedding: dpseg.privacy.rules.transformer), its children
    their rules; otherwise it, and every registered functional block, becomes one unit:
    its subtree's parameters go through torch.func per sample, exactly, at the cost of
    recomputing it.

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
        override = None
        if trainable and has_children and not _is_functional_block(module):
            override = _forward_override(module)
        if override is not None:
            # Its children are captured on their own as the loop goes on.
            layer = ForwardOverride(name, module, override, passes)
        elif trainable and has_children and (own or _is_functional_block(module)):
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
