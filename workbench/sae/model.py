"""Sparse autoencoders: one model class, the architecture chosen by a config field.

    latents = act(((x * norm_scale) - b_dec) @ W_enc + b_enc)
    x_hat   = (latents @ W_dec + b_dec) / norm_scale

Architectures (``SAEConfig.architecture``):

- ``relu``      ReLU latents, trained with an L1 penalty (SAELens' ``standard``).
- ``topk``      the k largest pre-activations per row, ReLU'd (Gao et al. 2024), trained with AuxK.
- ``batchtopk`` the ``k * batch`` largest activations over a whole training batch (Bussmann et al.
                2024); at inference a learned global threshold, so it is saved as SAELens' ``jumprelu``.
- ``jumprelu``  ``relu(pre) * (pre > threshold)`` with a per-latent threshold (Rajamanoharan et al. 2024).

Weights use SAELens' names and shapes (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``) so saving
is a copy, and the decoder rows are kept at unit norm by the trainer.

A *transcoder* is the same class with ``d_out`` set: it reads one activation (an MLP's input,
``blocks.L.mlp.hook_in``) and predicts another (what the MLP writes, ``blocks.L.mlp.hook_out``), so
``W_dec [d_sae, d_out]`` and ``b_dec [d_out]`` live in the output space (and are not subtracted from
the input). With ``skip=True`` a linear term is added (Paulo et al. 2025), zero at the start:

    y_hat = latents @ W_dec + b_dec + x @ W_skip.T          W_skip [d_out, d_in]
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from workbench.errors import ConfigError, InputError

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu"]
Normalization = Literal["none", "expected_average_only_in"]

ARCHITECTURES: tuple[str, ...] = typing.get_args(Architecture)
NORMALIZATIONS: tuple[str, ...] = typing.get_args(Normalization)

#: Keys of SAELens' ``cfg.json`` (6.x, as ``workbench.sae.io`` writes and reads it) that are not SAEConfig fields:
#: :meth:`SAEConfig.from_dict` accepts and drops them.
SAELENS_CFG_KEYS = frozenset({
    "dtype", "device", "metadata", "reshape_activations", "rescale_acts_by_decoder_norm", "hook_name_out",
})


@dataclass(frozen=True)
class SAEConfig:
    """Shape and kind of a sparse autoencoder (training hyperparameters live in ``SAETrainConfig``)."""

    d_in: int
    """Width of the activations it reads (d_model for a residual-stream SAE)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: Architecture = "topk"
    """How latents are chosen; see the module docstring."""
    k: int = 32
    """topk: active latents per row; batchtopk: active latents per row on average over a batch."""
    apply_b_dec_to_input: bool = True
    """Subtract the decoder bias from the input before encoding (the usual choice)."""
    normalize_activations: Normalization = "none"
    """``expected_average_only_in``: scale inputs by one constant so their mean norm is sqrt(d_in)
    (estimated by the trainer; folded into the weights when saved in SAELens' layout)."""
    d_out: int | None = None
    """Width of what it predicts: None for an SAE (it reconstructs its input), the output hook's
    width for a transcoder."""
    skip: bool = False
    """Transcoders only: add a linear skip term ``x @ W_skip.T`` (``W_skip [d_out, d_in]``, zero-initialised)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"SAE architecture {self.architecture!r} is unknown; expected one of {ARCHITECTURES}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize_activations={self.normalize_activations!r} is not supported; expected "
                f"one of {NORMALIZATIONS}"
            )
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(f"d_in={self.d_in} and d_sae={self.d_sae} must both be at least 1")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ConfigError(
                f"k={self.k} must lie between 1 and d_sae={self.d_sae} for a {self.architecture} SAE"
            )
        if self.d_out is not None:
            if self.d_out < 1:
                raise ConfigError(f"d_out={self.d_out} must be at least 1 (the output hook's width)")
            if self.apply_b_dec_to_input:
                raise ConfigError("a transcoder's b_dec lives in its output space, so it cannot be subtracted from "
                                  "the input: set apply_b_dec_to_input=False")
            if self.normalize_activations != "none":
                raise ConfigError("transcoders take normalize_activations='none' (an input-only scale would change "
                                  "the map they learn)")
        elif self.skip:
            raise ConfigError("skip=True is for transcoders (set d_out); an SAE reconstructs its own input")

    @property
    def out_dim(self) -> int:
        """Width of the output: ``d_out`` for a transcoder, ``d_in`` for an SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Return the config ``data`` describes: ours (``to_dict``), or SAELens' ``cfg.json`` keys beside them.

        SAELens keys that are not fields here (``dtype``, ``metadata``, ...) are dropped; any other key is a
        ConfigError, as in ``GPTConfig.from_dict``: a misspelt field must not silently take its default.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - SAELENS_CFG_KEYS)
        if unknown:
            raise ConfigError(f"unknown SAEConfig fields {unknown}; known fields: {sorted(names)} "
                              f"(and SAELens' cfg.json keys {sorted(SAELENS_CFG_KEYS)})")
        return cls(**{key: value for key, value in data.items() if key in names})


class SAEOutput(NamedTuple):
    """What a forward pass gives back."""

    x_hat: Float[Tensor, "*batch d_out"]
    """The reconstruction, in the input's units (a transcoder's prediction of its output, skip included)."""
    latents: Float[Tensor, "*batch d_sae"]
    """Latent (feature) activations, dense; zero where a latent is off."""


