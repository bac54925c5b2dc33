"""Toy models of superposition (Elhage et al. 2022) and the synthetic ground-truth benchmark.

The toy models are trained for real (about a second each, one thread): the geometry they settle
into is the property under test, not a hard-coded layout.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.analysis.superposition import (
    PHASE_NAMES,
    SyntheticConfig,
    SyntheticFeatures,
    ToyConfig,
    ToyTrainConfig,
    mmcs,
    phase_diagram,
    random_dictionary_mmcs,
    toy_geometry,
    train_toy_model,
)
from workbench.errors import ConfigError

FAST = ToyTrainConfig(steps=1500, batch_size=256, lr=1e-2, seed=1)
#: Slightly decaying importance (as in the paper's figure): with equal importances the dense
#: optimum is any rank-2 projection, so "which two features" would be undetermined.
IMPORTANCE = 0.9 ** torch.arange(5.0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def five_in_two():
    """One ReLU toy model per regime: instance 0 dense (every feature always present), 1 sparse."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ToyConfig(n_features=5, d_hidden=2, n_instances=2)
        return train_toy_model(cfg, torch.tensor([[1.0], [0.02]]), IMPORTANCE, FAST)
    finally:
        torch.set_num_threads(before)


def _polar_gaps(W: torch.Tensor) -> torch.Tensor:
    """Angles (degrees) between circularly adjacent feature directions in a 2-d hidden space."""
    theta = torch.sort(torch.atan2(W[1], W[0])).values
    return torch.rad2deg(torch.diff(torch.cat([theta, theta[:1] + 2 * math.pi])))


def test_dense_features_get_two_orthogonal_dimensions(five_in_two):
    geo = toy_geometry(five_in_two)
    norms = geo.norms[0]
    assert int(geo.n_represented[0]) == 2
    # the two most important features, each with a whole dimension ...
    torch.testing.assert_close(norms[:2], torch.ones(2), atol=0.05, rtol=0)
    assert (norms[2:] < 0.2).all(), norms
    assert abs(float(geo.angles[0, 0, 1]) - 90.0) < 3.0
    torch.testing.assert_close(geo.fractional_dimensionality[0, :2], torch.ones(2), atol=0.05, rtol=0)
    # ... and no superposition: about one dimension per feature represented
    assert float(geo.interference[0, :2].max()) < 0.05
    assert 0.95 < float(geo.dimensions_per_feature[0]) < 1.1


def test_sparse_features_form_a_pentagon(five_in_two):
    geo = toy_geometry(five_in_two)
    norms = geo.norms[1]
    assert int(geo.n_represented[1]) == 5
    assert ((norms > 0.9) & (norms < 1.3)).all(), norms
    gaps = _polar_gaps(five_in_two.W.detach()[1])
    torch.testing.assert_close(gaps, torch.full((5,), 72.0), atol=4.0, rtol=0)
    # each corner's nearest neighbours sit at 72 degrees, the other two at 144
    angles = geo.angles[1].sort(-1).values  # [feature, 5]: 0 (itself), 72, 72, 144, 144
    torch.testing.assert_close(angles[:, 1:], torch.tensor([72.0, 72, 144, 144]).expand(5, 4), atol=5.0, rtol=0)
    # a pentagon's corner has 2/5 of a dimension (Elhage et al.'s fractional dimensionality)
    torch.testing.assert_close(geo.fractional_dimensionality[1], torch.full((5,), 0.4), atol=0.03, rtol=0)
    assert float(geo.dimensions_per_feature[1]) < 0.4
    # the ReLU filters the interference: the biases are negative
    assert (five_in_two.b.detach()[1] < 0).all()


