"""Autograd kernels of SAE training: the sparse products of TopK and JumpReLU's straight-through estimators.

TopK and BatchTopK training never multiply by the dense ``[batch, d_sae]`` latent matrix: after the
encoder's one dense forward matmul, the decoder, the encoder's gradient and the AuxK loss touch only
the active latents of each row (``k`` for TopK, any number for BatchTopK), through gather and
sparse-matrix (CSR) products over a :class:`SparsePattern`. JumpReLU's threshold gets its gradient
from a rectangle-kernel pseudo-derivative (Rajamanoharan et al. 2024). ``workbench.sae.train`` builds its losses
from these.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from workbench.sae.model import SAE

# ---------------------------------------------------------------------------------------------
# Sparse kernels for TopK: only k latents per row are ever touched after the encoder matmul.
# ---------------------------------------------------------------------------------------------


class SparsePattern(NamedTuple):
    """Which latents each row uses, in the two layouts the sparse products need.

    TopK gives every row ``k`` entries; BatchTopK a different number per row. Values travel as
    ``[batch, k]`` (TopK) or flat ``[entries]`` (BatchTopK), in this pattern's entry order either way."""

    columns: Int[Tensor, " entries"]
    """Latent index of each active entry, rows in order and sorted within each row."""
    rows: Int[Tensor, " entries"]
    """Batch row of each entry."""
    crow: Int[Tensor, " batch_plus_1"]
    """CSR row pointers of the [batch, d_sae] matrix."""
    order: Int[Tensor, " entries"]
    """Permutation sorting the entries by latent: the transposed matrix's order."""
    crow_t: Int[Tensor, " d_sae_plus_1"]
    """CSR row pointers of the transposed [d_sae, batch] matrix."""
    rows_t: Int[Tensor, " entries"]
    """Batch row of each entry in transposed order."""
    d_sae: int

    @property
    def batch(self) -> int:
        return self.crow.shape[0] - 1


def make_pattern(indices: Int[Tensor, "batch k"], d_sae: int) -> SparsePattern:
    """Return the CSR layouts of a [batch, d_sae] matrix with the given k entries a row (sorted within each row)."""
    batch, k = indices.shape
    rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
    crow = torch.arange(0, batch * k + 1, k, device=indices.device)
    return _pattern(indices.reshape(-1), rows, crow, d_sae)


def pattern_of_entries(flat_indices: Int[Tensor, " entries"], batch: int, d_sae: int) -> SparsePattern:
    """Return the pattern of the entries at ``flat_indices`` (``row * d_sae + latent``, ascending) of a
    [batch, d_sae] matrix: any number of entries per row."""
    rows = flat_indices // d_sae
    crow = torch.zeros(batch + 1, dtype=torch.long, device=flat_indices.device)
    crow[1:] = torch.bincount(rows, minlength=batch).cumsum(0)
    return _pattern(flat_indices % d_sae, rows, crow, d_sae)


def _pattern(columns: Tensor, rows: Tensor, crow: Tensor, d_sae: int) -> SparsePattern:
    # int32 keys: torch's stable CPU argsort of 131k int64 keys takes ~200 ms, of int32 ~1 ms
    order = torch.argsort(columns.to(torch.int32), stable=True)
    crow_t = torch.zeros(d_sae + 1, dtype=torch.long, device=columns.device)
    crow_t[1:] = torch.bincount(columns, minlength=d_sae).cumsum(0)
    return SparsePattern(columns, rows, crow, order, crow_t, rows[order], d_sae)


def _csr(pattern: SparsePattern, values: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            pattern.crow, pattern.columns, values.reshape(-1),
            size=(pattern.batch, pattern.d_sae), check_invariants=False,
        )


