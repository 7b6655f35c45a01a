"""Resolve the user's ``layers=`` argument to named parameters of the model."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from typing import Union

import torch
from torch import nn

from .errors import LayerNotFoundError

LayerSpec = Union[str, nn.Module, type, nn.Parameter]

# Weight matrices the paper measures: linear layers and attention projections.
# HF GPT-2's projections are ``Conv1D`` modules (a transposed linear layer);
# matching by class name avoids importing transformers.
_PROJECTION_CLASS_NAMES = {"Conv1D"}

__all__ = ["LayerSpec", "default_parameters", "resolve_parameters"]


def default_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every linear and attention-projection weight matrix of ``model``, by name.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> list(default_parameters(m))
        ['0.weight', '2.weight']
    """
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.MultiheadAttention):
            for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p = getattr(module, pname, None)
                if isinstance(p, nn.Parameter):
                    out[prefix + pname] = p
        elif isinstance(module, nn.Linear) or type(module).__name__ in _PROJECTION_CLASS_NAMES:
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                out[prefix + "weight"] = weight
    # Tied weights (e.g. GPT-2's lm_head and wte) appear once, under their first name.
    return _dedupe(model, out)


def _dedupe(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    canonical = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, nn.Parameter] = {}
    for name, p in params.items():
        out.setdefault(canonical.get(id(p), name), p)
    return {name: p for name, p in out.items() if p.requires_grad}


def _direct_parameters(prefix: str, module: nn.Module) -> dict[str, nn.Parameter]:
    dot = f"{prefix}." if prefix else ""
    return {dot + name: p for name, p in module.named_parameters(recurse=False)}


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def resolve_parameters(
    model: nn.Module, layers: LayerSpec | Iterable[LayerSpec] | None = None
) -> dict[str, nn.Parameter]:
    """Map a ``layers`` specification to ``{parameter name: parameter}``.

    Args:
        model: the network.
        layers: ``None`` (every linear / attention-projection weight), or one or a
            list of: a module or parameter name, a glob pattern over names
            (``"encoder.layer.*.attention.self.query"``), a module object, a
            parameter object, or a module type (``nn.Linear``). A module stands for
            its own (non-recursive) parameters, weight and bias alike.

    Returns:
        Ordered dict from canonical parameter name to parameter, each requiring grad.

    Raises:
        LayerNotFoundError: a name or pattern matches nothing; the message lists
            the closest names.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        >>> list(resolve_parameters(m, "1"))
        ['1.weight', '1.bias']
        >>> list(resolve_parameters(m, "*.weight"))
        ['0.weight', '1.weight']
    """
    if layers is None:
        found = default_parameters(model)
        if not found:
            raise LayerNotFoundError(
                "the model has no linear or attention-projection weights; name the "
                "parameters to measure with layers=[...]"
            )
        return found
    if isinstance(layers, (str, nn.Module, type, torch.Tensor)):
        layers = [layers]

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    param_ids = {id(p): name for name, p in params.items()}
    module_ids = {id(m): name for name, m in modules.items()}
    out: dict[str, nn.Parameter] = {}
    for spec in layers:
        if isinstance(spec, torch.Tensor):
            if id(spec) not in param_ids:
                raise LayerNotFoundError("a tensor passed in layers= is not a parameter of this model")
            name = param_ids[id(spec)]
            out[name] = params[name]
        elif isinstance(spec, nn.Module):
            if id(spec) not in module_ids:
                raise LayerNotFoundError(
                    f"the {type(spec).__name__} passed in layers= is not a submodule of this model"
                )
            out.update(_direct_parameters(module_ids[id(spec)], spec))
        elif isinstance(spec, type):
            matched = {n: m for n, m in modules.items() if isinstance(m, spec)}
            if not matched:
                raise LayerNotFoundError(f"the model has no module of type {spec.__name__}")
            for n, m in matched.items():
                out.update(_direct_parameters(n, m))
        elif isinstance(spec, str):
            out.update(_resolve_name(spec, modules, params))
        else:
            raise TypeError(f"layers= entries must be names, modules, parameters or types, not {type(spec)}")
    out = _dedupe(model, out)
    if not out:
        raise LayerNotFoundError(f"layers={layers!r} selects no parameter that requires grad")
    return out


def _resolve_name(
    spec: str, modules: dict[str, nn.Module], params: dict[str, nn.Parameter]
) -> dict[str, nn.Parameter]:
    if spec in params:
        return {spec: params[spec]}
    if spec in modules and spec != "":
        return _direct_parameters(spec, modules[spec])
    if _is_pattern(spec):
        out: dict[str, nn.Parameter] = {}
        for name in params:
            if fnmatch.fnmatchcase(name, spec):
                out[name] = params[name]
        for name, module in modules.items():
            if name and fnmatch.fnmatchcase(name, spec):
                out.update(_direct_parameters(name, module))
        if out:
            return out
    candidates = [n for n in list(modules) + list(params) if n]
    close = difflib.get_close_matches(spec, candidates, n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise LayerNotFoundError(
        f"no module or parameter named {spec!r} in {type(next(iter(modules.values()))).__name__}.{hint} "
        "Names come from model.named_modules() / named_parameters(); glob patterns such as "
        "'encoder.*.weight' are accepted."
    )
