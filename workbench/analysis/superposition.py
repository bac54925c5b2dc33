"""Toy models of superposition (Elhage et al. 2022) and a ground-truth benchmark for SAEs.

Toy model: ``n_features`` sparse features squeezed through ``d_hidden`` dimensions and read back,
``x_hat = ReLU(W^T W x + b)`` (or without the ReLU: the linear model). Each feature is zero with
probability ``1 - p`` and uniform in [0, 1] otherwise; the loss weighs feature i's error by its
importance. Many independent models ("instances", one per sparsity or importance) train at once.

Synthetic benchmark: ``n_features`` random unit directions in ``d_in`` dimensions, a few active per
sample; an SAE trained on the samples is scored by the mean max cosine similarity (MMCS) between
each true feature and its closest decoder row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from workbench.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Toy models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    """A batch of independent toy models of superposition."""

    n_features: int = 5
    """Sparse input features."""
    d_hidden: int = 2
    """Hidden dimensions they are squeezed through."""
    n_instances: int = 1
    """Independent models trained together (each with its own sparsity and importance)."""
    nonlinear: bool = True
    """ReLU output (superposition possible) or the linear model W^T W x + b."""

    def __post_init__(self) -> None:
        if min(self.n_features, self.d_hidden, self.n_instances) < 1:
            raise ConfigError(f"toy model sizes must be at least 1, got {self}")


@dataclass(frozen=True)
class ToyTrainConfig:
    """How toy models are trained."""

    steps: int = 4000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0


class ToyModel(nn.Module):
    """``n_instances`` toy models: ``W [instance, d_hidden, feature]``, ``b [instance, feature]``."""

    def __init__(self, cfg: ToyConfig, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)
        W = torch.empty(cfg.n_instances, cfg.d_hidden, cfg.n_features)
        bound = math.sqrt(6 / (cfg.d_hidden + cfg.n_features))  # Xavier, as in the paper's code
        W.uniform_(-bound, bound, generator=generator)
        self.W = nn.Parameter(W)
        self.b = nn.Parameter(torch.zeros(cfg.n_instances, cfg.n_features))

    def forward(self, x: Float[Tensor, "batch instance feature"]) -> Float[Tensor, "batch instance feature"]:
        hidden = torch.einsum("bif,ihf->bih", x, self.W)
        out = torch.einsum("bih,ihf->bif", hidden, self.W) + self.b
        return F.relu(out) if self.cfg.nonlinear else out


def sample_sparse_features(
    batch: int, feature_probability: Float[Tensor, "instance feature"], generator: torch.Generator
) -> Float[Tensor, "batch instance feature"]:
    """Features uniform in [0, 1], each present with its instance's probability."""
    shape = (batch, *feature_probability.shape)
    values = torch.rand(shape, generator=generator)
    present = torch.rand(shape, generator=generator) < feature_probability
    return values * present


def _per_instance(value: Tensor | float, cfg: ToyConfig, name: str) -> Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32)
    try:
        return torch.broadcast_to(tensor, (cfg.n_instances, cfg.n_features)).clone()
    except RuntimeError:
        raise ConfigError(
            f"{name} has shape {tuple(tensor.shape)}; expected a scalar, [n_features="
            f"{cfg.n_features}], [n_instances={cfg.n_instances}, 1] or [n_instances, n_features]"
        ) from None


