"""SAE evaluation: losses with the SAE spliced into the model, plus reconstruction statistics over a store.

Splicing replaces the activation at the SAE's hook by its reconstruction during the forward pass
(``model.run_with_hooks``), so what is measured is what the rest of the model makes of the SAE's
output, not just how close ``x_hat`` is to ``x``:

- ``ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)``: 1 when the spliced model
  is as good as the clean one, 0 when it is no better than zeroing the activation (zero ablation).
- ``delta_loss = CE_spliced - CE_clean``, and the KL divergence of the spliced (and zero-ablated)
  next-token distributions from the clean ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from workbench.errors import ConfigError, DataError
from workbench.sae.metrics import ReconstructionMetrics, evaluate_reconstruction
from workbench.sae.model import SAE
from workbench.store import ActivationStore


@dataclass(frozen=True)
class SpliceConfig:
    """Which tokens to run and where to splice."""

    batch_windows: int = 8
    """Windows per forward pass."""
    max_windows: int | None = None
    """Evaluate on at most this many windows (None: all given)."""
    first_position: int = 0
    """Positions before this one keep their clean activation and their predictions are not scored:
    an SAE trained on a store with ``first_position=1`` never saw the BOS position."""

    def __post_init__(self) -> None:
        if self.batch_windows < 1 or self.first_position < 0 or (self.max_windows is not None and self.max_windows < 1):
            raise ConfigError(
                f"SpliceConfig needs batch_windows >= 1 (got {self.batch_windows}), first_position >= 0 "
                f"(got {self.first_position}) and max_windows None or >= 1 (got {self.max_windows})"
            )


class SpliceMetrics(NamedTuple):
    """Next-token losses with the SAE's reconstruction spliced in, against clean and zero-ablated runs."""

    ce_clean: float
    """Mean next-token cross-entropy of the unmodified model (nats)."""
    ce_spliced: float
    """... with the hook's activation replaced by the SAE's reconstruction."""
    ce_zero: float
    """... with the hook's activation replaced by zeros."""
    ce_loss_recovered: float
    """``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``; NaN if zero ablation costs nothing."""
    delta_loss: float
    """``ce_spliced - ce_clean``."""
    kl_spliced: float
    """Mean KL(clean || spliced) of the next-token distributions (nats)."""
    kl_zero: float
    """Mean KL(clean || zero-ablated)."""
    n_tokens: int
    """Predictions scored."""


class SAEEvaluation(NamedTuple):
    """Both halves of an evaluation, as :func:`evaluate_sae` gives them."""

    reconstruction: ReconstructionMetrics
    """L0, FVU, dead and dense fractions over the store's rows (``workbench.sae.metrics``)."""
    splice: SpliceMetrics

    def to_dict(self) -> dict[str, Any]:
        """Return the scalar numbers (for JSON reports)."""
        return {**self.reconstruction.summary(), **self.splice._asdict()}


def _flat_hook_fn(sae: SAE, hook_name: str, first_position: int, mode: str):
    """Return a hook function replacing the activation by the SAE reconstruction (or zeros)."""

    def fn(act: Tensor, hook) -> Tensor:
        lead = act.shape[:2]
        flat = act.reshape(*lead, -1)
        if flat.shape[-1] != sae.cfg.d_in:
            raise DataError(
                f"hook {hook_name!r} carries {flat.shape[-1]} features a position ({tuple(act.shape[2:])}), "
                f"the SAE reads d_in={sae.cfg.d_in}; use an SAE trained on this hook"
            )
        if mode == "zero":
            new = torch.zeros_like(flat)
        else:
            new = sae(flat.to(sae.W_enc.dtype)).x_hat.to(flat.dtype)
        if first_position:
            new = torch.cat([flat[:, :first_position], new[:, first_position:]], dim=1)
        return new.reshape(act.shape)

    return fn


