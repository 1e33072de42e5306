"""ElasticFace-Arc: an angular margin drawn per sample from a normal distribution."""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import Margin, MarginInput, require
from .functional import clamp_cos

_STEP_STRIDE = 1_000_003


def elastic_normal_draws(seed: int, step: int, n: int, micro: int = 0) -> torch.Tensor:
    """[n] standard normal draws of one step: ``torch.randn`` from a CPU generator seeded with
    ``seed · 1_000_003 + step``; entry i belongs to global sample i (same on every rank).

    ``micro``: the micro-batch within an accumulated step; micro-batch m > 0 draws from
    the seed ``(seed · 1_000_003 + step) · 1_000_003 + m`` instead.
    """
    base = seed * _STEP_STRIDE + step
    gen = torch.Generator().manual_seed((base if micro == 0 else base * _STEP_STRIDE + micro) % (2 ** 63))
    return torch.randn(n, generator=gen)


class ElasticFace(Margin):
    """Target s·cos(θ_y + m_i) with m_i ~ N(m, σ) per sample, others s·cos θ_j.

    Boutros, Damer, Kirchbuchner, Kuijper, "ElasticFace: Elastic Margin Loss for Deep Face
    Recognition", CVPR Workshops 2022 (ElasticFace-Arc: s = 64, m = 0.5, σ = 0.05).  With
    ``plus`` (ElasticFace-Arc+) the draws are sorted and handed out by the target cosine:
    the sample closest to its class centre gets the smallest margin.

    The draws are reproducible: optimiser step t uses ``elastic_normal_draws(seed, t, N)``
    over the global batch (micro-batch m of an accumulated step: ``micro=m``), so every rank
    draws the same margin for a given global sample.  ``step`` counts optimiser steps
    (:meth:`advance`, called by the row optimiser's step) and is saved with the module's
    state, so gradient accumulation does not change which step's draws a sample gets.  In
    eval mode every sample gets the mean margin m.
    """

    name = "elasticface"
    paper = "Boutros et al., ElasticFace: Elastic Margin Loss for Deep Face Recognition, CVPRW 2022"

    def __init__(self, s: float = 64.0, m: float = 0.5, sigma: float = 0.05, plus: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        require(s > 0, f"elasticface s={s} must be positive (the cosine scale, 64 in the paper)")
        require(0.0 <= m < math.pi / 2, f"elasticface m={m} must be an angle in [0, π/2) (0.5 in the paper)")
        require(sigma >= 0, f"elasticface sigma={sigma} must be >= 0 (std of the margin, 0.05 in the paper)")
        require(isinstance(seed, int) and seed >= 0, f"elasticface seed={seed!r} must be an integer >= 0")
        self.s, self.m, self.sigma, self.plus, self.seed = float(s), float(m), float(sigma), bool(plus), seed
        # Python counters (not device buffers) so that seeding needs no device sync.
        self.step = 0
        self.micro = 0  # training forwards since the last optimiser step

    def get_extra_state(self) -> dict[str, Any]:
        """The draw counter, so a resumed run continues the same sequence of margins."""
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the draw counter."""
        self.step = int(state["step"])
        self.micro = 0

    def advance(self) -> None:
        """One optimiser step done: the next forwards draw the next step's margins."""
        self.step += 1
        self.micro = 0

    def sample_margins(self, inp: MarginInput) -> torch.Tensor:
        """[N] margin of every global sample for this forward (advances ``step`` when training)."""
        n = inp.cos.shape[0]
        if not self.training:
            return inp.cos.new_full((n,), self.m)
        draws = self.m + self.sigma * elastic_normal_draws(self.seed, self.step, n, self.micro)
        self.micro += 1
        draws = draws.to(inp.cos.device)
        if self.plus:
            order = torch.argsort(inp.global_target_cos(), descending=True, stable=True)
            draws = torch.empty_like(draws).scatter_(0, order, torch.sort(draws).values)
        return draws

    def logit_scale(self) -> float:
        """s: the other columns are s·cos."""
        return self.s

    def target_logit(self, target_cos: torch.Tensor, inp: MarginInput) -> torch.Tensor:
        """s·cos(θ + m_i), with this forward's draws of m_i."""
        margins = self.sample_margins(inp)
        theta = torch.acos(clamp_cos(target_cos))
        return torch.cos(theta + margins) * self.s

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """s·cos(θ + m_i) at the target, s·cos elsewhere."""
        return self.scaled_forward(inp)