def train_toy_model(
    cfg: ToyConfig,
    feature_probability: Tensor | float,
    importance: Tensor | float = 1.0,
    train: ToyTrainConfig = ToyTrainConfig(),
) -> ToyModel:
    """Train ``cfg.n_instances`` toy models and return them.

    ``feature_probability`` (1 - sparsity) and ``importance`` broadcast to [instance, feature].
    """
    probability = _per_instance(feature_probability, cfg, "feature_probability")
    weight = _per_instance(importance, cfg, "importance")
    model = ToyModel(cfg, seed=train.seed)
    generator = torch.Generator().manual_seed(train.seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    for _ in range(train.steps):
        x = sample_sparse_features(train.batch_size, probability, generator)
        loss = (weight * (x - model(x)).pow(2)).mean(0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


class ToyGeometry(NamedTuple):
    """How a toy model lays its features out in the hidden space (Elhage et al. 2022)."""

    norms: Float[Tensor, "instance feature"]
    """||W_i||: about 1 for a represented feature, about 0 for an ignored one."""
    fractional_dimensionality: Float[Tensor, "instance feature"]
    """D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2: 1 for a dedicated dimension, 1/2 for an antipodal
    pair, 2/5 for a pentagon's corner."""
    dimensions_per_feature: Float[Tensor, " instance"]
    """d_hidden / ||W||_F^2: 1 without superposition, below 1 with it."""
    interference: Float[Tensor, "instance feature"]
    """sum_{j != i} (W^_i . W_j)^2: how much other features leak into feature i's direction."""
    angles: Float[Tensor, "instance feature feature"]
    """Angles between feature directions, in degrees (NaN where a feature has no direction)."""
    n_represented: Tensor
    """Features with norm above 0.5, per instance."""


@torch.no_grad()
def toy_geometry(model: ToyModel, represented_norm: float = 0.5) -> ToyGeometry:
    """Return the geometry of each instance's feature directions."""
    W = model.W.detach()  # [instance, d_hidden, feature]
    norms = W.norm(dim=1)
    unit = W / norms[:, None, :].clamp_min(1e-8)
    overlap = torch.einsum("ihf,ihg->ifg", unit, W).pow(2)  # (W^_f . W_g)^2
    eye = torch.eye(model.cfg.n_features, dtype=torch.bool)
    fractional = norms.pow(2) / overlap.sum(-1).clamp_min(1e-12)
    interference = overlap.masked_fill(eye, 0.0).sum(-1)
    cosine = torch.einsum("ihf,ihg->ifg", unit, unit).clamp(-1, 1)
    angles = torch.rad2deg(torch.arccos(cosine))
    dead = norms < 1e-3
    angles = angles.masked_fill(dead[:, :, None] | dead[:, None, :], math.nan)
    return ToyGeometry(
        norms=norms,
        fractional_dimensionality=fractional,
        dimensions_per_feature=model.cfg.d_hidden / W.pow(2).sum(dim=(1, 2)),
        interference=interference,
        angles=angles,
        n_represented=(norms > represented_norm).sum(-1),
    )


class PhaseDiagram(NamedTuple):
    """Where one extra feature is ignored, gets a dimension, or shares one (Elhage et al. fig. 5)."""

    relative_importance: Float[Tensor, " importance"]
    """Importance of the extra feature relative to the first (x axis)."""
    feature_density: Float[Tensor, " density"]
    """Probability each feature is present (y axis; 1 - sparsity)."""
    phase: Tensor
    """[density, importance]: 0 extra feature ignored, 1 it gets the dimension alone,
    2 both features share it (superposition)."""
    norms: Float[Tensor, "density importance feature"]
    """Feature norms of each trained model."""


PHASE_NAMES = ("not represented", "dedicated dimension", "superposition")


def phase_diagram(
    relative_importance: Tensor,
    feature_density: Tensor,
    *,
    n_features: int = 2,
    d_hidden: int = 1,
    train: ToyTrainConfig = ToyTrainConfig(),
    restarts: int = 1,
) -> PhaseDiagram:
    """Train one toy model per (density, importance) pair, all at once, and classify each.

    With ``restarts`` > 1 each cell is trained that many times from different initialisations and
    the model with the lowest loss (on a fresh batch) is kept, as Elhage et al. do: sparse cells
    otherwise land in a local optimum often enough to speckle the diagram.
    """
    if restarts < 1:
        raise ConfigError(f"restarts={restarts} must be at least 1")
    imp = torch.as_tensor(relative_importance, dtype=torch.float32)
    dens = torch.as_tensor(feature_density, dtype=torch.float32)
    grid_d, grid_i = torch.meshgrid(dens, imp, indexing="ij")
    n = grid_d.numel()
    cfg = ToyConfig(n_features=n_features, d_hidden=d_hidden, n_instances=n * restarts)
    importance = torch.ones(n, n_features)
    importance[:, -1] = grid_i.reshape(-1)  # the last feature is the "extra" one
    importance = importance.repeat(restarts, 1)  # instance r * n + c is restart r of cell c
    probability = grid_d.reshape(-1, 1).repeat(restarts, 1)
    model = train_toy_model(cfg, probability, importance, train)
    with torch.no_grad():
        # every feature of an instance has the cell's density (training broadcasts it the same way)
        x = sample_sparse_features(16 * train.batch_size, probability.expand(-1, n_features),
                                   torch.Generator().manual_seed(train.seed + 2))
        loss = (importance * (x - model(x)).pow(2)).mean(0).sum(-1).view(restarts, n)
    best = loss.argmin(0) * n + torch.arange(n)
    norms = toy_geometry(model).norms[best]
    extra = norms[:, -1] > 0.5
    others = (norms[:, :-1] > 0.5).any(-1)
    phase = torch.where(extra & others, 2, torch.where(extra, 1, 0))
    return PhaseDiagram(imp, dens, phase.reshape(grid_d.shape), norms.reshape(*grid_d.shape, n_features))


# ---------------------------------------------------------------------------------------------
# Synthetic ground truth for SAEs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Activations built from known sparse features in superposition."""

    d_in: int = 64
    """Width of the activations."""
    n_features: int = 128
    """True features (more than d_in: they must be in superposition)."""
    mean_active: float = 3.0
    """Expected number of features present per sample."""
    min_magnitude: float = 0.5
    max_magnitude: float = 1.5
    """A present feature's coefficient is uniform in [min_magnitude, max_magnitude]."""
    seed: int = 0
    """Seeds the feature directions and the sample stream."""

    def __post_init__(self) -> None:
        if not 0 < self.mean_active <= self.n_features:
            raise ConfigError(f"mean_active={self.mean_active} must lie in (0, n_features={self.n_features}]")


class SyntheticFeatures:
    """A reproducible stream of ``[batch, d_in]`` samples with known feature directions."""

    def __init__(self, cfg: SyntheticConfig = SyntheticConfig()):
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        features = torch.randn(cfg.n_features, cfg.d_in, generator=generator)
        self.features: Float[Tensor, "feature d_in"] = features / features.norm(dim=-1, keepdim=True)

    def sample(self, n: int, generator: torch.Generator) -> Float[Tensor, "batch d_in"]:
        """Return ``n`` samples drawn with ``generator``."""
        cfg = self.cfg
        present = torch.rand(n, cfg.n_features, generator=generator) < cfg.mean_active / cfg.n_features
        magnitude = torch.empty(n, cfg.n_features).uniform_(cfg.min_magnitude, cfg.max_magnitude, generator=generator)
        return (present * magnitude) @ self.features

    def global_batch(self, step: int, global_batch_size: int) -> Float[Tensor, "batch d_in"]:
        """The batch of ``step``: a pure function of the seed and the step, so runs can seek."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + 1)
        return self.sample(global_batch_size, generator)

    def batches(
        self, batch_size: int, start: int = 0, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Yield this process's ``batch_size`` rows of each global batch from step ``start`` on.

        The global batch of a step is the same however many processes share it, so N processes
        with ``batch_size`` b see exactly the rows one process with batch N*b sees.
        """
        step = start
        while True:
            rows = self.global_batch(step, batch_size * world_size)
            yield rows[rank * batch_size : (rank + 1) * batch_size]
            step += 1


def mmcs(
    learned: Float[Tensor, "latent d_in"], true_features: Float[Tensor, "feature d_in"]
) -> float:
    """Mean over true features of the best cosine similarity with any learned direction."""
    learned = learned.detach().float()
    learned = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    truth = true_features.float() / true_features.float().norm(dim=-1, keepdim=True)
    return float((truth @ learned.T).max(dim=-1).values.mean())


def random_dictionary_mmcs(n_latents: int, features: Tensor, seed: int = 0) -> float:
    """MMCS of a random dictionary of the same size: the score that means nothing was learned."""
    # Salted so that seed 0 does not replay the generator that drew the true features.
    generator = torch.Generator().manual_seed(seed + 7_919_000_001)
    return mmcs(torch.randn(n_latents, features.shape[-1], generator=generator), features)
