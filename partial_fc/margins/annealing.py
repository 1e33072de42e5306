"""The λ-blended multiplicative angular margin shared by L-Softmax and SphereFace."""
from __future__ import annotations

import torch

from .base import Margin, MarginInput, require
from .functional import a_softmax_psi, annealed_lambda


class AnnealedAngularMargin(Margin):
    """Target cos θ_y replaced by (λ·cos θ_y + ψ(θ_y)) / (1 + λ), λ annealed with the iteration.

    Training with ψ alone does not converge from scratch, so both papers start close to
    the plain softmax (λ large) and decay λ as λ = max(λ_min, base·(1 + γ·iter)^(−power)).
    ``iteration`` counts optimiser steps in a buffer (checkpointed with the classifier):
    the training forwards of step k (0-based) use λ at iteration k + 1, as the papers'
    Caffe layers do when one forward is one step, and every micro-batch of an accumulated
    step uses the same λ.  :meth:`advance` (called by the row optimiser's step) moves it on.
    """

    def __init__(self, m: int, base: float, gamma: float, power: float, lambda_min: float) -> None:
        super().__init__()
        if isinstance(m, float) and float(m).is_integer():
            m = int(m)  # configuration files may spell 4 as 4.0
        require(isinstance(m, int) and not isinstance(m, bool) and m >= 1,
                f"{self.name} m={m!r} must be an integer >= 1 (the angle multiplier, 4 in the paper)")
        require(base >= 0 and gamma >= 0 and power >= 0 and lambda_min >= 0,
                f"{self.name} λ schedule base={base}, gamma={gamma}, power={power}, lambda_min={lambda_min} "
                "must all be >= 0")
        self.m, self.base, self.gamma, self.power, self.lambda_min = (
            m, float(base), float(gamma), float(power), float(lambda_min))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def current_lambda(self) -> torch.Tensor:
        """λ at the current iteration (a 0-d float32 tensor on the buffer's device)."""
        return annealed_lambda(self.iteration, self.base, self.gamma, self.power, self.lambda_min)

    def advance(self) -> None:
        """One optimiser step done: the next step's forwards use the next λ."""
        with torch.no_grad():
            self.iteration += 1

    def blended_target(self, inp: MarginInput) -> torch.Tensor:
        """[N] (λ·cos θ_y + ψ(θ_y)) / (1 + λ); training uses the λ of the step under way."""
        iteration = self.iteration + 1 if self.training else self.iteration
        lam = annealed_lambda(iteration, self.base, self.gamma, self.power, self.lambda_min)
        cos_t = self.target_cos(inp)
        return (lam * cos_t + a_softmax_psi(cos_t, self.m)) / (1.0 + lam)
