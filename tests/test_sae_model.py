"""SAE model: architectures by config, the sparse TopK kernels against dense autograd, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.errors import ConfigError, InputError
from workbench.sae.model import SAE, SAEConfig, batch_topk
from workbench.sae.train import TrainConfig, auxk_loss, compute_losses, topk_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on shared cores


def _sae(arch: str, **kw) -> SAE:
    sae = SAE(SAEConfig(d_in=16, d_sae=48, architecture=arch, k=4, **kw), seed=1)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_topk_gives_exactly_k_latents_the_largest_ones():
    sae = _sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: ReLU cannot drop any of the k
    x = torch.randn(64, 16)
    latents = sae.encode(x)
    assert ((latents != 0).sum(-1) == 4).all()
    chosen = (latents != 0).nonzero()[:, 1].view(64, 4)
    expected = sae.pre_acts(x).topk(4, dim=-1).indices.sort(-1).values
    assert torch.equal(chosen, expected)
    assert (sae.encode(x - 100.0) >= 0).all()


def test_relu_and_jumprelu_latents():
    x = torch.randn(32, 16)
    relu = _sae("relu")
    assert torch.equal(relu.encode(x), F.relu(relu.pre_acts(x)))
    jump = _sae("jumprelu")
    with torch.no_grad():
        jump.threshold.fill_(0.3)
    pre = jump.pre_acts(x)
    lat = jump.encode(x)
    assert torch.equal(lat, pre * (pre > 0.3))
    assert lat[lat != 0].min() > 0.3


def test_batchtopk_keeps_k_per_row_on_average_in_training_and_thresholds_at_inference():
    sae = _sae("batchtopk").train()
    x = torch.randn(50, 16)
    lat = sae.encode(x)
    assert (lat != 0).sum() <= 4 * 50
    assert (lat != 0).sum() >= 4 * 50 - 5  # only exact-zero ReLU outputs can be lost
    assert torch.equal(batch_topk(torch.tensor([[3.0, 1.0], [2.0, 0.5]]), 1), torch.tensor([[3.0, 0.0], [2.0, 0.0]]))
    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    pre = sae.pre_acts(x)
    assert torch.equal(sae.encode(x), pre * (pre > 0.5))


def test_forward_reconstructs_through_leading_dims_and_normalisation():
    sae = _sae("relu", normalize_activations="expected_average_only_in")
    with torch.no_grad():
        sae.norm_scale.fill_(2.5)
    x = torch.randn(3, 5, 16)
    out = sae(x)
    assert out.x_hat.shape == x.shape and out.latents.shape == (3, 5, 48)
    expected = (F.relu((x * 2.5 - sae.b_dec) @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec) / 2.5
    torch.testing.assert_close(out.x_hat, expected)


def test_decode_sparse_matches_dense_decode():
    sae = _sae("topk")
    values, indices = torch.rand(10, 4), torch.randint(0, 48, (10, 4))
    dense = torch.zeros(10, 48).scatter_add_(1, indices, values)
    torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode(dense))


def test_normalize_decoder_keeps_the_function():
    sae = _sae("jumprelu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) + 0.5)
        sae.threshold.fill_(0.05)
    x = torch.randn(20, 16)
    before = sae(x).x_hat
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48))
    torch.testing.assert_close(sae(x).x_hat, before, atol=1e-5, rtol=1e-5)


def test_sparse_topk_gradients_equal_dense_autograd():
    """The gather/CSR kernels give the same loss and gradients as the dense formulation."""
    torch.set_default_dtype(torch.float64)
    try:
        sae = _sae("topk")
        with torch.no_grad():
            sae.norm_scale.fill_(1.3)
        x = torch.randn(32, 16)
        dead = torch.zeros(48, dtype=torch.bool)
        dead[::3] = True
        out = topk_forward(sae, x)
        aux = auxk_loss(sae, out.x_c, out.pre, out.x_n - out.x_hat_n, dead, aux_k=8)
        ((out.x_hat_n - out.x_n).pow(2).sum(-1).mean() + 0.5 * aux).backward()
        sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad()

        x_n = x * sae.norm_scale
        pre = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.topk(4, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        x_hat = acts @ sae.W_dec + sae.b_dec
        dead_pre = pre.masked_fill(~dead, float("-inf")).topk(8, dim=-1)
        aux_acts = torch.zeros_like(pre).scatter(-1, dead_pre.indices, dead_pre.values)
        dense_aux = (aux_acts @ sae.W_dec - (x_n - x_hat).detach()).pow(2).sum(-1).mean()
        ((x_hat - x_n).pow(2).sum(-1).mean() + 0.5 * dense_aux).backward()
        for name, param in sae.named_parameters():
            torch.testing.assert_close(sparse_grads[name], param.grad, rtol=1e-10, atol=1e-10, msg=name)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "topk"])
def test_losses_are_finite_and_differentiable_for_every_architecture(arch):
    sae = _sae(arch).train()
    losses = compute_losses(sae, torch.randn(40, 16), TrainConfig(total_steps=1), 0, torch.ones(48, dtype=torch.bool))
    losses.loss.backward()
    assert torch.isfinite(losses.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sae.parameters())
    assert losses.fired.shape == (48,)


def test_bad_input_and_config_errors_name_the_problem():
    sae = _sae("topk")
    with pytest.raises(InputError, match="d_in=16"):
        sae.encode(torch.randn(4, 17))
    with pytest.raises(InputError, match="floating-point"):
        sae.encode(torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(ConfigError, match="k=99"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", k=99)
    with pytest.raises(ConfigError, match="architecture"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")  # type: ignore[arg-type]
