"""Optimizers of the experiments, built from config entries such as ``{"type": "adam", "lr": 1e-4, "betas": [0.9, 0.98]}``.

``{"type": "switch", "phases": [{"until": 900, "spec": {...}}, {"spec": {...}}]}`` runs
one optimizer after another (Table 8: SGD, then Adam from step 900).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def make_optimizer(spec: dict, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer | SwitchOptimizer:
    """``spec``: ``type`` (sgd, adam, amsgrad, rmsprop, adagrad, switch), ``lr`` and optionally
    ``momentum``, ``betas``, ``eps``, ``weight_decay``; ``params``: what to optimise."""
    kind = spec["type"]
    if kind == "switch":
        return SwitchOptimizer(spec["phases"], params)
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
    raise ValueError(f"unknown optimizer type {kind!r}; choose sgd, adam, amsgrad, rmsprop, adagrad or switch")


class SwitchOptimizer:
    """Phases of optimizers: phase i runs until its ``until`` step, then phase i+1 starts fresh."""

    def __init__(self, phases: list[dict], params: Iterable[torch.nn.Parameter]) -> None:
        if any("until" not in p for p in phases[:-1]):
            raise ValueError("every phase but the last needs an 'until' step")
        self.phases, self.params = phases, list(params)
        self.steps, self.phase = 0, 0
        self.inner = make_optimizer(phases[0]["spec"], self.params)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def step(self) -> None:
        self.inner.step()
        self.steps += 1
        if self.phase < len(self.phases) - 1 and self.steps >= self.phases[self.phase]["until"]:
            self.phase += 1
            self.inner = make_optimizer(self.phases[self.phase]["spec"], self.params)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "phase": self.phase, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.phase = state["steps"], state["phase"]
        self.inner = make_optimizer(self.phases[self.phase]["spec"], self.params)
        self.inner.load_state_dict(state["inner"])
