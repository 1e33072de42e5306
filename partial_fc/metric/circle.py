"""Circle loss (Sun et al., CVPR 2020), pair form, over the gathered global batch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..comm import ProcessGroup
from .pair_loss import PairLoss


class CircleLoss(PairLoss):
    """Per anchor: log[1 + Σ_n exp(γ·α_n·(s_n − Δ_n)) · Σ_p exp(−γ·α_p·(s_p − Δ_p))], averaged.

    s are cosine similarities between an anchor and the other samples of the global batch
    (self-pairs excluded), positives sharing its label; α_p = [1 + m − s_p]₊,
    α_n = [s_n + m]₊, Δ_p = 1 − m, Δ_n = m.  The weights α are constants for the gradient,
    as in the paper's reference code.  The anchors are this rank's local samples; the mean
    runs over the valid anchors of the global batch (at least one positive and one
    negative: the others have no pair term and are left out); after a forward,
    ``num_valid_anchors`` and ``num_anchors`` hold the global counts (0-dim int64 tensors).

    Args:
        m: relaxation margin m (0.25 in the paper for face recognition).
        gamma: scale γ (256 in the paper).
        group: process group the batch is split over.
        embedding_size: expected feature width (checked when given).
        num_classes: labels must lie in [0, num_classes) (checked when given).
        check_inputs: check label range and finiteness (one host sync per forward).
    """

    def __init__(self, m: float = 0.25, gamma: float = 256.0, group: ProcessGroup = None,
                 embedding_size: Optional[int] = None, num_classes: Optional[int] = None,
                 check_inputs: bool = True):
        super().__init__(group, embedding_size, num_classes, check_inputs)
        if not (isinstance(m, (int, float)) and 0.0 <= m < 1.0):
            raise ValueError(f"m={m!r} is outside [0, 1): it is the relaxation margin of the similarities "
                             "(0.25 in the paper)")
        if not (isinstance(gamma, (int, float)) and gamma > 0.0):
            raise ValueError(f"gamma={gamma!r} must be positive: it is the scale of the similarities "
                             "(256 in the paper)")
        self.m, self.gamma = float(m), float(gamma)

    def anchor_terms(self, similarity: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """log(1 + Σ_n e^{γ α_n (s_n − m)} Σ_p e^{−γ α_p (s_p − 1 + m)}) of each anchor."""
        alpha_p = (1.0 + self.m - similarity.detach()).clamp_min(0.0)
        alpha_n = (similarity.detach() + self.m).clamp_min(0.0)
        logit_p = -self.gamma * alpha_p * (similarity - (1.0 - self.m))
        logit_n = self.gamma * alpha_n * (similarity - self.m)
        # Invalid anchors get all-zero rows: a log-sum-exp over nothing (−inf) would turn the
        # zero gradient of their (discarded) term into NaN.
        keep = valid[:, None]
        logit_p = torch.where(keep, logit_p.masked_fill(~positive, float("-inf")), torch.zeros_like(logit_p))
        logit_n = torch.where(keep, logit_n.masked_fill(~negative, float("-inf")), torch.zeros_like(logit_n))
        # log(1 + Σ_n e^{a_n} · Σ_p e^{b_p}) = softplus(lse(a) + lse(b)), stable at γ = 256.
        return F.softplus(torch.logsumexp(logit_n, dim=1) + torch.logsumexp(logit_p, dim=1))

    def extra_repr(self) -> str:
        """The settings shown by print(module)."""
        return f"m={self.m}, gamma={self.gamma}"
