"""Training snapshots: list them, load one, and measure what changes across them. Pure: no streamlit.

A run (or a shipped built-in model) keeps ``snapshots/step_NNNNNN/`` beside its checkpoint: one
native checkpoint per step (:func:`workbench.builtin.snapshot_dirs`). Any page or script can use
:func:`list_snapshots` and :func:`load_snapshot`; the measurements below (embedding projections
in one frame for every step, head scores, patterns and the logit lens on fixed repeated tokens,
the loss curve with the learning-rate schedule) are what the training-dynamics page draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.analysis.induction import (
    default_spec,
    next_token_loss,
    repeat_losses,
    repeated_random_tokens,
    score_heads,
)
from workbench.analysis.logit_lens import lens_residuals
from workbench.builtin import RECIPES, snapshot_dirs
from workbench.errors import CheckpointError
from workbench.model import HookedGPT
from workbench.names import act_name
from workbench.runs import METRICS_FILE, lr_at, read_metrics


class Snapshot(NamedTuple):
    """One saved training step."""

    step: int
    #: the checkpoint directory (``config.json`` + ``model.safetensors``)
    path: Path


def list_snapshots(model_dir: str | Path | None) -> list[Snapshot]:
    """Return the snapshots saved beside a checkpoint directory, by step (empty when it has none)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return []
    return sorted(Snapshot(s, d) for s, d in snapshot_dirs(Path(model_dir)).items() if (d / "config.json").is_file())


def load_snapshot(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Return the model saved in one snapshot directory, in eval mode (snapshots are stored in fp16)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a snapshot (no config.json); list them with workbench.snapshots.list_snapshots"
        )
    return HookedGPT.load(path, dtype=torch.float32).to(device=device, dtype=dtype).eval()


def step_of(path: str | Path) -> int:
    """Return the training step of a ``step_NNNNNN`` snapshot directory."""
    name = Path(path).name
    if not (name.startswith("step_") and name[5:].isdigit()):
        raise CheckpointError(f"{path} is not named step_NNNNNN")
    return int(name[5:])


# ------------------------------------------------------------------------------------- embeddings


class EmbeddingFrames(NamedTuple):
    """Token embeddings of every snapshot projected into one 2-D frame."""

    steps: list[int]
    #: ``[snapshot token 2]``: the coordinates of each token at each step
    coords: Float[Tensor, "snapshot n 2"]
    #: the token ids shown
    ids: list[int]
    #: share of the final embeddings' variance the two axes explain
    explained: float


def embedding_frames(W_Es: list[Float[Tensor, "d_vocab d_model"]], steps: list[int], ids: list[int]) -> EmbeddingFrames:
    """Return the chosen rows of each snapshot's W_E projected on the *final* snapshot's two principal axes.

    One frame for all steps (rather than a PCA per step, whose axes flip and rotate) lets a slider
    show tokens moving; early steps sit near the origin when the final axes are not yet used."""
    final = W_Es[-1][ids].float()
    mean = final.mean(0)
    _, S, Vh = torch.linalg.svd(final - mean, full_matrices=False)
    axes = Vh[:2].T  # [d_model 2]
    coords = torch.stack([(W[ids].float() - mean) @ axes for W in W_Es])
    explained = float((S[:2] ** 2).sum() / (S**2).sum().clamp_min(1e-30))
    return EmbeddingFrames(list(steps), coords, list(ids), explained)


# ------------------------------------------------------------------------------ heads over training


class SnapshotHeads(NamedTuple):
    """One snapshot measured on fixed repeated random tokens."""

    step: int
    #: per-head scores ``[layer head]``
    induction: Float[Tensor, "layer head"]
    previous_token: Float[Tensor, "layer head"]
    #: every head's pattern on the first sequence, ``[layer head query key]``
    pattern: Float[Tensor, "layer head q k"]
    #: mean loss on the first and on the repeated copy
    loss_first: float
    loss_repeat: float
    #: logit lens: the repeat copy's loss decoded from resid_pre of each block and the final residual
    #: (``n_layers + 1`` values; the last equals ``loss_repeat``)
    lens_repeat: list[float]


def repeated_sequence(model, seq_len: int, batch: int = 8, seed: int = 1):
    """Return the fixed repeated random tokens every snapshot is measured on (a ``RepeatedTokens``)."""
    return repeated_random_tokens(default_spec(model, seq_len=seq_len, batch=batch, seed=seed), model.cfg.d_vocab)


def snapshot_heads(model, step: int, seq_len: int, batch: int = 8) -> SnapshotHeads:
    """Return a snapshot's induction / previous-token scores, patterns and per-copy losses."""
    seq = repeated_sequence(model, seq_len, batch)
    tokens = seq.tokens.to(model.embed.W_E.device)
    with torch.inference_mode():
        scores = score_heads(model, tokens)
        names = [act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
        _, cache = model.run_with_cache(tokens[:1], names_filter=names, device="cpu", dtype=torch.float32)
        lens = [repeat_losses(next_token_loss(model.unembed_resid(r), tokens).float().cpu(), seq).second
                for r in lens_residuals(model, tokens)]
    losses = repeat_losses(scores.loss, seq)
    return SnapshotHeads(step, scores.induction.float().cpu(), scores.previous_token.float().cpu(),
                         torch.stack([cache[n][0] for n in names]), losses.first, losses.second, lens)


def phase_change(steps: list[int], best_induction: list[float]) -> tuple[int, int] | None:
    """Return the two consecutive snapshot steps between which the best induction score rises most."""
    if len(steps) < 2:
        return None
    i = max(range(1, len(steps)), key=lambda i: best_induction[i] - best_induction[i - 1])
    return steps[i - 1], steps[i]


# --------------------------------------------------------------------------------- loss and schedule


def training_log(model_dir: str | Path | None) -> pd.DataFrame:
    """Return the run's ``metrics.jsonl`` as a DataFrame (empty when there is none)."""
    path = None if model_dir is None else Path(model_dir) / METRICS_FILE
    if path is None or not path.is_file():
        return pd.DataFrame()
    return pd.DataFrame(read_metrics(path))


def lr_schedule(train_cfg, steps: Int[Tensor, " n"] | list[int]) -> list[float]:
    """Return the learning rate at each step (warmup + cosine, :func:`workbench.train.lr_at`).

    The training loop logs ``lr`` after the step's update, i.e. ``lr_at(step - 1)`` for 1-based steps."""
    return [lr_at(train_cfg, max(0, int(s) - 1)) for s in steps]


def recipe_train_config(model_name: str):
    """Return the TrainConfig of a built-in model's recipe, or None for other models."""
    recipe = RECIPES.get(model_name)
    return None if recipe is None else recipe.train