class SAE(nn.Module):
    """A sparse autoencoder; ``cfg.architecture`` picks how latents are chosen."""

    def __init__(self, cfg: SAEConfig, *, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # Encoder starts as the decoder's transpose (Gao et al. 2024; also SAELens' default): it
        # makes the first steps reconstruct rather than fight a random encoder.
        W_dec = torch.randn(cfg.d_sae, cfg.out_dim, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        if cfg.is_transcoder:  # input and output spaces differ: no transpose to start from
            W_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=generator)
            W_enc /= W_enc.norm(dim=0, keepdim=True)
        else:
            W_enc = W_dec.T.contiguous()
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.out_dim))
        self.W_skip = nn.Parameter(torch.zeros(cfg.out_dim, cfg.d_in)) if cfg.skip else None
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), 1e-3))
        elif cfg.architecture == "batchtopk":
            # Not trained by gradient: a running estimate of the smallest activation a batch
            # keeps, used at inference instead of the batch-wide selection.
            self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        # One scalar for `expected_average_only_in`; 1 otherwise. Kept as a buffer so it travels
        # with the state dict and checkpoints.
        self.register_buffer("norm_scale", torch.ones(()))
        #: Free-form facts about what the SAE reads (model name, hook name, context size...);
        #: saved as SAELens' ``metadata`` object.
        self.metadata: dict[str, Any] = {}

    # -- encoding ------------------------------------------------------------------------------

    def check_input(self, x: Tensor) -> None:
        """Raise ``InputError`` unless ``x`` is a float tensor ending in ``d_in``."""
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"SAE input has shape {shape}, expected [..., d_in={self.cfg.d_in}]; train or load "
                f"an SAE for this hook's width"
            )
        if not x.is_floating_point():
            raise InputError(f"SAE input has dtype {x.dtype}; expected a floating-point tensor")

    def encoder_input(
        self, x: Float[Tensor, "*batch d_in"], *, detach_b_dec: bool = False
    ) -> tuple[Float[Tensor, "*batch d_in"], Float[Tensor, "*batch d_in"]]:
        """Return ``(x_n, x_c)``: the input in training units (the SAE's dtype, times ``norm_scale``)
        and the same with ``b_dec`` removed, what ``W_enc`` multiplies. ``detach_b_dec``: no gradient
        to ``b_dec`` through the centring (TopK training's sparse kernel gives it one itself)."""
        x_n = x.to(self.W_enc.dtype) * self.norm_scale
        if not self.cfg.apply_b_dec_to_input:
            return x_n, x_n
        return x_n, x_n - (self.b_dec.detach() if detach_b_dec else self.b_dec)

    def centered_input(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """Return the normalised input with ``b_dec`` removed: what ``W_enc`` multiplies."""
        return self.encoder_input(x)[1]

    def pre_acts_of_centered(self, x_c: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Return the pre-activations of an input already centred by :meth:`encoder_input`."""
        return x_c @ self.W_enc + self.b_enc

    def pre_acts(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Return the encoder's pre-activations."""
        self.check_input(x)
        return self.pre_acts_of_centered(self.centered_input(x))

    def activate(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_sae"]:
        """Return latents from pre-activations according to the architecture."""
        arch = self.cfg.architecture
        if arch == "relu":
            return F.relu(pre)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        if arch == "batchtopk" and self.training:
            return batch_topk(F.relu(pre), self.cfg.k)
        # jumprelu, and batchtopk at inference: a per-latent threshold. The ReLU matters only for
        # a negative threshold (SAELens' JumpReLUSAE applies it too; ours are trained positive).
        return F.relu(pre) * (pre > self.threshold)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Return the latent activations of ``x``."""
        return self.activate(self.pre_acts(x))

    # -- decoding ------------------------------------------------------------------------------

    def skip_out(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"] | None:
        """Return the skip term ``x @ W_skip.T`` of a skip transcoder, None without one."""
        return None if self.W_skip is None else x.to(self.W_skip.dtype) @ self.W_skip.T

    def decode(self, latents: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_out"]:
        """Return the reconstruction (in input units) from dense latents (a transcoder's: without the skip term)."""
        if latents.shape[-1] != self.cfg.d_sae:
            raise InputError(
                f"latents have shape {tuple(latents.shape)}, expected [..., d_sae={self.cfg.d_sae}]"
            )
        return (latents @ self.W_dec + self.b_dec) / self.norm_scale

    def decode_sparse(
        self, values: Float[Tensor, "batch k"], indices: Int[Tensor, "batch k"]
    ) -> Float[Tensor, "batch d_out"]:
        """Return the reconstruction from ``k`` (value, latent index) pairs per row (no skip term).

        Reads only the ``k`` decoder rows each input uses, not all ``d_sae`` of them.
        """
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return (out + self.b_dec) / self.norm_scale

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> SAEOutput:
        latents = self.encode(x)
        x_hat = self.decode(latents)
        skip = self.skip_out(x)
        return SAEOutput(x_hat=x_hat if skip is None else x_hat + skip, latents=latents)

    # -- helpers -------------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm, moving the norm into the encoder (same function)."""
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        if self.cfg.architecture in ("jumprelu", "batchtopk"):
            self.threshold.mul_(norms)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device


def batch_topk(acts: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """Keep the ``k * batch`` largest activations over the whole batch, zero the rest."""
    flat = acts.reshape(-1)
    n_keep = min(k * acts.shape[0], flat.numel())
    top = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter_(0, top.indices, top.values).reshape(acts.shape)
