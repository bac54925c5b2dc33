"""Reconstruction-only SAE evaluation: L0, fraction of variance unexplained, dead and dense latents.

(Splicing the SAE into a model for CE loss recovered and KL lives in ``workbench.sae.evaluate``.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.errors import DataError
from workbench.sae.model import SAE


def dead_fraction(fire_counts: Float[Tensor, " d_sae"]) -> float:
    """Fraction of latents that never fired."""
    return float((fire_counts == 0).double().mean())


def dense_fraction(density: Float[Tensor, " d_sae"], threshold: float = 0.1) -> float:
    """Fraction of latents firing on more than ``threshold`` of the tokens."""
    return float((density > threshold).double().mean())


@dataclass
class ReconstructionMetrics:
    """How well an SAE reconstructs a set of activations, and how its latents are used."""

    n_tokens: int
    """Rows evaluated."""
    l0: float
    """Mean active latents per row."""
    fvu: float
    """Fraction of variance unexplained (1 - explained variance), over all rows together."""
    mse: float
    """Mean over rows of the squared error summed over d_in (input units)."""
    dead_fraction: float
    """Latents that never fired on these rows."""
    dense_fraction: float
    """Latents firing on more than ``dense_threshold`` of the rows."""
    dense_threshold: float
    feature_density: Tensor
    """Fraction of rows each latent fired on [d_sae]."""

    def summary(self) -> dict[str, float]:
        """The scalar fields, for JSON."""
        return {
            "n_tokens": self.n_tokens,
            "l0": self.l0,
            "fvu": self.fvu,
            "explained_variance": 1.0 - self.fvu,
            "mse": self.mse,
            "dead_fraction": self.dead_fraction,
            "dense_fraction": self.dense_fraction,
            "dense_threshold": self.dense_threshold,
        }


@torch.no_grad()
def evaluate_reconstruction(
    sae: SAE,
    batches: Iterable[Tensor],
    *,
    max_batches: int | None = None,
    dense_threshold: float = 0.1,
) -> ReconstructionMetrics:
    """Run ``sae`` over ``[batch, d_in]`` activation batches and return its reconstruction metrics.

    Statistics are accumulated in float64 over all rows, so the FVU is that of the whole set,
    not an average of per-batch ratios.
    """
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    device = sae.device
    fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    sum_err = torch.zeros((), dtype=torch.float64, device=device)
    sum_active = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    was_training = sae.training
    sae.eval()
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        sae.check_input(x)
        x = x.to(device).reshape(-1, d_in)
        if not torch.isfinite(x).all():
            raise DataError(f"activation batch {i} holds NaN/Inf values; the source is corrupt")
        out = sae(x)
        active = out.latents != 0
        fires += active.sum(0)
        sum_active += active.sum()
        xd = x.double()
        sum_x += xd.sum(0)
        sum_sq += xd.pow(2).sum()
        sum_err += (xd - out.x_hat.double()).pow(2).sum()
        n += x.shape[0]
    sae.train(was_training)
    if n == 0:
        raise DataError("no activations to evaluate on: the batch source was empty")
    total_var = sum_sq - sum_x.pow(2).sum() / n
    density = (fires / n).float().cpu()
    return ReconstructionMetrics(
        n_tokens=n,
        l0=float(sum_active / n),
        fvu=float(sum_err / total_var) if total_var > 0 else float("nan"),
        mse=float(sum_err / n),
        dead_fraction=dead_fraction(density),
        dense_fraction=dense_fraction(density, dense_threshold),
        dense_threshold=dense_threshold,
        feature_density=density,
    )
