"""GPTConfig and HookedGPT: one readable GPT covering the GPT-2 and Llama families.

The reference, in the order a reader needs it: config, positions, norm, attention, MLP, block,
model. Every interesting activation passes through a named :class:`~workbench.hooks.HookPoint`
(TransformerLens' names). Weights are exposed per head as in the literature
(``W_Q: [head d_model d_head]``) but stored in the memory layout ``F.linear`` wants, so the
forward pass runs one fused matmul per projection over a view of the same memory.

Dependencies run one way. This module needs only the hook machinery, padding and the speed
paths of :mod:`workbench.fastpath` (``linear`` is ``F.linear``, faster for decoding on the
CPU). Loading (``loading.py``), generation (``generate.py``), activation caches (``cache.py``) and
TransformerLens interop (``interop.py``) import this module, never the reverse at import time:
``import workbench.model`` loads none of them. ``model.run_with_cache``, ``model.generate``,
``model.save``, ``HookedGPT.load``/``from_hf`` and friends stay as methods for the user's
convenience (TransformerLens users expect them), but each is a thin forwarder at the end of
:class:`HookedGPT` that imports its implementation when called. We chose forwarders over having
those modules attach methods on import: an attached ``model.generate`` would exist or not
depending on what else the program happened to import.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from workbench import padding
from workbench.errors import ConfigError, InputError
from workbench.fastpath import linear
from workbench.hooks import HookedModule, HookPoint, NameFilter
from workbench.padding import Batch, PaddingSide

Positional = Literal["learned", "rotary", "sinusoidal", "none"]
Normalization = Literal["layernorm", "rmsnorm"]
ActFn = Literal["gelu_new", "gelu", "relu", "silu"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Architecture of a decoder-only transformer (GPT-2 family, Llama family, or any mix)."""

    d_model: int
    n_layers: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    #: width of each head; None means d_model // n_heads (which must then divide evenly)
    d_head: int | None = None
    #: hidden width of the MLP (ignored, may be 0, when attn_only)
    d_mlp: int = 0
    #: key/value heads for grouped-query attention; None means n_heads (plain multi-head)
    n_kv_heads: int | None = None
    #: how positions enter: learned table, rotary (RoPE on q and k), fixed sinusoids, or nothing
    positional: Positional = "learned"
    normalization: Normalization = "layernorm"
    #: gelu_new is GPT-2's tanh approximation; silu with gated_mlp=True is Llama's SwiGLU
    act_fn: ActFn = "gelu_new"
    #: MLP computes act(x W_gate) * (x W_in) before W_out (SwiGLU and friends)
    gated_mlp: bool = False
    #: no MLP sub-layers at all (the toy models of Elhage et al. 2021)
    attn_only: bool = False
    #: biases on the attention and MLP projections (GPT-2: yes, Llama: no)
    use_bias: bool = True
    #: a bias on the unembedding (neither GPT-2 nor Llama has one)
    unembed_bias: bool = False
    #: W_U is W_E transposed (GPT-2 and SmolLM2 tie them)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    #: standard deviation of the normal initialisation of weight matrices
    init_std: float = 0.02
    #: free-form label kept in checkpoints
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("d_model", "n_layers", "n_heads", "d_vocab", "n_ctx", "d_head", "d_mlp", "n_kv_heads"):
            value = getattr(self, f)  # a config read from JSON may hold 1e9, "64" or true where a size belongs
            is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not is_int and not (value is None and f in ("d_head", "n_kv_heads")):
                raise ConfigError(f"{f} must be an integer, got {value!r}; fix the model config")
        for f in ("norm_eps", "rope_theta"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{f} must be a positive finite number, got {value!r}; fix the model config")
        if self.d_head is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; choose n_heads among "
                    "the divisors of d_model, or give d_head explicitly"
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        for f in ("d_model", "n_layers", "n_heads", "d_head", "d_vocab", "n_ctx"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{f} must be positive, got {getattr(self, f)}")
        if not self.attn_only and self.d_mlp <= 0:
            raise ConfigError(f"d_mlp must be positive for a model with MLPs, got {self.d_mlp} (or set attn_only=True)")
        if self.n_heads % self.n_kv:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv}: each key/value head "
                "serves a whole group of query heads; pick n_kv_heads among the divisors of n_heads"
            )
        if self.positional == "rotary" and self.d_head % 2:
            raise ConfigError(f"rotary positions need an even d_head, got {self.d_head}")
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        for f, allowed in (("positional", Positional), ("normalization", Normalization), ("act_fn", ActFn)):
            if getattr(self, f) not in allowed.__args__:
                raise ConfigError(f"{f}={getattr(self, f)!r} is not one of {allowed.__args__}")

    @property
    def n_kv(self) -> int:
        """Number of key/value heads."""
        return self.n_kv_heads or self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def gpt2_small(cls) -> GPTConfig:
        return cls(d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
                   tie_embeddings=True, name="gpt2-small")

    @classmethod
    def gpt3_175b(cls) -> GPTConfig:
        return cls(d_model=12288, n_layers=96, n_heads=96, d_head=128, d_mlp=49152, d_vocab=50257, n_ctx=2048,
                   name="gpt3-175b")