def _csr_t(pattern: SparsePattern, values: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(
            pattern.crow_t, pattern.rows_t, values.reshape(-1)[pattern.order],
            size=(pattern.d_sae, pattern.batch), check_invariants=False,
        )


def scatter_sum(pattern: SparsePattern, values: Tensor) -> Float[Tensor, " d_sae"]:
    """Return the sum of ``values`` per latent."""
    out = values.new_zeros(pattern.d_sae)
    return out.index_add_(0, pattern.columns, values.reshape(-1))


def _gather_rows(x: Float[Tensor, "batch d_in"], pattern: SparsePattern, grad: Tensor) -> Tensor:
    """Return ``M^T @ x`` for the sparse ``M`` holding ``grad`` at the pattern: [d_sae, d_in]."""
    if not x.is_cuda:
        return _csr_t(pattern, grad) @ x
    # On GPUs index_add over rows is as fast as cuSPARSE and deterministic enough.
    contrib = grad.reshape(-1, 1) * x[pattern.rows]
    return x.new_zeros(pattern.d_sae, x.shape[-1]).index_add_(0, pattern.columns, contrib)


class _EncodeAt(torch.autograd.Function):
    """Pre-activations at the pattern's entries, with gradients touching only those entries.

    The values come from the dense forward matmul (done once, without autograd); the backward
    returns gradients for ``b_dec`` (through the centred input), ``W_enc`` and ``b_enc``.
    """

    @staticmethod
    def forward(ctx, x_c, b_dec, W_enc, b_enc, values, pattern, apply_b_dec):  # noqa: ARG004
        ctx.save_for_backward(x_c, W_enc)
        ctx.pattern = pattern
        ctx.apply_b_dec = apply_b_dec
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc = ctx.saved_tensors
        pattern = ctx.pattern
        grad = grad.contiguous()
        grad_b_enc = scatter_sum(pattern, grad)
        grad_W_enc = _gather_rows(x_c, pattern, grad).T if ctx.needs_input_grad[2] else None
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.apply_b_dec and ctx.needs_input_grad[1] else None
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None


class _DecodeSparse(torch.autograd.Function):
    """``sum_j values[b, j] * W_dec[indices[b, j]]``, gradients only for the rows used."""

    @staticmethod
    def forward(ctx, values, W_dec, pattern):
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return F.embedding_bag(pattern.columns, W_dec, pattern.crow[:-1], per_sample_weights=values.reshape(-1),
                               mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec = ctx.saved_tensors
        pattern = ctx.pattern
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            if grad_out.is_cuda:  # [entries d_out] gathers: fine in GPU memory
                grad_values = (W_dec[pattern.columns] * grad_out[pattern.rows]).sum(-1).view_as(values)
            else:
                sampled = torch.sparse.sampled_addmm(_csr(pattern, values), grad_out, W_dec.T, beta=0.0)
                grad_values = sampled.values().view_as(values)
        if ctx.needs_input_grad[1]:
            grad_W_dec = _gather_rows(grad_out, pattern, values)
        return grad_values, grad_W_dec, None


def decode_sparse(values: Tensor, W_dec: Float[Tensor, "d_sae d_out"], pattern: SparsePattern) -> Tensor:
    """Return ``sum_j values[b, j] * W_dec[indices[b, j]]`` ``[batch, d_out]``, differentiable in both
    (the decoder's gradient touches only the rows used)."""
    return _DecodeSparse.apply(values, W_dec, pattern)


def topk_pattern(pre: Float[Tensor, "batch d_sae"], k: int) -> tuple[Tensor, SparsePattern]:
    """Return the top-k pre-activation values per row (sorted by latent index) and their pattern."""
    top = pre.topk(k, dim=-1, sorted=False)
    indices, perm = top.indices.sort(dim=-1)
    return top.values.gather(-1, perm), make_pattern(indices, pre.shape[-1])


def batchtopk_pattern(pre: Float[Tensor, "batch d_sae"], k: int) -> tuple[Float[Tensor, " entries"], SparsePattern]:
    """Return BatchTopK's active pre-activations (the ``k * batch`` largest over the batch that are positive,
    flat, in pattern order) and their pattern: :func:`workbench.sae.model.batch_topk`'s selection without a
    dense result."""
    flat = pre.reshape(-1)
    top = largest_entries(flat, min(k * pre.shape[0], flat.numel()))
    kept = top[flat[top] > 0].sort().values
    return flat[kept], pattern_of_entries(kept, pre.shape[0], pre.shape[1])


def largest_entries(flat: Float[Tensor, " n"], n_keep: int) -> Int[Tensor, " n_keep"]:
    """Return the indices of the ``n_keep`` largest entries of ``flat`` (unordered), as ``flat.topk`` would.

    ``topk`` over a whole batch's pre-activations (18.7M entries at SmolLM2's shape, 130k kept) is
    slower than the encoder's matmul on a CPU. A threshold read off a strided sample keeps about twice
    ``n_keep`` candidates in one comparison pass, and the exact topk runs among those; when the sample
    misjudges and fewer than ``n_keep`` pass, the full topk runs instead, so the result is always exact."""
    n = flat.numel()
    if n < 1 << 16 or n_keep * 8 > n:
        return flat.topk(n_keep, sorted=False).indices
    sample = flat[:: n // 65536]
    m = min(sample.numel(), int(2 * n_keep / n * sample.numel()) + 64)
    candidates = (flat >= sample.topk(m, sorted=False).values.min()).nonzero().squeeze(1)
    if candidates.numel() < n_keep:
        return flat.topk(n_keep, sorted=False).indices
    return candidates[flat[candidates].topk(n_keep, sorted=False).indices]


def values_at(x_c: Float[Tensor, "batch d_in"], W_enc: Float[Tensor, "d_in d_sae"], b_enc: Float[Tensor, " d_sae"],
              pattern: SparsePattern) -> Float[Tensor, " entries"]:
    """Return ``x_c @ W_enc + b_enc`` at the pattern's entries only (flat, in pattern order), in ``x_c``'s dtype.

    The training step picks its latents from a bfloat16 matmul when asked to
    (``SAETrainConfig.precision``); this gives the chosen entries their exact values (k·batch dot products
    instead of a second dense matmul)."""
    if x_c.is_cuda:  # [entries, d_in] gathers: fine in GPU memory (as the decoder's backward does there)
        return (x_c[pattern.rows] * W_enc.T[pattern.columns]).sum(-1) + b_enc[pattern.columns]
    sampled = torch.sparse.sampled_addmm(_csr(pattern, b_enc[pattern.columns]), x_c, W_enc, beta=1.0)
    return sampled.values()


def encode_at(sae: SAE, x_c: Tensor, values: Tensor, pattern: SparsePattern) -> Tensor:
    """Differentiable pre-activations at ``pattern`` (values precomputed densely)."""
    return _EncodeAt.apply(
        x_c, sae.b_dec, sae.W_enc, sae.b_enc, values, pattern, sae.cfg.apply_b_dec_to_input
    )


# ---------------------------------------------------------------------------------------------
# JumpReLU's straight-through estimators (Rajamanoharan et al. 2024).
# ---------------------------------------------------------------------------------------------


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        pseudo = -(threshold / bw) * _rectangle((pre - threshold) / bw)
        grad_threshold = (grad * pseudo).reshape(-1, pre.shape[-1]).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        pseudo = -(1.0 / bw) * _rectangle((pre - threshold) / bw)
        return None, (grad * pseudo).reshape(-1, pre.shape[-1]).sum(0), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Return ``pre * (pre > threshold)``; the threshold's gradient is the rectangle pseudo-derivative."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def jumprelu_step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Return the L0 indicator ``pre > threshold`` (as pre's dtype), with the threshold's pseudo-gradient."""
    return _Step.apply(pre, threshold, bandwidth)
