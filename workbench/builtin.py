"""The built-in models: each a recipe (model config, data, training settings) trained here on the CPU.

``train_builtin(name, out_dir)`` reproduces a shipped model from scratch: the same seed gives the
same weights on the same machine (floating-point summation order may differ across CPUs and
torch builds, so another machine agrees to rounding, not bit for bit).

- ``attn-only-2l``: two attention-only layers on repeated random tokens; forms a previous-token
  head in layer 0 and an induction head in layer 1, with a phase change partway through training.
- ``attn-only-1l``: the same run with one layer; it cannot compose heads, so no induction head.
- ``kjv-small``: a 4-layer GPT-2-style LM with MLPs on the King James Bible (BPE vocabulary 2048).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench import paths
from workbench.corpora import (
    CorpusWindowsConfig,
    RepeatedTokensConfig,
    SyntheticBatches,
    WindowBatches,
    corpus_windows,
    half_masks,
    repeated_tokens,
)
from workbench.errors import ConfigError
from workbench.train import METRICS_FILE, TrainConfig, TrainResult, next_token_loss, train

CARD_FILE = "card.md"
#: Where the shipped built-in checkpoints live.
BUILTIN_DIR = paths.DATA_DIR / "models"


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a built-in model: architecture, data, training, seed."""

    name: str
    description: str
    #: GPTConfig keyword arguments (d_vocab comes from the tokenizer for corpus recipes)
    model: dict
    #: where the tokens come from
    data: Literal["synthetic", "corpus"]
    train: TrainConfig
    batch_size: int
    #: synthetic recipes: the repeated-token task
    synthetic: RepeatedTokensConfig | None = None
    #: corpus recipes: corpus, tokenizer and windows
    corpus: CorpusWindowsConfig | None = None
    #: seeds the weight initialisation and the order of batches
    seed: int = 0
    #: prompts for the greedy samples in the model card (corpus recipes)
    sample_prompts: tuple[str, ...] = field(default_factory=tuple)


_TOY_MODEL = dict(d_model=64, n_heads=4, d_head=16, d_mlp=0, d_vocab=64, n_ctx=64, attn_only=True,
                  positional="learned", normalization="layernorm")  # fmt: skip
_TOY_TRAIN = TrainConfig(
    steps=2500, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0,
    checkpoint_every=500, eval_every=25, log_every=25,
)  # fmt: skip

RECIPES: dict[str, Recipe] = {
    "attn-only-2l": Recipe(
        name="attn-only-2l",
        description="2-layer attention-only transformer on repeated random tokens (induction heads, phase change)",
        model=dict(_TOY_MODEL, n_layers=2, name="attn-only-2l"),
        data="synthetic",
        train=_TOY_TRAIN,
        batch_size=64,
        synthetic=RepeatedTokensConfig(d_vocab=64, n_ctx=64, min_offset=16, max_offset=31),
    ),
    "attn-only-1l": Recipe(
        name="attn-only-1l",
        description="1-layer attention-only control: same task and training, cannot form an induction head",
        model=dict(_TOY_MODEL, n_layers=1, name="attn-only-1l"),
        data="synthetic",
        train=_TOY_TRAIN,
        batch_size=64,
        synthetic=RepeatedTokensConfig(d_vocab=64, n_ctx=64, min_offset=16, max_offset=31),
    ),
}


# -------------------------------------------------------------------------- induction measurements


class InductionScores(NamedTuple):
    """Per-half losses and per-head attention scores of a model on repeated random tokens."""

    #: mean loss predicting tokens of the first occurrence (chance: ln(d_vocab - 1))
    loss_first: float
    #: mean loss predicting tokens of the repeat (an induction circuit drives it towards 0)
    loss_repeat: float
    #: mean attention from each position to the previous one, per layer and head
    prev_token: Float[Tensor, "layer head"]
    #: mean attention from a repeated token to the token after its previous occurrence
    induction: Float[Tensor, "layer head"]


@torch.no_grad()
def induction_scores(model, cfg: RepeatedTokensConfig, batch: int = 256, seed: int = 12345) -> InductionScores:
    """Return per-half losses and previous-token / induction head scores on fresh repeated sequences."""
    data = repeated_tokens(cfg, batch, torch.Generator().manual_seed(seed))
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    was_training = model.training
    model.eval()
    logits, cache = model.run_with_cache(data.tokens, names_filter=pattern_names)
    model.train(was_training)
    losses = next_token_loss(logits, data.tokens)
    masks = half_masks(data.offsets, cfg.n_ctx)
    pattern = torch.stack([cache[name] for name in pattern_names])  # [layer batch head q k]
    q = torch.arange(cfg.n_ctx)
    prev = pattern[:, :, :, q[1:], q[1:] - 1].mean(dim=(1, 3))
    # induction: query q with q >= L + 1 looks at key q - L + 1 (the token after the earlier copy)
    L = data.offsets[:, None]
    key = (q[None, :] - L + 1).clamp(min=0)  # [batch q]
    valid = q[None, :] >= L + 1
    idx = key[None, :, None, :, None].expand(pattern.shape[0], -1, pattern.shape[2], -1, 1)
    at_key = pattern.gather(-1, idx).squeeze(-1)  # [layer batch head q]
    weight = valid[None, :, None, :].float()
    induction = (at_key * weight).sum(dim=(1, 3)) / weight.sum(dim=(1, 3))
    return InductionScores(
        loss_first=float(losses[masks.first].mean()),
        loss_repeat=float(losses[masks.repeat].mean()),
        prev_token=prev,
        induction=induction,
    )


def _induction_metrics(cfg: RepeatedTokensConfig) -> Callable[[object], dict[str, float]]:
    def evaluate(model) -> dict[str, float]:
        s = induction_scores(model, cfg)
        return {
            "loss_first": s.loss_first,
            "loss_repeat": s.loss_repeat,
            "max_prev_token_l0": float(s.prev_token[0].max()),
            "max_induction": float(s.induction.max()),
            "max_induction_last_layer": float(s.induction[-1].max()),
        }

    return evaluate