def parameter_counts(cfg: GPTConfig) -> dict[str, int]:
    """Return parameter counts by component, plus ``weights`` (matrices only) and ``total``.

    Components: embedding, positional, attn_q/k/v/o, attn_bias, mlp_in, mlp_gate, mlp_out,
    mlp_bias, norms, unembedding (0 when tied). GPT-2 small's total is 124,439,808; GPT-3
    175B's ``weights`` (embedding, Q, K, V, O, MLP and an untied unembedding) is 175,181,291,520.
    """
    L, d, H, K, dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv, cfg.d_head
    mlp = 0 if cfg.attn_only else cfg.d_mlp
    norm_size = d * (2 if cfg.normalization == "layernorm" else 1)
    counts = {
        "embedding": cfg.d_vocab * d,
        "positional": cfg.n_ctx * d if cfg.positional == "learned" else 0,
        "attn_q": L * H * d * dh,
        "attn_k": L * K * d * dh,
        "attn_v": L * K * d * dh,
        "attn_o": L * H * dh * d,
        "attn_bias": L * ((H + 2 * K) * dh + d) if cfg.use_bias else 0,
        "mlp_in": L * d * mlp,
        "mlp_gate": L * d * mlp if cfg.gated_mlp else 0,
        "mlp_out": L * mlp * d,
        "mlp_bias": L * (mlp * (2 if cfg.gated_mlp else 1) + d) if cfg.use_bias and mlp else 0,
        "norms": norm_size * (L * (1 if cfg.attn_only else 2) + 1),
        "unembedding": 0 if cfg.tie_embeddings else d * cfg.d_vocab,
        "unembedding_bias": cfg.d_vocab if cfg.unembed_bias else 0,
    }
    matrices = ("embedding", "attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_gate", "mlp_out", "unembedding")
    counts["weights"] = sum(counts[k] for k in matrices)
    counts["total"] = sum(v for k, v in counts.items() if k != "weights")
    return counts


# ---------------------------------------------------------------------------------------------
# Positions and embeddings


def sinusoidal_table(n_ctx: int, d_model: int) -> Float[Tensor, "pos d_model"]:
    """Return Vaswani et al.'s fixed table: sin on even dimensions, cos on odd ones."""
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.float()


#: rows of the RoPE tables built with the model; a longer context grows them on first use (a GGUF may
#: declare a context of 2^32 - 1 tokens, whose full tables would take 34 GB)
ROTARY_ROWS = 4096