@torch.no_grad()
def spliced_metrics(
    model: Any,
    sae: SAE,
    hook: str,
    windows: Int[Tensor, "batch pos"],
    cfg: SpliceConfig = SpliceConfig(),
) -> SpliceMetrics:
    """Return CE loss recovered, delta loss and KL with ``sae`` spliced into ``model`` at ``hook``."""
    model.hook_point(hook)  # an unknown hook is an error naming the nearest ones
    windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.shape[1] < cfg.first_position + 2:
        raise DataError(
            f"expected token windows [n_windows, n_ctx] with n_ctx >= first_position + 2, got {tuple(windows.shape)}"
        )
    if cfg.max_windows is not None:
        windows = windows[: cfg.max_windows]
    device = sae.W_enc.device
    was_training = sae.training
    sae.eval()
    splice = _flat_hook_fn(sae, hook, cfg.first_position, "sae")
    zero = _flat_hook_fn(sae, hook, cfg.first_position, "zero")
    sums = torch.zeros(5, dtype=torch.float64)  # ce clean, spliced, zero; kl spliced, zero
    n = 0
    try:
        for b0 in range(0, windows.shape[0], cfg.batch_windows):
            tokens = windows[b0 : b0 + cfg.batch_windows].to(device)
            targets = tokens[:, cfg.first_position + 1 :]
            # positions p >= first_position predict token p + 1
            scored = slice(cfg.first_position, -1)
            # float32 over the vocabulary (a float64 copy of [batch pos d_vocab] costs more than the
            # model's own unembedding on a big vocabulary); per-token terms are summed in float64
            logp_clean = F.log_softmax(model(tokens)[:, scored].float(), dim=-1)
            logits_sae = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
            logp_sae = F.log_softmax(logits_sae[:, scored].float(), dim=-1)
            logp_zero = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])[:, scored].float(), dim=-1)
            p_clean = logp_clean.exp()
            for i, lp in enumerate((logp_clean, logp_sae, logp_zero)):
                sums[i] += -lp.gather(-1, targets[..., None]).double().sum().cpu()
            sums[3] += (p_clean * (logp_clean - logp_sae)).sum(-1).double().sum().cpu()
            sums[4] += (p_clean * (logp_clean - logp_zero)).sum(-1).double().sum().cpu()
            n += targets.numel()
    finally:
        sae.train(was_training)
    ce_clean, ce_sae, ce_zero, kl_sae, kl_zero = (sums / n).tolist()
    for name, value in (("clean", ce_clean), ("spliced", ce_sae)):
        if not math.isfinite(value):
            raise DataError(f"the {name} cross-entropy at hook {hook!r} is {value}; "
                            "the model or SAE gives non-finite logits")
    gap = ce_zero - ce_clean
    recovered = (ce_zero - ce_sae) / gap if abs(gap) > 1e-9 else float("nan")
    return SpliceMetrics(ce_clean, ce_sae, ce_zero, recovered, ce_sae - ce_clean, kl_sae, kl_zero, n)


@dataclass(frozen=True)
class EvalConfig:
    """How much of a store an evaluation reads."""

    batch_size: int = 4096
    """Rows per SAE batch for the reconstruction statistics."""
    max_rows: int | None = None
    """Read at most this many rows of the store (None: all)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of rows counts as dense."""
    splice: SpliceConfig = SpliceConfig()
    """Spliced-loss settings (``first_position`` is taken from the store when left at 0)."""


def evaluate_sae(model: Any, sae: SAE, store: ActivationStore, hook: str,
                 cfg: EvalConfig = EvalConfig()) -> SAEEvaluation:
    """Return reconstruction statistics over ``store``'s rows of ``hook`` and spliced losses on its windows.

    The store must come from ``model`` and hold ``hook`` at the SAE's width; anything else is an
    error, not a silently meaningless number.
    """
    store.check_model(model)
    store.check_sae(sae, hook)
    stop = store.n_rows if cfg.max_rows is None else min(cfg.max_rows, store.n_rows)
    rec = evaluate_reconstruction(
        sae, (b.acts for b in store.iter_rows(hook, cfg.batch_size, stop=stop)), dense_threshold=cfg.dense_threshold
    )
    splice_cfg = cfg.splice
    first = store.manifest.first_position
    if splice_cfg.first_position == 0 and first:
        splice_cfg = SpliceConfig(splice_cfg.batch_windows, splice_cfg.max_windows, first)
    windows = store.windows()
    n_windows = max(1, math.ceil(stop / store.manifest.rows_per_window))
    splice = spliced_metrics(model, sae, hook, windows[:n_windows], splice_cfg)
    return SAEEvaluation(rec, splice)
