"""Reusable adaptive parts of the seed methods, so that they can be combined with other methods:

- `ClassWiseTemperature` (ABSLD): a temperature per class, moved every epoch against the gap
  between each class's error risk and the mean risk;
- `EntropyBalance` (B-MTARD, EBB): two scalar teacher temperatures moved every step until the
  two teachers' soft labels are equally "hard" (equal entropy);
- `LossBalance` (MTARD/B-MTARD, NLB): loss weights moved every step so that the objectives
  decrease at the same relative speed.

Every update is a few tensor operations on the device (no per-sample Python); the statistics that
drive them are all-reduced under DDP first, so every rank holds the same state.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.distributed import all_reduce_mean, all_reduce_sum


class ClassWiseTemperature:
    """tau in R^C, clipped to [lo, hi], with the epoch's per-class error-risk sums E[c].

    End of epoch (ABSLD):  g = E - mean(E);  tau <- clip(tau - r g / max|g|, lo, hi).
    A high-risk ("hard") class gets a lower temperature: sharper soft labels, fitted harder.
    `mean=True` divides each class's sum by its number of samples first (the class's mean risk):
    on imbalanced data a sum ranks a small class as easy however badly it is fitted.
    """

    def __init__(
        self, num_classes: int, init: float = 1.0, lo: float = 0.5, hi: float = 5.0, device=None, mean: bool = False
    ):
        self.lo, self.hi, self.mean = lo, hi, mean
        self.tau = torch.full((num_classes,), float(init), device=device)
        self.risk = torch.zeros(num_classes, device=device)
        self.count = torch.zeros(num_classes, device=device)  # samples per class this epoch (for `mean`)

    def per_sample(self, y: torch.Tensor) -> torch.Tensor:
        """Each sample's temperature, gathered by its label."""
        return self.tau[y]

    @torch.no_grad()
    def accumulate(self, losses: torch.Tensor, y: torch.Tensor) -> None:
        self.risk.index_add_(0, y, losses.detach().float())
        if self.mean:
            self.count.index_add_(0, y, torch.ones_like(losses, dtype=torch.float32))

    @torch.no_grad()
    def update(self, rate: float) -> None:
        risk = all_reduce_sum(self.risk.clone())
        if self.mean:  # a class without samples this epoch has no risk to compare: the mean of the others
            count = all_reduce_sum(self.count.clone())
            seen = count > 0
            risk = torch.where(seen, risk / count.clamp_min(1), (risk[seen] / count[seen]).mean())
        gap = risk - risk.mean()
        largest = gap.abs().max()
        if largest > 0:  # all classes equally at risk: nothing to correct
            self.tau = (self.tau - rate * gap / largest).clamp(self.lo, self.hi)
        self.risk.zero_()
        self.count.zero_()

    def state_dict(self) -> dict:
        state = {"tau": self.tau.clone(), "risk": self.risk.clone()}
        return state | ({"count": self.count.clone()} if self.mean else {})

    def load_state_dict(self, state: dict) -> None:
        self.tau = state["tau"].to(self.tau.device).float()
        self.risk = state["risk"].to(self.risk.device).float()
        if "count" in state:
            self.count = state["count"].to(self.count.device).float()


def negative_entropy(q: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Mean over batch and classes of q log q (the form the B-MTARD reference uses); with `eps`,
    of q log(q + eps) (CIARD's code)."""
    return torch.xlogy(q, q).mean() if eps == 0 else (q * torch.log(q + eps)).mean()


class EntropyBalance:
    """Scalar temperatures (tau_adv, tau_nat), init 1, clipped to [lo, hi] (B-MTARD's EBB).

    tau_adv <- tau_adv - eta sign(H_adv / H_nat - 1),  tau_nat <- tau_nat - eta sign(H_nat / H_adv - 1)
    with H the negative entropies: the teacher with the smoother (higher-entropy) soft labels is
    sharpened and the other smoothed, until both carry equally hard knowledge.
    """

    def __init__(self, init: float = 1.0, lo: float = 1.0, hi: float = 10.0, device=None):
        self.lo, self.hi = lo, hi
        self.tau = torch.full((2,), float(init), device=device)  # (adv, nat)
        self._observed: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None

    @torch.no_grad()
    def observe(self, q_adv: torch.Tensor, q_nat: torch.Tensor, count: int, eps: float = 0.0) -> None:
        """This step's two targets (over `count` samples): their entropies (`negative_entropy`, with
        `eps`), for `apply_observed` at the step's end: the new temperatures act from the next step."""
        self._observed = (negative_entropy(q_adv, eps), negative_entropy(q_nat, eps), count)

    def apply_observed(self, eta: float) -> None:
        """`update` with the step's observed entropies at rate `eta` (nothing observed: nothing moves)."""
        if self._observed is not None:
            h_adv, h_nat, count = self._observed
            self.update(h_adv, h_nat, eta, count)
            self._observed = None

    @torch.no_grad()
    def update(self, h_adv: torch.Tensor, h_nat: torch.Tensor, eta: float, count: Optional[int] = None) -> None:
        """`h_adv`, `h_nat`: this rank's batch means, over `count` samples (under DDP the global
        batch's are their mean weighted by each rank's count)."""
        h = all_reduce_mean(torch.stack([h_adv, h_nat]).detach().float(), count)
        step = torch.stack([torch.sign(h[0] / h[1] - 1), torch.sign(h[1] / h[0] - 1)])
        self.tau = (self.tau - eta * step).clamp(self.lo, self.hi)

    def state_dict(self) -> dict:
        return {"tau": self.tau.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.tau = state["tau"].to(self.tau.device).float()


class LossBalance:
    """Loss weights w (sum 1, each >= 0), init uniform (MTARD/B-MTARD's NLB).

    With L^0 the losses of the first step:  l_k = L_k / L_k^0,  r_k = l_k / mean(l),
    w_k <- w_k - eta (w_k - r_k / sum(r)); clip at 0; renormalise. The objective that has
    decreased least (relatively) gets more weight.
    """

    def __init__(self, count: int = 2, device=None):
        self.w = torch.full((count,), 1.0 / count, device=device)
        self.initial: Optional[torch.Tensor] = None

    @torch.no_grad()
    def update(self, losses: torch.Tensor, eta: float, count: Optional[int] = None) -> None:
        """`losses`: this rank's batch means, over `count` samples (as `EntropyBalance.update`)."""
        losses = all_reduce_mean(losses.detach().float().clone(), count)
        if self.initial is None:
            self.initial = losses.clone()
        relative = losses / self.initial
        ratio = relative / relative.mean()
        w = (self.w - eta * (self.w - ratio / ratio.sum())).clamp_min(0)
        self.w = w / w.sum()

    def state_dict(self) -> dict:
        state = {"w": self.w.clone()}
        if self.initial is not None:
            state["initial"] = self.initial.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"].to(self.w.device).float()
        self.initial = state["initial"].to(self.w.device).float() if "initial" in state else None