def rotary_tables(n_ctx: int, d_head: int, theta: float) -> tuple[Tensor, Tensor]:
    """Return RoPE's cos and sin tables ``[pos d_head]`` in the rotate-half layout HF Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head))
    angles = torch.outer(torch.arange(n_ctx).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def signed_sin(sin: Float[Tensor, "pos d_head"]) -> Float[Tensor, "pos d_head"]:
    """Return ``sin`` with its first half negated: rotate-half's minus sign, folded into the table once."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "*rows pos 1 d_head"],
    sin: Float[Tensor, "*rows pos 1 d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """Apply RoPE as HF Llama does, ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``.

    ``sin`` is :func:`signed_sin` of the table, so ``rotate_half(x) * sin`` is ``roll(x) * sin``: the same
    numbers bit for bit, in a third of the operations (it runs twice per layer per decoded token).
    :meth:`HookedGPT.rotary` gives both tables for a range of positions in this shape.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Embed(nn.Module):
    """The token embedding ``W_E [d_vocab d_model]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))


class PosEmbed(nn.Module):
    """The positional table ``W_pos [n_ctx d_model]``: learned, or fixed sinusoids."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.positional == "learned":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        else:  # sinusoidal: a fixed table, recomputed from the config rather than stored
            self.register_buffer("W_pos", sinusoidal_table(cfg.n_ctx, cfg.d_model), persistent=False)


# ---------------------------------------------------------------------------------------------
# Norm


class Norm(nn.Module):
    """LayerNorm or RMSNorm, with ``hook_scale`` and ``hook_normalized`` (before the affine part).

    Three paths give the same numbers; which one runs depends on who is looking:

    - *fused*: no hook on this norm (a plain forward pass): torch's ``F.layer_norm`` / ``F.rms_norm``.
    - *observed*: hooks only read (every default ``run_with_cache``): the scale is computed
      explicitly for ``hook_scale``, the normalized x still comes from the fused kernel.
    - *replaced*: a hook on ``hook_scale`` may return another scale (frozen norms in attribution) or
      wants its gradient: x is divided by the scale the hook returned, so both flow through it.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model)) if self.kind == "layernorm" else None
        self.hook_scale = HookPoint()  # [batch pos 1]
        self.hook_normalized = HookPoint()  # [batch pos d_model]

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        if not (self.hook_scale.active or self.hook_normalized.active):
            # fused path: nobody is looking inside, so one kernel does it all
            if self.kind == "layernorm":
                return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
            return F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype) * self.w
        orig_dtype, d = x.dtype, x.shape[-1]
        x = x.float()
        if self.kind == "layernorm":
            # two passes, not torch.var_mean: on the CPU var_mean is ~10x slower ([32, 64, 128]: 1.9 vs 0.2 ms)
            mean = x.mean(dim=-1, keepdim=True)
            computed = ((x - mean).square().mean(dim=-1, keepdim=True) + self.eps).sqrt()
        else:
            mean = None  # a reduction, no [batch pos d_model] temporary for x ** 2
            computed = (torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / d + self.eps).sqrt()
        scale = self.hook_scale(computed)
        if self.hook_scale.observe_only:
            # observed path: the scale was only looked at, so the fused kernel gives the same normalized x
            normalized = (F.layer_norm(x, (d,), None, None, self.eps) if mean is not None
                          else F.rms_norm(x, (d,), None, self.eps))
        else:
            # replaced path: a hook may have returned another scale; divide by what it returned
            normalized = (x - mean if mean is not None else x) / scale
        x = self.hook_normalized(normalized).to(orig_dtype)
        return torch.addcmul(self.b, x, self.w) if self.b is not None else x * self.w


# ---------------------------------------------------------------------------------------------
# Attention


def _per_head(shape_in_memory: tuple[int, ...], perm: tuple[int, ...]) -> nn.Parameter:
    """Return a parameter whose logical (per-head) shape is a permutation of its memory layout."""
    return nn.Parameter(torch.empty(shape_in_memory).permute(perm))


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) attention with optional RoPE.

    Two ways to attend, chosen per call by who is looking (DESIGN: "SDPA unless a hook wants the pattern"):

    - :meth:`attend_sdpa`: ``F.scaled_dot_product_attention``, which never materialises the
      ``[batch head query key]`` pattern; used whenever no hook wants scores or pattern.
    - :meth:`attend_explicit`: scores, softmax and the weighted sum written out, so
      ``hook_attn_scores`` and ``hook_pattern`` can read and replace them.

    And two ways to write the output: one fused matmul with ``W_O`` over all heads, or, when
    ``hook_result`` is hooked (opt-in: a ``[batch pos head d_model]`` tensor), each head's
    contribution separately, then summed.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        H, K, dh, d = cfg.n_heads, cfg.n_kv, cfg.d_head, cfg.d_model
        # Memory [head d_head d_model] is F.linear's [out in]; the logical view is [head d_model d_head].
        self.W_Q = _per_head((H, dh, d), (0, 2, 1))
        self.W_K = _per_head((K, dh, d), (0, 2, 1))
        self.W_V = _per_head((K, dh, d), (0, 2, 1))
        # Memory [d_model head d_head] is F.linear's [out in]; the logical view is [head d_head d_model].
        self.W_O = _per_head((d, H, dh), (1, 2, 0))
        if cfg.use_bias:
            self.b_Q = nn.Parameter(torch.zeros(H, dh))
            self.b_K = nn.Parameter(torch.zeros(K, dh))
            self.b_V = nn.Parameter(torch.zeros(K, dh))
            self.b_O = nn.Parameter(torch.zeros(d))
        else:
            self.b_Q = self.b_K = self.b_V = self.b_O = None
        rotary = ("hook_rot_q", "hook_rot_k") if cfg.positional == "rotary" else ()
        # registered in the order they fire, so model.hook_names() reads like the forward pass
        for name in ("hook_q", "hook_k", "hook_v", *rotary,
                     "hook_attn_scores", "hook_pattern", "hook_z", "hook_result"):
            setattr(self, name, HookPoint())

    def project(self, x: Float[Tensor, "batch pos d_model"], which: Literal["q", "k", "v"]
                ) -> Float[Tensor, "batch pos head d_head"]:
        """Return the per-head queries, keys or values of ``x`` (the normalized residual), before RoPE.

        Analyses use it to ask what a head would read from another input (e.g. K-composition)."""
        if which not in ("q", "k", "v"):
            raise InputError(f"which={which!r}: choose 'q', 'k' or 'v'")
        name = which.upper()
        return self._project(x, getattr(self, f"W_{name}"), getattr(self, f"b_{name}"))

    def _project(self, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        n, dh = W.shape[0], W.shape[2]
        out = linear(x, W.transpose(1, 2).reshape(n * dh, -1), None if b is None else b.reshape(-1))
        return out.view(*x.shape[:-1], n, dh)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None,
        pos_offset: int,
        kv: tuple[Tensor, Tensor] | None,
        attn_mask: Float[Tensor, "batch 1 pos key"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Return the attention output written to the residual stream.

        ``attn_mask`` (padded batches only, see workbench.padding.attention_bias) is added to the
        scores: 0 where a query may attend, -inf where not, causality included; None is plain causal."""
        batch, n_pos, _ = x.shape
        q = self.hook_q(self._project(x, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(x, self.W_K, self.b_K))
        v = self.hook_v(self._project(x, self.W_V, self.b_V))
        if rotary is not None:  # HookedGPT.rotary's tables for these positions
            q = self.hook_rot_q(apply_rotary(q, *rotary))
            k = self.hook_rot_k(apply_rotary(k, *rotary))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch head pos d_head]
        if kv is not None:
            # write into the preallocated cache, attend over everything up to here
            k_cache, v_cache = kv
            k_cache.narrow(2, pos_offset, n_pos).copy_(k)
            v_cache.narrow(2, pos_offset, n_pos).copy_(v)
            k, v = k_cache.narrow(2, 0, pos_offset + n_pos), v_cache.narrow(2, 0, pos_offset + n_pos)
        if self.hook_attn_scores.active or self.hook_pattern.active:
            z = self.attend_explicit(q, k, v, pos_offset, attn_mask)
        else:
            z = self.attend_sdpa(q, k, v, pos_offset, attn_mask)
        z = self.hook_z(z.transpose(1, 2))  # [batch pos head d_head]
        if self.hook_result.active:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            out = result.sum(dim=2)
            return out if self.b_O is None else out + self.b_O
        W_O = self.W_O.permute(2, 0, 1).reshape(self.cfg.d_model, -1)
        return linear(z.reshape(batch, n_pos, -1), W_O, self.b_O)

    def attend_sdpa(
        self,
        q: Float[Tensor, "batch head pos d_head"],
        k: Float[Tensor, "batch kv_head key d_head"],
        v: Float[Tensor, "batch kv_head key d_head"],
        pos_offset: int,
        attn_mask: Tensor | None,
    ) -> Float[Tensor, "batch head pos d_head"]:
        """Return ``softmax(q k^T / sqrt(d_head) + mask) v`` through torch's fused kernel (no pattern kept)."""
        n_pos, n_keys = q.shape[2], k.shape[2]
        mask = attn_mask
        if mask is None and pos_offset and n_pos > 1:  # a chunk after cached positions: causal, shifted
            mask = torch.ones(n_pos, n_keys, dtype=torch.bool, device=q.device).tril(pos_offset)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and n_pos > 1, enable_gqa=q.shape[1] > k.shape[1]
        )

    def attend_explicit(
        self,
        q: Float[Tensor, "batch head pos d_head"],
        k: Float[Tensor, "batch kv_head key d_head"],
        v: Float[Tensor, "batch kv_head key d_head"],
        pos_offset: int,
        attn_mask: Tensor | None,
    ) -> Float[Tensor, "batch head pos d_head"]:
        """Return the same as :meth:`attend_sdpa`, through ``hook_attn_scores`` and ``hook_pattern``.

        The ``group`` query heads that share a KV head are stacked along the query axis, so K and V
        are never repeated, and scaling plus the causal mask fold into one baddbmm."""
        cfg = self.cfg
        batch, n_heads, n_pos, d_head = q.shape
        n_kv, n_keys = k.shape[1], k.shape[2]
        group = n_heads // n_kv
        q_rows = q.reshape(batch * n_kv, group * n_pos, d_head)
        k_cols = k.reshape(batch * n_kv, n_keys, d_head).transpose(1, 2)
        if attn_mask is None:
            mask = torch.full((n_pos, n_keys), float("-inf"), dtype=q.dtype, device=q.device).triu_(pos_offset + 1)
            scores = torch.baddbmm(mask.repeat(group, 1), q_rows, k_cols, alpha=1 / math.sqrt(cfg.d_head))
        else:  # one mask per row, broadcast over the (kv_head, group) head axes rather than copied per head
            scores = torch.bmm(q_rows, k_cols).mul_(1 / math.sqrt(cfg.d_head))
            scores.view(batch, n_kv, group, n_pos, n_keys).add_(attn_mask[:, :, None])
        scores = self.hook_attn_scores(scores.view(batch, n_heads, n_pos, n_keys))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        return torch.bmm(
            pattern.reshape(batch * n_kv, group * n_pos, n_keys), v.reshape(batch * n_kv, n_keys, d_head)
        ).view(batch, n_heads, n_pos, d_head)


