"""The run scaffold every trainer shares: learning-rate schedule, atomic checkpoint file, metrics log.

A trainer (``workbench.train`` for language models, ``workbench.sae.train`` for SAEs and
transcoders) keeps only its step and what its checkpoint holds; this module owns how a run
directory is written so that the trainers cannot drift apart:

- :func:`lr_at`: the learning rate at a step, from the config's :class:`LRSchedule`.
- :func:`write_checkpoint` / :func:`read_checkpoint`: one state dict per file, written to a
  temporary file and renamed (a kill mid-write leaves the previous checkpoint intact), read with
  ``torch.load(weights_only=True)`` (tensors and plain containers only: a crafted file cannot run code).
- :func:`check_same_settings`: a resumed run must follow the settings it was started with.
- :class:`MetricsLog`, :func:`read_metrics`, :func:`truncate_metrics`: ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from workbench.errors import CheckpointError, DataError

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup, then a decay: ``cosine`` (to ``lr * min_lr_ratio`` at the last step) or
    ``linear`` (constant, then linearly to 0 over the last ``decay_fraction`` of the steps)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    decay: Literal["cosine", "linear"] = "cosine"
    #: cosine: the floor, as a fraction of lr
    min_lr_ratio: float = 0.0
    #: linear: the final fraction of the steps over which lr decays to 0
    decay_fraction: float = 1.0


@runtime_checkable  # so that a runtime type checker (the tests' jaxtyping + beartype) can check it
class Scheduled(Protocol):
    """A training config that knows its learning-rate schedule."""

    @property
    def schedule(self) -> LRSchedule: ...


def lr_at(cfg: Scheduled, step: int) -> float:
    """Return the learning rate of optimiser step ``step`` (0-based) under ``cfg.schedule``."""
    s = cfg.schedule
    if s.warmup_steps and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.decay == "cosine":
        decay_steps = max(1, s.total_steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / decay_steps)
        floor = s.lr * s.min_lr_ratio
        return floor + (s.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = int(s.total_steps * s.decay_fraction)
    if decay_steps and step >= s.total_steps - decay_steps:
        return s.lr * (s.total_steps - step) / decay_steps
    return s.lr


# ---------------------------------------------------------------------------------- checkpoints


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: to ``<path>.tmp`` first, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, device: torch.device | str) -> dict[str, Any]:
    """Return the state dict :func:`write_checkpoint` wrote to ``path``, its tensors on ``device``.

    Raises :class:`CheckpointError` for a file that is not a readable checkpoint (truncated,
    foreign, or holding anything but tensors and plain containers)."""
    try:  # weights_only: tensors and plain containers only; a crafted pickle cannot run code
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a truncated, foreign or malicious file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} cannot be read as a training checkpoint ({reason[:200]}); delete it to start over"
        ) from None
    return state


def check_same_settings(saved: dict[str, Any], now: dict[str, Any], resumable: Iterable[str], path: Path,
                        way_out: str) -> None:
    """Raise CheckpointError naming the fields (outside ``resumable``) where ``saved`` and ``now`` differ:
    a resumed run must follow the schedule it was started with."""
    resumable = frozenset(resumable)
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in resumable and saved.get(k) != v}
    if diff:
        raise CheckpointError(
            f"the checkpoint in {path.parent} was written with different training settings "
            f"(field: (checkpoint, now) = {diff}); a resumed run must follow the same schedule, so {way_out}"
        )


def rng_state() -> dict[str, Any]:
    """Return the torch (CPU and CUDA) and Python RNG states, as a checkpoint keeps them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (Python's state comes back from a checkpoint as lists)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------- metrics


class MetricsLog:
    """Appends JSON lines; on resume it first drops records past the checkpoint so the file reads as one run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            truncate_metrics(path, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """Return the records of a ``metrics.jsonl`` in file order (training-loss records carry ``loss``).

    A last line that does not parse is skipped: a job killed mid-write leaves one. A bad line
    anywhere else, or a record that is not an object with a ``step``, raises :class:`DataError`
    naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the training log {path} ({exc}); give the path of a {METRICS_FILE}") from exc
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(numbered) - 1:
                break  # a line cut by a killed run
            raise DataError(
                f"{path} line {i} is not JSON ({exc.msg}): {line[:80]!r}; the log is corrupt before its "
                "last line, so fix or delete that line (or the file) and read it again"
            ) from None
        if not isinstance(record, dict) or "step" not in record:
            raise DataError(f"{path} line {i} is not a metrics record (a JSON object with a 'step'): {line[:80]!r}")
        records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a run logged after ``step`` (the checkpoint it resumes from), and a line a kill
    cut short, so the log of a resumed run reads as one run. No file: nothing to do."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