def test_linear_model_never_represents_more_features_than_dimensions():
    cfg = ToyConfig(n_features=5, d_hidden=2, n_instances=3, nonlinear=False)
    # importance decays faster than above: the linear model's dense optimum converges slowly
    # when the second and third features are nearly as important
    model = train_toy_model(cfg, torch.tensor([[1.0], [0.1], [0.02]]), 0.8 ** torch.arange(5.0), FAST)
    geo = toy_geometry(model)
    assert geo.n_represented.tolist() == [2, 2, 2]  # however sparse the features
    assert (geo.norms[:, :2] > 0.95).all() and (geo.norms[:, 2:] < 0.1).all(), geo.norms
    # W^T W is (at most) a rank-2 projection: eigenvalues <= 1, total squared norm <= d_hidden
    gram = torch.einsum("ihf,ihg->ifg", model.W.detach(), model.W.detach())
    assert (torch.linalg.eigvalsh(gram) < 1.01).all()
    assert (model.W.detach().pow(2).sum((1, 2)) < 2.02).all()
    assert (geo.dimensions_per_feature > 0.99).all()


def test_phase_diagram_corners():
    """One extra feature beside one of importance 1, in one dimension (Elhage et al. fig. 5)."""
    pd = phase_diagram(torch.tensor([0.1, 3.0]), torch.tensor([1.0, 0.03]), train=FAST)
    assert pd.phase.shape == (2, 2) and pd.norms.shape == (2, 2, 2)
    # dense: the dimension goes to the more important feature, alone
    assert int(pd.phase[0, 0]) == 0 and int(pd.phase[0, 1]) == 1
    assert float(pd.norms[0, 0, 0]) > 0.95 and float(pd.norms[0, 1, 0]) < 0.1
    # sparse: both share it, antipodally
    assert pd.phase[1].tolist() == [2, 2]
    assert PHASE_NAMES[2] == "superposition"


def test_toy_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="at least 1"):
        ToyConfig(n_features=0)
    with pytest.raises(ConfigError, match="importance has shape"):
        train_toy_model(ToyConfig(n_features=5), 0.1, torch.ones(3), ToyTrainConfig(steps=1))


# -- the synthetic ground-truth benchmark -----------------------------------------------------


def test_synthetic_features_are_sparse_and_seekable():
    data = SyntheticFeatures(SyntheticConfig(d_in=64, n_features=128, mean_active=3.0, seed=4))
    torch.testing.assert_close(data.features.norm(dim=-1), torch.ones(128))
    x = data.global_batch(0, 20_000)
    # E||x||^2 = mean_active * E[m^2] for m ~ U[0.5, 1.5], plus small cross terms
    assert 3.0 < float(x.pow(2).sum(-1).mean()) < 3.5
    rare = SyntheticFeatures(SyntheticConfig(d_in=64, n_features=128, mean_active=0.5, seed=4))
    x = rare.global_batch(0, 4000)
    zero = x.norm(dim=-1) == 0
    assert abs(float(zero.float().mean()) - math.exp(-0.5)) < 0.03  # P(no feature present)
    cos = (x[~zero] / x[~zero].norm(dim=-1, keepdim=True)) @ rare.features.T
    single = cos.max(-1).values > 1 - 1e-5  # rows made of exactly one true feature
    assert abs(float(single.float().mean()) - 0.5 * math.exp(-0.5) / (1 - math.exp(-0.5))) < 0.04
    # the global batch of a step is the same however many processes split it
    whole = next(data.batches(32, start=5))
    halves = [next(data.batches(16, start=5, rank=r, world_size=2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    assert torch.equal(next(data.batches(32, start=6)), data.global_batch(6, 32))
    assert not torch.equal(data.global_batch(6, 32), whole)
    with pytest.raises(ConfigError, match="mean_active"):
        SyntheticConfig(mean_active=0)


def test_mmcs_against_known_dictionaries():
    data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=24, seed=0))
    truth = data.features
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    assert mmcs(3.0 * truth[perm], truth) == pytest.approx(1.0)  # order and scale do not matter
    # drop one feature: it scores its best cosine with the others
    best_other = float((truth[0] @ truth[1:].T).max())
    assert mmcs(truth[1:], truth) == pytest.approx((23 + best_other) / 24, abs=1e-6)
    # the opposite direction is not the feature
    assert mmcs(-truth, truth) < 0.5
    baseline = random_dictionary_mmcs(256, SyntheticFeatures().features)
    assert 0.3 < baseline < 0.6  # a random 256-word dictionary in 64 dims