# ---------------------------------------------------------------------------------------------
# MLP


_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``, or the gated form ``(act(x W_gate) * x W_in) W_out``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        self.act = _ACTIVATIONS[cfg.act_fn]
        self.W_in = _per_head((m, d), (1, 0))  # [d_model d_mlp], memory [d_mlp d_model]
        self.W_gate = _per_head((m, d), (1, 0)) if cfg.gated_mlp else None
        self.W_out = _per_head((d, m), (1, 0))  # [d_mlp d_model], memory [d_model d_mlp]
        self.b_in = nn.Parameter(torch.zeros(m)) if cfg.use_bias else None
        self.b_gate = nn.Parameter(torch.zeros(m)) if cfg.use_bias and cfg.gated_mlp else None
        self.b_out = nn.Parameter(torch.zeros(d)) if cfg.use_bias else None
        # What the MLP reads (ln2's output *after* its weight; ln2.hook_normalized is before it) and
        # what it writes: the input/output pair a transcoder is trained on (TransformerLens' names).
        self.hook_in = HookPoint()  # [batch pos d_model]
        self.hook_pre = HookPoint()  # what the nonlinearity sees
        if cfg.gated_mlp:
            self.hook_pre_linear = HookPoint()  # the linear branch
        self.hook_post = HookPoint()
        self.hook_out = HookPoint()  # [batch pos d_model], the same values as the block's hook_mlp_out

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_in(x)
        if self.W_gate is not None:
            pre = self.hook_pre(linear(x, self.W_gate.T, self.b_gate))
            post = self.hook_post(self.act(pre) * self.hook_pre_linear(linear(x, self.W_in.T, self.b_in)))
        else:
            post = self.hook_post(self.act(self.hook_pre(linear(x, self.W_in.T, self.b_in))))
        return self.hook_out(linear(post, self.W_out.T, self.b_out))


