"""Training loop for small models: AdamW, warmup + cosine, clipping, checkpoints with exact resume.

The loop is blind to where tokens come from. It takes a :class:`BatchSource`, an object whose
``batch(step)`` returns the ``[batch pos]`` token ids of that step. Because a batch is a pure
function of the step, the data position in a checkpoint is just the step number, and a resumed
run sees exactly the batches an unbroken one would have seen (``workbench.corpora`` provides
sources for corpus windows and synthetic sequences; :class:`IterableBatches` wraps any iterable).

A run directory holds:

- ``checkpoint/checkpoint.pt``  model, optimiser, RNG states, step (written atomically)
- ``metrics.jsonl``             one JSON object per logged step / evaluation
- ``snapshots/step_NNNNNN/``    native checkpoints at the chosen steps (training dynamics)
- ``config.json``, ``model.safetensors``  the final model (``HookedGPT.load(run_dir)``)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.errors import CheckpointError, ConfigError, WorkbenchError
from workbench.locking import output_lock
from workbench.runs import (  # the run scaffold
    CHECKPOINT_DIR,
    METRICS_FILE,
    LRSchedule,
    MetricsLog,
    check_same_settings,
    lr_at,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from workbench.runs import read_metrics as read_metrics  # re-exported for callers of workbench.train
from workbench.runs import truncate_metrics as truncate_metrics

CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_DIR = "snapshots"


class TrainingDivergedError(WorkbenchError, FloatingPointError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept untouched."""


@dataclass(frozen=True)
class LMTrainConfig:
    """How to train a language model: optimiser, schedule, precision and what to write where."""

    steps: int
    """total optimiser steps; also fixes the length of the cosine schedule"""
    lr: float = 1e-3
    """peak learning rate, reached at the end of the warmup"""
    warmup_steps: int = 100
    """linear warmup from lr / warmup_steps to lr over this many steps"""
    min_lr_ratio: float = 0.1
    """the cosine decays the learning rate to lr * min_lr_ratio at the last step"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, applied to matrices only (not to biases and norm weights)"""
    beta1: float = 0.9
    """AdamW's first-moment decay"""
    beta2: float = 0.95
    """AdamW's second-moment decay"""
    grad_clip: float | None = 1.0
    """clip the global gradient norm to this value; None disables clipping"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs the forward pass under torch.autocast(bfloat16); weights and optimiser stay fp32"""
    checkpoint_every: int = 500
    """write a checkpoint (and evaluate) every this many steps, and always at the end"""
    eval_every: int | None = None
    """evaluate every this many steps (None: at each checkpoint)"""
    log_every: int = 10
    """write the training loss to metrics.jsonl every this many steps"""
    snapshot_steps: tuple[int, ...] = ()
    """steps at which to save a full model snapshot (0 = the initialisation)"""
    val_batch_size: int = 64
    """validation windows per evaluation batch"""
    max_val_windows: int = 512
    """the most validation windows one evaluation reads"""
    seed: int = 0
    """seeds torch/python RNGs at the start (the loop itself draws nothing random; this keeps it so for
    anything that does, e.g. a future dropout)"""
    device: str = "cpu"
    """where the model trains: cpu, cuda, cuda:N or mps"""

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("warmup_steps must be >= 0 and checkpoint_every, log_every >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r} is not one of ('fp32', 'bf16')")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive or None, got {self.grad_clip}")
        bad = [s for s in self.snapshot_steps if not 0 <= s <= self.steps]
        if bad:
            raise ConfigError(f"snapshot steps {bad} lie outside [0, steps={self.steps}]")

    @property
    def schedule(self) -> LRSchedule:
        """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
        return LRSchedule(lr=self.lr, total_steps=self.steps, warmup_steps=self.warmup_steps, decay="cosine",
                          min_lr_ratio=self.min_lr_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["snapshot_steps"] = list(self.snapshot_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LMTrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "snapshot_steps" in d:
            d["snapshot_steps"] = tuple(d["snapshot_steps"])
        return cls(**d)


#: The old name, kept for existing callers (``workbench.sae.train.TrainConfig`` is the SAE trainer's).
TrainConfig = LMTrainConfig

#: LMTrainConfig fields that may differ between a checkpoint and the run resuming it: they change what
#: is written or how fast, never the trajectory of the weights.
RESUMABLE_CHANGES = frozenset(
    {"checkpoint_every", "eval_every", "log_every", "snapshot_steps", "max_val_windows", "val_batch_size"})


@runtime_checkable  # so that a runtime type checker (the tests' jaxtyping + beartype) can check it
class BatchSource(Protocol):
    """Anything whose ``batch(step)`` gives that step's token ids; the same step must give the same batch."""

    def batch(self, step: int) -> Int[Tensor, "batch pos"]: ...


