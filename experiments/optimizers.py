"""Optimizers of the experiments, built from config entries such as ``{"type": "adam", "lr": 1e-4, "betas": [0.9, 0.98]}``."""

from __future__ import annotations

import torch


def make_optimizer(spec: dict, params) -> torch.optim.Optimizer:  # noqa: ANN001
    """``spec``: ``type`` (sgd, adam, amsgrad, rmsprop, adagrad), ``lr`` and optionally
    ``momentum``, ``betas``, ``eps``, ``weight_decay``; ``params``: what to optimise."""
    kind = spec["type"]
    wd = spec.get("weight_decay", 0.0)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec.get("momentum", 0.0), weight_decay=wd)
    if kind in ("adam", "amsgrad"):
        return torch.optim.Adam(params, lr=spec["lr"], betas=tuple(spec.get("betas", (0.9, 0.999))),
                                eps=spec.get("eps", 1e-8), weight_decay=wd, amsgrad=kind == "amsgrad")
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=spec["lr"], momentum=spec.get("momentum", 0.0), weight_decay=wd)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=spec["lr"], weight_decay=wd)
    raise ValueError(f"unknown optimizer type {kind!r}; choose sgd, adam, amsgrad, rmsprop or adagrad")