# ---------------------------------------------------------------------------------------------
# Block


class Block(nn.Module):
    """Pre-norm residual block: attention, then (unless attention-only) an MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_only = cfg.attn_only
        self.hook_resid_pre = HookPoint()
        self.ln1 = Norm(cfg)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.hook_resid_mid = HookPoint()
            self.ln2 = Norm(cfg)
            self.mlp = MLP(cfg)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid: Tensor, rotary, pos_offset: int, kv, attn_mask: Tensor | None = None) -> Tensor:
        resid = self.hook_resid_pre(resid)
        resid = resid + self.hook_attn_out(self.attn(self.ln1(resid), rotary, pos_offset, kv, attn_mask))
        if not self.attn_only:
            resid = self.hook_resid_mid(resid)
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)


# ---------------------------------------------------------------------------------------------
# The model


class Unembed(nn.Module):
    """The unembedding ``W_U [d_model d_vocab]`` (a view of ``W_E`` when tied) and optional ``b_U``."""

    def __init__(self, cfg: GPTConfig, embed: Embed):
        super().__init__()
        # tied: W_U is a view of W_E; kept out of the module tree so it is not a second parameter
        self._embed = [embed] if cfg.tie_embeddings else None
        if not cfg.tie_embeddings:
            self.W_U = _per_head((cfg.d_vocab, cfg.d_model), (1, 0))  # [d_model d_vocab]
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab)) if cfg.unembed_bias else None
        # TransformerLens' unembed hooks: the final normalized residual in, the logits out
        self.hook_in = HookPoint()  # [batch pos d_model]
        self.hook_out = HookPoint()  # [batch pos d_vocab]

    def __getattr__(self, name: str):
        if name == "W_U" and self.__dict__.get("_embed"):
            return self.__dict__["_embed"][0].W_E.T
        return super().__getattr__(name)

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        return self.hook_out(linear(self.hook_in(x), self.W_U.T, self.b_U))


@dataclass
class KVCache:
    """Preallocated keys and values, one ``[batch kv_head max_pos d_head]`` pair per layer."""

    keys: list[Tensor]
    values: list[Tensor]
    #: how many positions are filled
    pos: int = 0
    #: ``[batch max_pos]``, True at real tokens; None while every position so far is real
    attention_mask: Tensor | None = None

    @classmethod
    def empty(cls, cfg: GPTConfig, batch: int, max_pos: int, device=None, dtype=torch.float32) -> KVCache:
        if max_pos > cfg.n_ctx:
            raise InputError(f"a KV cache of {max_pos} positions exceeds the model's context of {cfg.n_ctx}")
        shape = (batch, cfg.n_kv, max_pos, cfg.d_head)
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])

    @property
    def max_pos(self) -> int:
        return self.keys[0].shape[2]


class HookedGPT(HookedModule):
    """A GPT whose activations can all be read and replaced through named hook points."""

    def __init__(self, cfg: GPTConfig, tokenizer=None, init: bool = True):
        super().__init__()
        self.cfg = cfg
        #: a workbench.tokenize.Tokenizer, or None for models used on raw token ids
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.positional in ("learned", "sinusoidal"):
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        if cfg.positional == "rotary":
            cos, sin = rotary_tables(min(cfg.n_ctx, ROTARY_ROWS), cfg.d_head, cfg.rope_theta)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", signed_sin(sin), persistent=False)  # see apply_rotary
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = Norm(cfg)
        self.unembed = Unembed(cfg, self.embed)
        if init:  # loaders skip this: they overwrite every weight anyway
            self.init_weights()
        self.setup_hooks()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every parameter of rank >= 2, zeros for the other biases, ones for norm gains;
        W_O and W_out scaled by 1/sqrt(2 n_layers).

        The rank rule also draws the per-head biases b_Q/b_K/b_V ([head d_head]) from the normal; the
        built-in models were trained that way, so changing it means retraining them (``workbench train``)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("W_O", "W_out")) else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * std * scale)
            elif name.endswith(".w"):
                p.fill_(1.0)
            else:
                p.zero_()

    # -- the forward pass, in pieces that analyses can call separately -------------------------

    def check_tokens(self, tokens: Tensor, pos_offset: int = 0) -> Int[Tensor, "batch pos"]:
        """Return ``tokens`` as ``[batch pos]`` after checking dtype, range and length."""
        if not isinstance(tokens, Tensor):
            raise InputError(f"expected a tensor of token ids, got {type(tokens).__name__}; use model.to_tokens(text)")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"token ids must be integers, got {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.shape[0] == 0:
            raise InputError(
                f"expected token ids of shape [batch, pos] with batch, pos >= 1, got {tuple(tokens.shape)}"
            )
        end = pos_offset + tokens.shape[1]
        if end > self.cfg.n_ctx:
            raise InputError(
                f"{end} positions exceed the model's context of {self.cfg.n_ctx} tokens; "
                f"shorten the input to at most {self.cfg.n_ctx - pos_offset} tokens"
            )
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.d_vocab:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.cfg.d_vocab})")
        return tokens

    def embed_tokens(
        self, tokens: Int[Tensor, "batch pos"], pos_offset: int = 0,
        attention_mask: Bool[Tensor, "batch key"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Return the residual stream before the first block: token (+ positional) embeddings.

        ``attention_mask`` (padded batches) covers every position from 0 to the end of ``tokens``;
        positions then count from each row's first real token."""
        resid = self.hook_embed(F.embedding(tokens, self.embed.W_E))
        if self.cfg.positional in ("learned", "sinusoidal"):
            if attention_mask is None:
                pos = self.pos_embed.W_pos[pos_offset: pos_offset + tokens.shape[1]].expand(tokens.shape[0], -1, -1)
            else:
                pos = self.pos_embed.W_pos[padding.position_ids(attention_mask, tokens.shape[1])]
            resid = resid + self.hook_pos_embed(pos.to(resid.dtype))
        return resid

    def run_blocks(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start: int = 0,
        stop: int | None = None,
        pos_offset: int = 0,
        kv_cache: KVCache | None = None,
        attention_mask: Bool[Tensor, "batch key"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Return the residual stream after blocks ``start .. stop-1`` (resid_pre of ``stop``).

        ``attention_mask`` as in :meth:`embed_tokens`: padded keys are never attended to."""
        n_pos, attn_mask = resid.shape[1], None
        rotary = self.rotary(pos_offset, n_pos, resid.dtype) if self.cfg.positional == "rotary" else None
        if attention_mask is not None:
            attn_mask = padding.attention_bias(attention_mask, n_pos, resid.dtype)  # once for every layer
            if rotary is not None:  # each row's own positions: [batch pos 1 d_head]
                at = padding.position_ids(attention_mask, n_pos)
                rotary = tuple(t[at][:, :, None].to(resid.dtype) for t in (self.rotary_cos, self.rotary_sin))
        for i in range(start, self.cfg.n_layers if stop is None else stop):
            kv = None if kv_cache is None else (kv_cache.keys[i], kv_cache.values[i])
            resid = self.blocks[i](resid, rotary, pos_offset, kv, attn_mask)
        return resid

    def rotary(self, pos_offset: int, n_pos: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Return the cos and signed-sin tables :func:`apply_rotary` takes for ``n_pos`` positions from
        ``pos_offset``, shaped ``[pos 1 d_head]`` to broadcast over heads (sliced once per forward pass)."""
        if self.cfg.positional != "rotary":
            raise ConfigError(f"this model has {self.cfg.positional} positions, not rotary ones")
        if pos_offset + n_pos > self.rotary_cos.shape[0]:  # grow the tables (doubling) up to what is used
            rows = min(self.cfg.n_ctx, max(pos_offset + n_pos, 2 * self.rotary_cos.shape[0]))
            cos, sin = rotary_tables(rows, self.cfg.d_head, self.cfg.rope_theta)
            self.rotary_cos = cos.to(self.rotary_cos)
            self.rotary_sin = signed_sin(sin).to(self.rotary_sin)
        return tuple(t[pos_offset: pos_offset + n_pos, None].to(dtype) for t in (self.rotary_cos, self.rotary_sin))

    def unembed_resid(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        """Return logits from a final residual stream (final norm, then W_U)."""
        return self.unembed(self.ln_final(resid))

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"] | Batch,
        kv_cache: KVCache | None = None,
        attention_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Return next-token logits. With ``kv_cache`` the tokens continue the cached positions.

        Prompts of different lengths: pass a :class:`~workbench.padding.Batch` (``model.to_batch(texts)``)
        or ``attention_mask`` (True at real tokens); each row then computes what it would alone."""
        tokens, attention_mask = padding.unpack(tokens, attention_mask)
        offset = 0 if kv_cache is None else kv_cache.pos
        tokens = self.check_tokens(tokens, offset)
        if kv_cache is not None and offset + tokens.shape[1] > kv_cache.max_pos:
            raise InputError(f"KV cache holds {kv_cache.max_pos} positions; {offset + tokens.shape[1]} needed")
        key_mask = self.key_mask(tokens, attention_mask, kv_cache)
        resid = self.embed_tokens(tokens, offset, key_mask)
        resid = self.run_blocks(resid, pos_offset=offset, kv_cache=kv_cache, attention_mask=key_mask)
        if kv_cache is not None:
            kv_cache.pos += tokens.shape[1]
        return self.unembed_resid(resid)

    def key_mask(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None, kv_cache: KVCache | None = None
    ) -> Bool[Tensor, "batch key"] | None:
        """Return which positions, from 0 to the end of ``tokens``, hold real tokens (the cached ones
        first), recording the new ones in ``kv_cache``; None when none is padding (the fast path)."""
        new = padding.check_attention_mask(attention_mask, tokens)
        if kv_cache is None or (new is None and kv_cache.attention_mask is None):
            if new is not None:
                padding.check_rows_have_tokens(new)
            return new
        if kv_cache.attention_mask is None:
            kv_cache.attention_mask = torch.ones(
                tokens.shape[0], kv_cache.max_pos, dtype=torch.bool, device=tokens.device
            )
        end = kv_cache.pos + tokens.shape[1]
        kv_cache.attention_mask[:, kv_cache.pos: end] = True if new is None else new
        key_mask = kv_cache.attention_mask[:, :end]
        padding.check_rows_have_tokens(key_mask)
        return key_mask

    # -- hook names and shapes -------------------------------------------------------------------

    def hook_shapes(self, batch: int = 1, pos: int = 4) -> dict[str, tuple[int, ...]]:
        """Return every hook name with the shape it sees for a ``[batch, pos]`` input."""
        shapes: dict[str, tuple[int, ...]] = {}

        def record(x: Tensor, hook: HookPoint) -> None:
            shapes[hook.name] = tuple(x.shape)

        tokens = torch.zeros(batch, pos, dtype=torch.long, device=self.embed.W_E.device)
        with torch.no_grad():
            self.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, record)])
        return {name: shapes[name] for name in self.hook_dict if name in shapes}

    def hook_names(self) -> list[str]:
        """Return every hook name, in the order they fire."""
        return list(self.hook_dict)

    # -- stacked weights (one einsum away from QK/OV circuits) ------------------------------------

    def _stack(self, get) -> Tensor:
        return torch.stack([get(b) for b in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    # -- tokens and text ---------------------------------------------------------------------------

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids, or load it with load_model(...)")
        return self.tokenizer

    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None) -> Int[Tensor, "batch pos"]:
        """Return token ids ``[batch pos]``; BOS in front per the tokenizer's ``add_bos`` unless told."""
        tok = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        ids = [tok.encode(t, add_bos=prepend_bos) for t in texts]
        if any(len(i) == 0 for i in ids):
            raise InputError("the prompt is empty; give at least one token of text")
        if len({len(i) for i in ids}) > 1:
            raise InputError(
                f"prompts tokenize to different lengths {[len(i) for i in ids]}; use model.to_batch(texts), "
                "which pads them and gives the attention mask every model call takes"
            )
        return torch.tensor(ids, dtype=torch.long, device=self.embed.W_E.device)

    def to_batch(
        self, texts: str | list[str], padding_side: PaddingSide = "left", prepend_bos: bool | None = None
    ) -> Batch:
        """Return prompts of any lengths as a :class:`~workbench.padding.Batch`: token ids padded with
        the tokenizer's pad token, and the attention mask (True at real tokens).

        Left padding (the default) puts every row's last real token at position -1 and is what
        generation needs; right padding keeps every row's first token at position 0."""
        tok = self._require_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        ids = [tok.encode(t, add_bos=prepend_bos) for t in texts]
        ragged = len({len(i) for i in ids}) > 1  # prompts of one length need no pad token
        return padding.pad(ids, tok.padding_id() if ragged else 0, padding_side, device=self.embed.W_E.device)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Return the text of ``[pos]`` ids, or a list of texts for ``[batch pos]``."""
        tok = self._require_tokenizer()
        if isinstance(tokens, Tensor) and tokens.ndim == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist() if isinstance(tokens, Tensor) else list(tokens))

    def to_str_tokens(self, text_or_tokens: str | Tensor | list[int], prepend_bos: bool | None = None) -> list[str]:
        """Return each token of a text (or of ``[pos]`` ids) as its own string."""
        tok = self._require_tokenizer()
        if isinstance(text_or_tokens, str):
            ids = tok.encode(text_or_tokens, add_bos=prepend_bos)
        elif isinstance(text_or_tokens, Tensor):
            ids = text_or_tokens.reshape(-1).tolist()
        else:
            ids = list(text_or_tokens)
        return tok.str_tokens(ids)

    # -- conveniences implemented in the modules that build on this one ------------------------
    # Each method below is a thin forwarder, kept so that ``model.generate(...)``, ``model.run_with_cache(...)``
    # and ``HookedGPT.load(...)`` work on any model. The implementation lives in the module that depends on
    # model.py and imports it at its top; importing that module here, at call time, keeps the import graph
    # one-way (see this module's docstring).

    def run_with_cache(
        self,
        tokens: Int[Tensor, "batch pos"] | Batch,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stop_at_layer: int | None = None,
        incl_grad: bool = False,
        attention_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"] | None = None,
    ):
        """Return ``(output, cache)``: logits (or ``blocks.L.hook_resid_pre`` with ``stop_at_layer=L``)
        and an :class:`~workbench.cache.ActivationCache`; see :func:`workbench.cache.run_with_cache`."""
        from workbench.cache import run_with_cache  # cache.py imports model.py

        return run_with_cache(self, tokens, names_filter, device=device, dtype=dtype, stop_at_layer=stop_at_layer,
                              incl_grad=incl_grad, attention_mask=attention_mask)

    def generate(self, *args, **kwargs):
        """Return sampled continuations; see :func:`workbench.generate.generate` for the arguments."""
        from workbench.generate import generate  # generate.py imports model.py

        return generate(self, *args, **kwargs)

    def save(self, directory) -> None:
        """Write a native checkpoint (config.json + model.safetensors + tokenizer files)."""
        from workbench.loading import save_native  # loading.py imports model.py

        save_native(self, directory)

    @classmethod
    def load(cls, directory, device=None, dtype=None) -> HookedGPT:
        """Return the model of a native checkpoint directory (see :func:`workbench.loading.load_native`)."""
        from workbench.loading import load_native  # loading.py imports model.py

        return load_native(directory, device=device, dtype=dtype)

    @classmethod
    def from_hf(cls, model_or_path, **kwargs) -> HookedGPT:
        """Return a HookedGPT from a transformers model, state dict or directory (see workbench.loading)."""
        from workbench.loading import from_hf  # loading.py imports model.py

        return from_hf(model_or_path, **kwargs)

    def to_hf(self):
        """Return a transformers model with these weights (see :func:`workbench.loading.to_hf`)."""
        from workbench.loading import to_hf  # loading.py imports model.py

        return to_hf(self)

    def to_transformer_lens(self):
        """Return a TransformerLens 4.x ``TransformerBridge`` over these weights (see workbench.interop)."""
        from workbench.interop import to_transformer_lens  # interop.py imports model.py

        return to_transformer_lens(self)

    @classmethod
    def from_transformer_lens(cls, bridge) -> HookedGPT:
        """Return a HookedGPT with a TransformerLens bridge's weights (see workbench.interop)."""
        from workbench.interop import from_transformer_lens  # interop.py imports model.py

        return from_transformer_lens(bridge)
