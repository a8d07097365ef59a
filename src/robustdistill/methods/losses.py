"""Distillation losses and their reductions.

`kl_div(q, logits)` is KL(q || softmax(logits)) with q a target distribution. Reductions:

- `elementwise_mean` (default of the seed methods and RSLAD): the mean over all B x C terms of
  q * (log(q + 1e-5) - log p), i.e. the per-sample KL averaged over the batch *and divided by C*,
  with the 1e-5 inside the log as in the published code. Published numbers used this;
- `mean`: the exact KL terms averaged over all B x C entries (torch's `KLDivLoss()` default, which
  ARD, IAD-era and AdaAD's CIFAR-10 code use): `batchmean` / C without RSLAD's 1e-5;
- `batchmean`: the exact per-sample KL summed over classes and averaged over the batch;
- `sum`: the exact KL summed over the batch (what an attack maximises);
- `none`: the exact per-sample KL, shape (B,), for methods that weight samples (IAD, Fair-ARD, FRL).

Reduction conventions changed published numbers in earlier ARD work, so it is an explicit option.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["elementwise_mean", "mean", "batchmean", "sum", "none"]
REDUCTIONS = ("elementwise_mean", "mean", "batchmean", "sum", "none")


def kl_terms(q: torch.Tensor, logits: torch.Tensor, reduction: Reduction = "batchmean") -> torch.Tensor:
    """The (B, C) terms every reduction sums or averages: q (log(q + 1e-5) - log p) for
    `elementwise_mean` (the published code's form), the exact q log q - q log p otherwise."""
    log_p = F.log_softmax(logits.float(), dim=1)
    q = q.float()
    if reduction == "elementwise_mean":
        return q * (torch.log(q + 1e-5) - log_p)
    return torch.xlogy(q, q) - q * log_p


def kl_div(q: torch.Tensor, logits: torch.Tensor, reduction: Reduction = "elementwise_mean") -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown KL reduction '{reduction}'; use one of {', '.join(REDUCTIONS)}")
    terms = kl_terms(q, logits, reduction)
    if reduction in ("elementwise_mean", "mean"):
        return terms.mean()
    if reduction == "batchmean":
        return terms.sum() / q.shape[0]
    if reduction == "sum":
        return terms.sum()
    return terms.sum(dim=1)  # none


def kl_per_sample(q: torch.Tensor, logits: torch.Tensor, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Each sample's share of `kl_div(q, logits, reduction)`, shape (B,): its mean over the batch is
    that reduction's value (`elementwise_mean`, `mean`, `batchmean`), so per-sample weights (SAAD)
    can weigh a term in any method's own convention."""
    if reduction not in ("elementwise_mean", "mean", "batchmean", "none"):
        raise ValueError(
            f"no per-sample share for the KL reduction '{reduction}'; use elementwise_mean, mean or batchmean"
        )
    terms = kl_terms(q, logits, reduction)
    return terms.mean(dim=1) if reduction in ("elementwise_mean", "mean") else terms.sum(dim=1)


def soft_targets(logits: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """softmax(z / tau); `temperature` is a scalar or a per-sample column (B,) / (B, 1)."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() == 1:
        temperature = temperature[:, None]
    return F.softmax(logits.float() / temperature, dim=1)
