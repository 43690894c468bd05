"""The user's own network for `dpseg bench --model PACKAGE.MODULE:CALLABLE`."""

from __future__ import annotations

import importlib
import json

import torch
from torch import nn


def parse_model_kwargs(text: str | None) -> dict:
    """--model-kwargs: a JSON object (blank: none). ValueError says what to change."""
    try:
        kwargs = json.loads(text) if text and text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-kwargs is not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object, e.g. '{\"in_channels\": 1}'")
    return kwargs


def load_model(spec: str, kwargs: dict | str | None = None) -> nn.Module:
    """``spec`` is "package.module:Callable" (e.g. monai.networks.nets:SegResNet), called
    with ``kwargs`` (a dict, or its JSON text). ValueError says what to change."""
    kwargs = parse_model_kwargs(kwargs) if isinstance(kwargs, str) else (kwargs or {})
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object, e.g. '{\"in_channels\": 1}'")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--model {spec!r} must look like package.module:Callable, e.g. "
            "monai.networks.nets:SegResNet"
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec}: cannot import {module_name} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    try:
        model = obj(**kwargs)
    except TypeError as exc:
        raise ValueError(f"--model {spec} with --model-kwargs {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def example_batch(
    model: nn.Module,
    batch: int,
    size: int,
    in_channels: int = 1,
    spatial_dims: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random input (batch, in_channels, size^spatial_dims) and a label map with as many
    classes as the model's output has channels, on the output's grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *([size] * spatial_dims), generator=g).to(device)
    model = model.to(device)
    with torch.no_grad():
        out = model(x[:1])
    if isinstance(out, list | tuple):
        raise ValueError(
            f"{type(model).__name__} returns {type(out).__name__}; dpseg bench needs one output "
            "tensor (turn deep supervision off)"
        )
    classes = out.shape[1]
    y = torch.randint(0, classes, (batch, *out.shape[2:]), generator=g).to(device)
    return x, y