class IterableBatches:
    """A :class:`BatchSource` over a plain iterable of token batches, read strictly in order.

    Resuming at step k re-reads and discards the first k batches, so the iterable must yield the
    same sequence each time it is iterated (a list, or a generator built from a fixed seed).
    """

    def __init__(self, make_iterable: Callable[[], Iterable[Tensor]]):
        self.make_iterable = make_iterable
        self._it, self._next = None, 0

    def batch(self, step: int) -> Int[Tensor, "batch pos"]:
        if self._it is None or step < self._next:
            self._it, self._next = iter(self.make_iterable()), 0
        try:
            while self._next < step:
                next(self._it)
                self._next += 1
            self._next += 1
            return next(self._it)
        except StopIteration:
            raise ConfigError(f"the batch iterable ran out before step {step}; give fewer steps or more data") from None


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    #: the step the run stopped at (== steps unless stopped early with ``stop_at``)
    step: int
    #: training loss of the last step
    train_loss: float
    #: validation loss at the last evaluation (None without validation windows)
    val_loss: float | None
    out_dir: Path


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """Return the per-position cross entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def make_optimizer(model: torch.nn.Module, cfg: LMTrainConfig) -> torch.optim.AdamW:
    """Return AdamW with weight decay on matrices only (decaying norm gains and biases only hurts)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate_loss(model, windows: Int[Tensor, "batch pos"], cfg: LMTrainConfig) -> float:
    """Return the mean next-token loss over (at most ``cfg.max_val_windows`` of) ``windows``."""
    was_training = model.training
    model.eval()
    windows = windows[: cfg.max_val_windows]
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], cfg.val_batch_size):
        batch = windows[start : start + cfg.val_batch_size].to(cfg.device)
        with _autocast(cfg):
            logits = model(batch)
        losses = next_token_loss(logits, batch)
        total += float(losses.sum())
        count += losses.numel()
    model.train(was_training)
    return total / count


def _autocast(cfg: LMTrainConfig):
    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def save_checkpoint(out_dir: Path, model, optimizer, cfg: LMTrainConfig, step: int, val_loss: float | None) -> None:
    """Write the training state at ``step`` atomically (a kill mid-write leaves the previous one intact)."""
    state = {
        "step": step,
        # the data position: batch(step) is the next batch to train on
        "data": {"next_batch": step},
        "model_config": model.cfg.to_dict(),
        "train_config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "val_loss": val_loss,
    }
    write_checkpoint(checkpoint_path(out_dir), state)


def load_checkpoint(out_dir: Path, model, optimizer, cfg: LMTrainConfig) -> dict:
    """Restore model, optimiser and RNG from ``out_dir``'s checkpoint after checking it fits this run."""
    path = checkpoint_path(out_dir)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}; start without --resume")
    state = read_checkpoint(path, cfg.device)
    _check_state(state, path)
    saved_model = state.get("model_config", {})
    diff = {k: (saved_model.get(k), v) for k, v in model.cfg.to_dict().items() if saved_model.get(k) != v}
    if diff:
        raise CheckpointError(
            f"the checkpoint in {path.parent} was written for a different model config "
            f"(field: (checkpoint, now) = {diff}); resume with the same config or choose another output directory"
        )
    check_same_settings(state.get("train_config", {}), cfg.to_dict(), RESUMABLE_CHANGES, path,
                        "resume with the same settings or choose another output directory")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


def _check_state(state, path: Path) -> None:
    """Raise CheckpointError unless ``state`` has the shape :func:`save_checkpoint` writes."""
    want = {"step": int, "model_config": dict, "train_config": dict, "model": dict, "optimizer": dict, "rng": dict}
    bad = [k for k, kind in want.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if not bad:
        rng = state["rng"]
        python = rng.get("python")
        python_ok = isinstance(python, (tuple, list)) and len(python) == 3
        if not isinstance(rng.get("torch"), torch.Tensor) or not python_ok:
            bad = ["rng"]
    if bad:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this workbench (missing or malformed: {', '.join(bad)}); "
            "delete it to start over"
        )


# ----------------------------------------------------------------------------------------- loop


def train(
    model,
    batches: BatchSource,
    cfg: LMTrainConfig,
    out_dir: str | Path,
    *,
    val_windows: Int[Tensor, "batch pos"] | None = None,
    evaluate: Callable[[object], dict[str, float]] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``batches`` for ``cfg.steps`` steps and return how it ended.

    ``val_windows``: held-out windows whose loss is logged as ``val_loss`` at each evaluation.
    ``evaluate(model) -> {name: value}``: extra numbers logged at each evaluation (e.g. head scores).
    ``resume``: continue from ``out_dir``'s checkpoint (which must match the model and ``cfg``).
    ``stop_at``: stop after this step (checkpoint written) as if the run had been killed there; the
    schedule still follows ``cfg.steps``, so resuming later gives the unbroken run's weights.

    Raises :class:`TrainingDivergedError` on a NaN/inf loss or gradient, leaving the last good
    checkpoint in place.
    """
    out_dir = Path(out_dir)
    # One writer per run directory: a second run on it would interleave metrics.jsonl and checkpoints.
    with output_lock(out_dir):
        return _train_locked(model, batches, cfg, out_dir, val_windows=val_windows, evaluate=evaluate,
                             resume=resume, stop_at=stop_at, progress=progress)


def _train_locked(model, batches: BatchSource, cfg: LMTrainConfig, out_dir: Path, *, val_windows, evaluate,
                  resume: bool, stop_at: int | None, progress: bool) -> TrainResult:
    model.to(cfg.device)
    model.train()
    optimizer = make_optimizer(model, cfg)

    start = 0
    if resume:
        start = int(load_checkpoint(out_dir, model, optimizer, cfg)["step"])
    else:
        if checkpoint_path(out_dir).is_file():
            raise CheckpointError(
                f"{out_dir} already holds a training checkpoint; resume it (--resume) or choose another output "
                "directory"
            )
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    metrics = MetricsLog(out_dir / METRICS_FILE, start if resume else None)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)

    first = batches.batch(start)
    _check_batch(first, model, start)
    if start == 0 and 0 in cfg.snapshot_steps:
        model.save(out_dir / SNAPSHOT_DIR / "step_000000")

    eval_every = cfg.eval_every or cfg.checkpoint_every
    last_good = start if resume else None
    val_loss = None
    loss_value = float("nan")
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, end):
            tokens = (first if step == start else batches.batch(step)).to(cfg.device)
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(cfg):
                logits = model(tokens)
            loss = next_token_loss(logits, tokens).mean()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                _diverged("loss", loss_value, step, last_good, out_dir)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = _grad_norm(model, cfg.grad_clip)
            if not math.isfinite(grad_norm):
                _diverged("gradient norm", grad_norm, step, last_good, out_dir)
            optimizer.step()
            done = step + 1  # steps completed; checkpoints, snapshots and metrics are keyed by it
            bar.update(1)

            if done % cfg.log_every == 0 or done == cfg.steps:
                metrics.write({"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                               "tokens": done * tokens.numel(), "elapsed_s": round(time.perf_counter() - t0, 3)})
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if done % eval_every == 0 or done == cfg.steps:
                record = {"step": done}
                if val_windows is not None:
                    val_loss = record["val_loss"] = evaluate_loss(model, val_windows, cfg)
                if evaluate is not None:
                    record.update(evaluate(model))
                if len(record) > 1:
                    metrics.write(record)
            if done in cfg.snapshot_steps:
                model.save(out_dir / SNAPSHOT_DIR / f"step_{done:06d}")
            if done % cfg.checkpoint_every == 0 or done == end:
                save_checkpoint(out_dir, model, optimizer, cfg, done, val_loss)
                last_good = done
    finally:
        bar.close()
    if end == cfg.steps:
        model.save(out_dir)
    return TrainResult(step=end, train_loss=loss_value, val_loss=val_loss, out_dir=out_dir)


def _check_batch(tokens: Tensor, model, step: int) -> None:
    if tokens.ndim != 2:
        raise ConfigError(f"batch {step} has shape {tuple(tokens.shape)}; expected token ids [batch, pos]")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ConfigError(
            f"the data's windows have {tokens.shape[1]} tokens but the model's context is {model.cfg.n_ctx} "
            f"(n_ctx); make windows of at most {model.cfg.n_ctx} tokens or build the model with "
            f"n_ctx >= {tokens.shape[1]}"
        )
    if tokens.shape[1] < 2:
        raise ConfigError(f"batch {step} has {tokens.shape[1]} position(s); next-token training needs at least 2")


def _grad_norm(model, clip: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def _diverged(what: str, value: float, step: int, last_good: int | None, out_dir: Path):
    kept = (
        f"the last good checkpoint (step {last_good}) is kept in {out_dir / CHECKPOINT_DIR}"
        if last_good is not None
        else "no checkpoint had been written yet"
    )
    raise TrainingDivergedError(
        f"the {what} became {value} at step {step + 1}; training stopped and {kept}. "
        "Lower the learning rate, enable gradient clipping or use fp32, then start again "
        "(a resume follows the same settings and would diverge the same way)"
    )
