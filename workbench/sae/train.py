"""Training sparse autoencoders on any stream of activation batches.

The trainer is blind to where activations come from: it takes ``[batch, d_in]`` tensors (or a
function giving an iterator from a step offset, so a resumed run continues exactly where it
stopped). Under ``torchrun`` each process trains on its own slice of every global batch and the
gradients are averaged, so N processes with batch b train the same SAE as one with batch N*b; the
caller joins the process group first (:func:`workbench.distributed.init_distributed`).

TopK and BatchTopK training never multiply by the dense latent matrix: only the encoder's forward
matmul is dense; the decoder, the encoder's gradient and the AuxK loss touch only the active latents
through gather/sparse-matrix kernels (:mod:`workbench.sae.kernels`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from workbench.distributed import DistInfo, dist_info
from workbench.errors import CheckpointError, ConfigError, DataError, InputError
from workbench.locking import lock_name, output_lock
from workbench.runs import (  # the run scaffold the LM trainer shares; METRICS_FILE, lr_at re-exported for callers
    CHECKPOINT_DIR,
    METRICS_FILE,
    LRSchedule,
    MetricsLog,
    check_same_settings,
    lr_at,
    read_checkpoint,
    write_checkpoint,
)
from workbench.sae.kernels import (
    SparsePattern,
    batchtopk_pattern,
    decode_sparse,
    encode_at,
    jumprelu,
    jumprelu_step,
    make_pattern,
    scatter_sum,
    topk_pattern,
    values_at,
)
from workbench.sae.model import SAE, SAEConfig, batch_topk
from workbench.train import TrainingDivergedError

#: A source of activation batches (a transcoder's: (input, target) pairs): an iterable, or a function from
#: the first step to an iterable.
Batch = Tensor | tuple[Tensor, Tensor]
Batches = Iterable[Batch] | Callable[[int], Iterable[Batch]]


#: SAETrainConfig fields added after checkpoints were first written: missing from one means their default.
_ADDED_SINCE = frozenset({"sparse_batchtopk", "skip_init", "latent_init_scale", "skip_lr_scale", "precision"})

SkipInit = Literal["zero", "ridge"]
SKIP_INITS: tuple[str, ...] = ("zero", "ridge")

#: What :attr:`SAETrainConfig.precision` may be, and so the transcoder pipeline's precisions
#: (``workbench.sae.transcoders`` re-exports it).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

#: Ridge penalty of ``skip_init='ridge'``, relative to the input's mean per-dimension variance.
RIDGE_PENALTY = 1e-3

#: SAETrainConfig fields a resumed run may change: they decide what is written and shown, never the weights.
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "log_every", "progress"})


@dataclass(frozen=True)
class SAETrainConfig:
    """How to train an SAE (its shape and kind are in ``SAEConfig``)."""

    total_steps: int
    """Optimizer steps to run."""
    lr: float = 4e-4
    """Peak Adam learning rate."""
    warmup_steps: int = 0
    """Linear learning-rate warmup from 0."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    l1_coefficient: float = 5.0
    """relu: weight of the L1 penalty on latents (decoder rows have unit norm)."""
    l1_warmup_steps: int = 0
    """relu: ramp the L1 coefficient up from 0 over this many steps."""
    l0_coefficient: float = 1e-3
    """jumprelu: weight of the (straight-through) L0 penalty."""
    jumprelu_bandwidth: float = 1e-3
    """jumprelu: width of the rectangle kernel of the threshold's pseudo-gradient."""
    aux_k_coefficient: float = 1 / 32
    """topk/batchtopk: weight of the AuxK loss that revives dead latents (Gao et al. 2024)."""
    aux_k: int | None = None
    """topk/batchtopk: dead latents used by AuxK per row; default d_in // 2."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead."""
    resample_every: int = 0
    """relu: every this many steps, re-initialise dead latents on badly reconstructed inputs (0: never)."""
    batchtopk_threshold_lr: float = 0.01
    """batchtopk: EMA rate of the inference threshold (the smallest activation kept). Over a short run the EMA
    lags behind the weights; :func:`batchtopk_threshold` computes the threshold from the final weights
    (the transcoder pipeline does so after training: ``TranscoderRecipe.calibrate_windows``)."""
    init_b_dec_mean: bool = True
    """Start b_dec at the mean of the first batch."""
    sparse_batchtopk: bool = True
    """batchtopk: train through the sparse kernels as TopK does (only the active entries after the encoder's
    forward matmul); False takes the dense ``[batch, d_sae]`` path (same gradients, kept as the reference)."""
    skip_init: SkipInit = "zero"
    """Skip transcoders: ``zero`` starts ``W_skip`` at 0 (and ``b_dec`` at the target mean); ``ridge`` starts
    ``W_skip`` and ``b_dec`` at the ridge regression of the target on the input over the first (global)
    batch, so the latents learn only what a linear map leaves over from the first step."""
    latent_init_scale: float | None = None
    """Transcoders: at the start, scale the encoder so that the latents' output on the first batch has this
    fraction of the norm of what is left to predict (the target minus b_dec and the skip term); None leaves
    the unit-norm random encoder, whose 64 active latents can swamp a small MLP output (FVU ~6 at first)."""
    skip_lr_scale: float = 1.0
    """Skip transcoders: ``W_skip``'s learning rate as a multiple of ``lr``."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """topk/batchtopk (sparse step): bf16 picks each step's active latents from a bfloat16 encoder matmul, the
    step's one dense product, and then computes the chosen entries' values exactly in fp32
    (:func:`workbench.sae.kernels.values_at`); weights, gradients, losses and Adam stay fp32, and only latents
    whose pre-activations tie within bfloat16's rounding may be chosen differently. On this CPU (AVX512-BF16)
    a BatchTopK skip transcoder's step at SmolLM2's recipe shape (576 -> 2,304, k 64, 4,064 rows) takes
    0.157 s against 0.177 s in fp32 (``python -m benchmarks.bench_transcoders --part selection``): the skip
    term's products and the sparse kernels, which stay fp32, are most of the rest. fp32: every product in fp32."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    log_every: int = 10
    """Append a metrics line every this many steps."""
    seed: int = 0
    """Seeds the SAE's initialisation and any resampling."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"total_steps={self.total_steps} must be at least 1")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must lie in [0, 1]")
        if self.skip_init not in SKIP_INITS:
            raise ConfigError(f"skip_init={self.skip_init!r} is unknown; expected one of {SKIP_INITS}")
        scale = self.latent_init_scale
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"latent_init_scale={self.latent_init_scale} must be a positive number or None")
        if not (math.isfinite(self.skip_lr_scale) and self.skip_lr_scale > 0):
            raise ConfigError(f"skip_lr_scale={self.skip_lr_scale} must be a positive number")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is unknown; expected one of {PRECISIONS}")

    @property
    def schedule(self) -> LRSchedule:
        """Linear warmup, constant, then linear decay to 0 over the last ``decay_fraction`` of the steps."""
        return LRSchedule(lr=self.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps, decay="linear",
                          decay_fraction=self.decay_fraction)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAETrainConfig:
        names = cls.__dataclass_fields__.keys()
        values = {key: value for key, value in data.items() if key in names}
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        return cls(**values)


#: The old name, kept for existing callers (``workbench.train.TrainConfig`` is the LM trainer's).
TrainConfig = SAETrainConfig


@dataclass
class TrainResult:
    """What ``train_sae`` gives back."""

    sae: SAE
    """The trained SAE (in training units; ``workbench.sae.io.save_sae`` folds the scale on save)."""
    steps: int
    """Steps completed in total, including those before a resume."""
    tokens: int
    """Tokens (rows) seen in total, over all processes."""
    resumed_from: int | None
    """The step this run resumed from, or None for a fresh run."""
    last_metrics: dict[str, float] = field(default_factory=dict)
    """The last metrics line written."""
    log_feature_density: Tensor | None = None
    """log10 of each latent's firing frequency over the run (SAELens' ``sparsity.safetensors``)."""


# ---------------------------------------------------------------------------------------------
# The TopK training forward pass and AuxK, on the sparse kernels.
# ---------------------------------------------------------------------------------------------


class SparseForward(NamedTuple):
    """A TopK forward pass in training units, with the pieces the losses need."""

    x_n: Float[Tensor, "batch d_in"]
    """Normalised input."""
    x_c: Float[Tensor, "batch d_in"]
    """Normalised, centred input (detached): what W_enc multiplied."""
    x_hat_n: Float[Tensor, "batch d_in"]
    """Reconstruction in normalised units."""
    pre: Float[Tensor, "batch d_sae"]
    """Dense pre-activations, detached (AuxK picks dead latents from them), in the selection's dtype."""
    values: Tensor
    """Active latent values: [batch, k] (TopK) or flat in pattern order (BatchTopK)."""
    pattern: SparsePattern


def topk_forward(sae: SAE, x: Float[Tensor, "batch d_in"], select_dtype: torch.dtype | None = None) -> SparseForward:
    """TopK or BatchTopK forward pass for training: one dense matmul, everything else only the active entries
    (k a row for TopK, ``values`` [batch, k]; any number a row for BatchTopK, ``values`` flat), plus a skip term.

    ``select_dtype`` (e.g. bfloat16) runs the dense matmul in that dtype to choose the active latents, whose
    values are then computed exactly (``SAETrainConfig.precision``); ``pre`` is then in that dtype."""
    # b_dec detached: the sparse encoder kernel gives b_dec its gradient through the centring itself
    x_n, x_c = sae.encoder_input(x, detach_b_dec=True)
    with torch.no_grad():
        # SAE.pre_acts_of_centered's x_c @ W_enc + b_enc, the bias fused into the GEMM (as trained so far)
        if select_dtype is None or select_dtype == x_c.dtype:
            pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
        else:
            pre = torch.addmm(sae.b_enc.to(select_dtype), x_c.to(select_dtype), sae.W_enc.to(select_dtype))
        if sae.cfg.architecture == "batchtopk":
            pre_values, pattern = batchtopk_pattern(pre, sae.cfg.k)
        else:
            pre_values, pattern = topk_pattern(pre, sae.cfg.k)
        if pre.dtype != x_c.dtype:  # chosen in low precision: the chosen entries' exact values
            pre_values = values_at(x_c, sae.W_enc, sae.b_enc, pattern).view(pre_values.shape)
    values = F.relu(encode_at(sae, x_c, pre_values, pattern))
    x_hat_n = decode_sparse(values, sae.W_dec, pattern) + sae.b_dec
    if sae.W_skip is not None:
        x_hat_n = x_hat_n + sae.skip_out(x_n)
    return SparseForward(x_n, x_c, x_hat_n, pre, values, pattern)


def auxk_loss(
    sae: SAE,
    x_c: Float[Tensor, "batch d_in"],
    pre: Float[Tensor, "batch d_sae"],
    residual: Float[Tensor, "batch d_out"],
    dead: Tensor,
    aux_k: int,
) -> Tensor:
    """AuxK (Gao et al. 2024): the top ``aux_k`` dead latents reconstruct the live latents' error.

    Scaled down when fewer latents are dead than ``aux_k``, as in SAELens.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return residual.new_zeros(())
    k_aux = min(aux_k, n_dead)
    with torch.no_grad():
        # the top dead latents of each row, chosen among the dead columns only (not a masked [batch, d_sae] copy)
        columns = dead.nonzero().squeeze(1)
        aux_values, local = topk_pattern(pre[:, columns], k_aux)
        pattern = make_pattern(columns[local.columns].view(-1, k_aux), pre.shape[-1])
        if pre.dtype != x_c.dtype:  # chosen from a low-precision matmul (SAETrainConfig.precision): exact values
            aux_values = values_at(x_c, sae.W_enc, sae.b_enc, pattern).view(aux_values.shape)
    values = encode_at(sae, x_c, aux_values, pattern)
    recon = decode_sparse(values, sae.W_dec, pattern)
    loss = (recon - residual.detach()).pow(2).sum(-1).mean()
    return loss * min(n_dead / aux_k, 1.0)


# ---------------------------------------------------------------------------------------------
# One step's losses, per architecture.
# ---------------------------------------------------------------------------------------------


class StepLosses(NamedTuple):
    """The losses of one step (local to this process) and what the step needs to track."""

    loss: Tensor
    """Total loss, differentiable."""
    mse: Tensor
    """Reconstruction loss: squared error summed over d_in, mean over rows (normalised units)."""
    sparsity: Tensor
    """The architecture's sparsity/auxiliary term before its coefficient (L1, L0 or AuxK)."""
    fired: Tensor
    """Number of rows in which each latent fired [d_sae]."""
    l0: Tensor
    """Mean number of active latents per row."""
    variance: Tensor
    """Mean squared distance of the normalised inputs from their batch mean (for FVU)."""
    per_row_error: Tensor
    """Squared error of each row (for resampling)."""
    min_active: Tensor
    """batchtopk: the smallest activation kept (inf if none)."""


def compute_losses(
    sae: SAE, x: Float[Tensor, "batch d_in"], cfg: SAETrainConfig, step: int, dead: Tensor,
    target: Float[Tensor, "batch d_out"] | None = None,
) -> StepLosses:
    """Return one step's losses for any architecture.

    An SAE reconstructs ``x``; a transcoder predicts ``target`` (e.g. the MLP's output for its input
    ``x``), and then every reconstruction term below (MSE, AuxK's residual, FVU's variance) is
    measured against ``target``."""
    arch = sae.cfg.architecture
    aux_k = cfg.aux_k or max(sae.cfg.d_in // 2, 1)
    min_active = torch.tensor(math.inf)
    if arch == "topk" or (arch == "batchtopk" and cfg.sparse_batchtopk):
        out = topk_forward(sae, x, torch.bfloat16 if cfg.precision == "bf16" else None)
        x_n, x_hat_n = out.x_n, out.x_hat_n
        active = (out.values > 0).to(x_n.dtype)
        fired = scatter_sum(out.pattern, active)
        l0 = active.sum() / x_n.shape[0]
        if arch == "batchtopk":
            # the positive ones: an entry a bf16 selection kept may be exactly <= 0 (precision='bf16')
            kept = out.values.detach()
            positive = kept[kept > 0]
            if positive.numel():
                min_active = positive.min()
        y_n = x_n if target is None else target.to(x_n.dtype)
        sparsity = auxk_loss(sae, out.x_c, out.pre, y_n - x_hat_n, dead, aux_k)
        coefficient = cfg.aux_k_coefficient
    else:
        x_n, x_c = sae.encoder_input(x)
        pre = sae.pre_acts_of_centered(x_c)
        if arch == "relu":
            acts = F.relu(pre)
            sparsity = acts.sum(-1).mean()
            ramp = min(1.0, (step + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0
            coefficient = cfg.l1_coefficient * ramp
        elif arch == "jumprelu":
            acts = jumprelu(pre, sae.threshold, cfg.jumprelu_bandwidth)
            sparsity = jumprelu_step(pre, sae.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
            coefficient = cfg.l0_coefficient
        else:  # batchtopk
            acts = batch_topk(F.relu(pre), sae.cfg.k)
            kept = acts[acts > 0]
            if kept.numel():
                min_active = kept.min().detach()
            coefficient = cfg.aux_k_coefficient
        x_hat_n = acts @ sae.W_dec + sae.b_dec
        if sae.W_skip is not None:
            x_hat_n = x_hat_n + sae.skip_out(x_n)
        if arch == "batchtopk":
            x_c_detached = x_c.detach()
            y_n = x_n if target is None else target.to(x_n.dtype)
            sparsity = auxk_loss(sae, x_c_detached, pre.detach(), y_n - x_hat_n, dead, aux_k)
        active = acts > 0
        fired = active.sum(0).to(x_n.dtype)
        l0 = active.sum(-1).to(x_n.dtype).mean()
    y_n = x_n if target is None else target.to(x_n.dtype)  # transcoders take normalize_activations='none'
    per_row_error = (x_hat_n - y_n).pow(2).sum(-1)
    mse = per_row_error.mean()
    variance = (y_n - y_n.mean(0)).pow(2).sum(-1).mean().detach()
    return StepLosses(
        mse + coefficient * sparsity, mse, sparsity, fired.detach(), l0.detach(), variance,
        per_row_error.detach(), min_active,
    )


# ---------------------------------------------------------------------------------------------
# Collectives over the process group (workbench.distributed): no-ops in a single process.
# ---------------------------------------------------------------------------------------------


_collectives = threading.local()


@contextmanager
def collective_group(group: Any) -> Iterator[None]:
    """Run this thread's trainer collectives over ``group`` (a ``dist.new_group`` of every rank) instead of
    the default group. Several trainers in one process (a transcoder per layer, each in its thread)
    need one group each: gloo matches collectives by their order within a group, and threads on
    different ranks do not call theirs in the same order."""
    previous = getattr(_collectives, "group", None)
    _collectives.group = group
    try:
        yield
    finally:
        _collectives.group = previous


def _group() -> Any:
    return getattr(_collectives, "group", None)


def _all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    if dist_info().world_size > 1:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op], group=_group())
    return tensor


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=_group())
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _broadcast_parameters(sae: SAE) -> None:
    if dist_info().world_size > 1:
        for tensor in list(sae.parameters()) + list(sae.buffers()):
            dist.broadcast(tensor.data, src=0, group=_group())


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def project_decoder_gradient(sae: SAE) -> None:
    """Remove the part of each decoder row's gradient that would change the row's norm."""
    grad = sae.W_dec.grad
    if grad is not None:
        W = sae.W_dec.detach()
        grad.sub_((grad * W).sum(-1, keepdim=True) * W)


def _open_batches(data: Batches, start: int) -> Iterator[Batch]:
    if callable(data):
        return iter(data(start))
    iterator = iter(data)
    for _ in range(start):  # a plain iterable cannot seek: skip what was already trained on
        next(iterator, None)
    return iterator


def check_batch(x: Any, d_in: int, step: int) -> Tensor:
    """Return ``x`` as a 2-D float tensor, or raise naming what is wrong with it."""
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(
            f"activation batch {step} is {shape}; expected a float tensor [batch, d_in={d_in}]"
        )
    if x.shape[0] == 0:
        raise InputError(f"activation batch {step} has 0 rows; every batch needs at least one [d_in={d_in}] row")
    if x.shape[-1] != d_in:
        raise InputError(
            f"activation batch {step} has width {x.shape[-1]}, but the SAE has d_in={d_in}; "
            f"use an SAE config with d_in={x.shape[-1]} or the store of the right hook"
        )
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise DataError(
            f"activation batch {step} holds {bad} NaN/Inf values (of {x.numel()}); the model or "
            f"the activation store produced them. Training stopped before using this batch; the "
            f"last checkpoint is intact and resuming continues from it"
        )
    return x


def train_sae(
    sae: SAE,
    data: Batches,
    cfg: SAETrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train ``sae`` on ``data`` and return it with the run's totals.

    ``data`` yields this process's ``[batch, d_in]`` slice of each global batch: an iterable, or a
    function from the first step to an iterable (lets a resumed run seek instead of re-reading).
    A transcoder (``sae.cfg.d_out`` set) is trained on ``(x, y)`` pairs instead: ``x [batch, d_in]``
    what it reads, ``y [batch, d_out]`` what it predicts.
    With ``out_dir``, metrics go to ``out_dir/metrics.jsonl`` and checkpoints to
    ``out_dir/checkpoint/``; an existing checkpoint there is resumed from when ``resume``, after
    checking it was written with the same settings (only ``RESUMABLE_CHANGES`` may differ) and batch size.
    One process writes ``out_dir`` at a time (:func:`workbench.locking.output_lock`).

    Raises :class:`workbench.train.TrainingDivergedError` when the loss or the weights stop being
    finite, naming the step; the last good checkpoint is kept.
    """
    if out_dir is None:
        return _train_sae(sae, data, cfg, None, resume)
    with output_lock(out_dir, lock_name(dist_info().rank)):
        return _train_sae(sae, data, cfg, Path(out_dir), resume)


def _train_sae(sae: SAE, data: Batches, cfg: SAETrainConfig, out: Path | None, resume: bool) -> TrainResult:
    info = dist_info()
    device = sae.device
    if sae.cfg.is_transcoder and sae.cfg.architecture == "relu" and cfg.resample_every:
        raise ConfigError("resample_every is for SAEs (it re-aims decoder rows at badly reconstructed inputs); "
                          "train a transcoder with resample_every=0, or as topk/batchtopk whose AuxK revives dead "
                          "latents")
    sparse_step = sae.cfg.architecture == "topk" or (sae.cfg.architecture == "batchtopk" and cfg.sparse_batchtopk)
    if cfg.precision != "fp32" and not sparse_step:
        raise ConfigError(f"precision={cfg.precision!r} speeds up the sparse TopK/BatchTopK step's latent selection; "
                          f"a {sae.cfg.architecture} step (sparse_batchtopk={cfg.sparse_batchtopk}) has none: "
                          "train it with precision='fp32'")
    params = [p for p in sae.parameters()]
    optimizer = torch.optim.Adam(_param_groups(sae, cfg), lr=cfg.lr, betas=cfg.adam_betas, **_fast_adam(device))
    tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    fired_total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    step = tokens = 0
    resumed_from = None
    if out is not None and resume and (out / CHECKPOINT_DIR / "state.pt").exists():
        state = load_checkpoint(out, sae, optimizer, cfg)
        step, tokens = state["step"], state["tokens"]
        tokens_since_fired.copy_(state["tokens_since_fired"])
        fired_total.copy_(state["fired_total"])
        resumed_from = step
    else:
        _broadcast_parameters(sae)
    metrics = None
    if out is not None and info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(
            json.dumps({"sae": sae.cfg.to_dict(), "train": cfg.to_dict(), "world_size": info.world_size}, indent=2)
        )
        # a fresh run owns its metrics file (an earlier run's lines would read as its own); a resumed one drops
        # the lines logged after its checkpoint
        metrics = MetricsLog(out / METRICS_FILE, resumed_from)

    batches = _open_batches(data, step)
    progress = _progress(cfg, step, info.rank)
    saved_rows = tokens // step if resumed_from else None  # the global batch the checkpoint was trained with
    # first step whose loss was not finite (-1: none yet); kept on the device so a step needs no sync
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    last_good = resumed_from

    def checkpoint() -> None:
        nonlocal last_good
        _stop_if_diverged(sae, bad_step, step, last_good, out)
        save_checkpoint(out, sae, optimizer, step, tokens, tokens_since_fired, fired_total, cfg)
        last_good = step
    last: dict[str, float] = {}
    sae.train()
    t_last, tokens_last = time.perf_counter(), tokens
    try:
        while step < cfg.total_steps:
            try:
                item = next(batches)
            except StopIteration:
                raise DataError(
                    f"the activation source ran out after {step} of {cfg.total_steps} steps; cache "
                    f"more activations or lower total_steps"
                ) from None
            try:
                x, y = _split_pair(item, sae, step)
                x = check_batch(x, sae.cfg.d_in, step).to(device, non_blocking=True)
                if y is not None:
                    y = check_batch(y, sae.cfg.out_dim, step).to(device, non_blocking=True)
                    if y.shape[0] != x.shape[0]:
                        raise DataError(f"batch {step}: {x.shape[0]} input rows but {y.shape[0]} target rows")
            except (InputError, DataError):
                if out is not None and step > 0 and step != last_good:
                    checkpoint()
                raise
            if saved_rows is not None:
                if x.shape[0] * info.world_size != saved_rows:
                    raise CheckpointError(
                        f"the checkpoint in {out / CHECKPOINT_DIR} was trained on batches of {saved_rows} rows, "
                        f"this run gives {x.shape[0] * info.world_size}; resume with the same batch size or "
                        "choose another output directory"
                    )
                saved_rows = None
            if step == 0 and resumed_from is None:
                _initialise_from_batch(sae, x, y, cfg)
            global_rows = x.shape[0] * info.world_size
            dead = tokens_since_fired >= cfg.dead_tokens
            losses = compute_losses(sae, x, cfg, step, dead, target=y)
            exploded = (losses.variance > 0) & (losses.mse.detach() > EXPLODED_FVU * losses.variance)
            bad = ~torch.isfinite(losses.loss.detach()) | exploded
            bad_step = torch.where((bad_step < 0) & bad, step + 1, bad_step)

            optimizer.zero_grad(set_to_none=True)
            losses.loss.backward()
            _average_gradients(params, info.world_size)
            project_decoder_gradient(sae)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step) * group.get("lr_scale", 1.0)
            optimizer.step()
            sae.normalize_decoder()
            if sae.cfg.architecture == "jumprelu":
                with torch.no_grad():
                    sae.threshold.clamp_(min=1e-6)

            fired = _all_reduce(losses.fired.to(torch.float64))
            tokens_since_fired += global_rows
            tokens_since_fired[fired > 0] = 0
            fired_total += fired
            if sae.cfg.architecture == "batchtopk":
                _update_batchtopk_threshold(sae, losses.min_active, cfg)
            step += 1
            tokens += global_rows
            if sae.cfg.architecture == "relu" and cfg.resample_every and step % cfg.resample_every == 0:
                resample_dead_latents(sae, optimizer, x, losses.per_row_error, fired_total, cfg, step)

            if step % cfg.log_every == 0 or step == cfg.total_steps:
                _stop_if_diverged(sae, bad_step, step, last_good, out)
                now = time.perf_counter()
                last = _metrics_line(losses, step, tokens, cfg, tokens_since_fired, info)
                last["tokens_per_s"] = (tokens - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens
                if metrics is not None:
                    metrics.write(last)
                progress.set_postfix(mse=f"{last['mse']:.4g}", l0=f"{last['l0']:.1f}")
            progress.update(1)
            if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
    finally:
        progress.close()
    if out is not None and (not cfg.checkpoint_every or step % cfg.checkpoint_every):
        checkpoint()
    _stop_if_diverged(sae, bad_step, step, last_good, out)
    sae.eval()
    density = fired_total / max(tokens, 1)
    return TrainResult(sae, step, tokens, resumed_from, last, torch.log10(density + 1e-10).float())


#: A step whose squared error exceeds this many times its target's variance (FVU) has diverged. A fresh SAE or
#: transcoder starts at an FVU of about 1-6; a SmolLM2 transcoder trained at too high a learning rate went, with
#: every loss finite, from FVU 0.5 to 14 in 50 steps, to 835 in 100 and past 10^7 in 300.
EXPLODED_FVU = 1000.0


def _stop_if_diverged(sae: SAE, bad_step: Tensor, step: int, last_good: int | None, out: Path | None) -> None:
    """Raise TrainingDivergedError if a loss so far was NaN/inf or exploded (:data:`EXPLODED_FVU`), or a weight
    now is NaN/inf (one sync per call)."""
    first = int(_all_reduce(bad_step.clone(), "max"))
    if first < 0:
        finite = torch.stack([torch.isfinite(p).all() for p in sae.parameters()]).all().to(torch.long)
        if int(_all_reduce(finite, "min")):
            return
        first = step
    if out is None:
        kept = "no output directory was given, so nothing was saved"
    elif last_good:
        kept = f"the last good checkpoint (step {last_good}) is kept in {out / CHECKPOINT_DIR}"
    else:
        kept = "no checkpoint had been written yet"
    raise TrainingDivergedError(
        f"the SAE's loss or weights became NaN/inf, or its squared error more than {EXPLODED_FVU:,.0f} times its "
        f"target's variance, at step {first}; training stopped and {kept}. "
        "The activations may be too large (normalize_activations='expected_average_only_in' rescales them) "
        "or the learning rate too high; fix that and start again"
    )


def _split_pair(item: Any, sae: SAE, step: int) -> tuple[Any, Any]:
    """Return ``(x, None)`` for an SAE's batch, ``(x, y)`` for a transcoder's pair; refuse a mix-up."""
    is_pair = isinstance(item, (tuple, list)) and len(item) == 2
    if sae.cfg.is_transcoder and not is_pair:
        raise DataError(f"batch {step} is a single tensor, but a transcoder trains on (input, target) pairs; "
                        "feed pairs (workbench.sae.transcoders.live_pairs, or a store holding both hooks)")
    if not sae.cfg.is_transcoder and is_pair:
        raise DataError(f"batch {step} is a pair, but an SAE reconstructs its input: feed single tensors, or set "
                        "d_out to train a transcoder")
    return (item[0], item[1]) if is_pair else (item, None)


def _fast_adam(device: torch.device) -> dict[str, Any]:
    # The fused kernel exists on CPU and CUDA in recent torch; fall back silently if not.
    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):
        return {}


def _param_groups(sae: SAE, cfg: SAETrainConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one, or ``W_skip`` in its own when ``skip_lr_scale`` sets it apart
    (one group otherwise, so checkpoints written before the option existed still load)."""
    if sae.W_skip is None or cfg.skip_lr_scale == 1.0:
        return [{"params": list(sae.parameters())}]
    rest = [p for p in sae.parameters() if p is not sae.W_skip]
    return [{"params": rest}, {"params": [sae.W_skip], "lr_scale": cfg.skip_lr_scale}]


@torch.no_grad()
def _initialise_from_batch(sae: SAE, x: Tensor, y: Tensor | None, cfg: SAETrainConfig) -> None:
    """Estimate the input scale and b_dec from the first (global) batch. A transcoder's b_dec lives in the
    output space (``y``), and transcoders take no input scale; a skip transcoder with ``skip_init='ridge'``
    starts ``W_skip`` and ``b_dec`` at the ridge fit of ``y`` on ``x``; ``latent_init_scale`` then scales the
    encoder (:func:`_scale_encoder`)."""
    x = x.to(sae.W_enc.dtype)
    if y is not None and sae.W_skip is not None and cfg.skip_init == "ridge":
        _ridge_skip(sae, x, y.to(sae.W_enc.dtype))
    else:
        _initialise_scales(sae, x, x if y is None else y.to(sae.W_enc.dtype), cfg)
    if y is not None and cfg.latent_init_scale is not None:
        _scale_encoder(sae, x, y.to(sae.W_enc.dtype), cfg.latent_init_scale)


def _initialise_scales(sae: SAE, x: Tensor, target: Tensor, cfg: SAETrainConfig) -> None:
    """Set ``norm_scale`` (``expected_average_only_in``) from ``x`` and b_dec to ``target``'s mean."""
    world = dist_info().world_size
    if sae.cfg.normalize_activations == "expected_average_only_in":
        stats = _all_reduce(torch.stack([x.norm(dim=-1).sum(), torch.tensor(float(x.shape[0]), device=x.device)]))
        mean_norm = float(stats[0] / stats[1])
        if mean_norm > 0:
            sae.norm_scale.fill_(math.sqrt(sae.cfg.d_in) / mean_norm)
    if cfg.init_b_dec_mean:
        mean = _all_reduce(target.sum(0)) / (target.shape[0] * world)
        sae.b_dec.copy_(mean * sae.norm_scale)


def _scale_encoder(sae: SAE, x: Float[Tensor, "batch d_in"], y: Float[Tensor, "batch d_out"], fraction: float) -> None:
    """Scale ``W_enc`` and ``b_enc`` so the latents' output (their decoder sum) on this batch has ``fraction``
    of the mean norm of ``y`` minus ``b_dec`` and the skip term (means over every process's rows)."""
    sae.train()
    latents = sae.encode(x)
    decoded = latents @ sae.W_dec
    residual = y - sae.b_dec - (sae.skip_out(x) if sae.W_skip is not None else 0.0)
    norms = _all_reduce(torch.stack([decoded.norm(dim=-1).sum(), residual.norm(dim=-1).sum()]).double())
    if float(norms[0]) > 0:
        factor = fraction * float(norms[1]) / float(norms[0])
        sae.W_enc.mul_(factor)
        sae.b_enc.mul_(factor)


def _ridge_skip(sae: SAE, x: Float[Tensor, "batch d_in"], y: Float[Tensor, "batch d_out"]) -> None:
    """Set ``W_skip`` and ``b_dec`` to the ridge regression of ``y`` on ``x`` over every process's rows.

    Sums (not the rows) are all-reduced, in float64, so N processes fit what one process with the whole
    batch would. The penalty is :data:`RIDGE_PENALTY` times the inputs' mean variance per dimension."""
    xd, yd = x.double(), y.double()
    d_in = xd.shape[1]
    sums = _all_reduce(torch.cat([xd.sum(0), yd.sum(0), (xd.T @ xd).reshape(-1), (xd.T @ yd).reshape(-1),
                                  xd.new_tensor([float(xd.shape[0])])]))
    n = float(sums[-1])
    d_out = yd.shape[1]
    x_mean, y_mean = sums[:d_in] / n, sums[d_in:d_in + d_out] / n
    offset = d_in + d_out
    xx = sums[offset:offset + d_in * d_in].view(d_in, d_in) / n - torch.outer(x_mean, x_mean)
    xy = sums[offset + d_in * d_in:-1].view(d_in, d_out) / n - torch.outer(x_mean, y_mean)
    penalty = RIDGE_PENALTY * max(float(xx.diagonal().mean()), 1e-12)
    W = torch.linalg.solve(xx + penalty * torch.eye(d_in, dtype=xx.dtype, device=xx.device), xy)  # [d_in, d_out]
    sae.W_skip.copy_(W.T.to(sae.W_skip.dtype))
    sae.b_dec.copy_((y_mean - x_mean @ W).to(sae.b_dec.dtype))


@torch.no_grad()
def _update_batchtopk_threshold(sae: SAE, min_active: Tensor, cfg: SAETrainConfig) -> None:
    value = _all_reduce(min_active.clone().to(sae.threshold.device), op="min")
    if torch.isfinite(value):
        lr = cfg.batchtopk_threshold_lr
        if float(sae.threshold[0]) == 0.0:
            sae.threshold.fill_(float(value))
        else:
            sae.threshold.mul_(1 - lr).add_(lr * value)


@torch.no_grad()
def batchtopk_threshold(sae: SAE, batches: Iterable[Tensor]) -> float:
    """Return the inference threshold at which ``sae``'s weights, as they are now, keep BatchTopK's ``k`` latents
    a row on average: the mean, over ``batches`` (each [rows, d_in]: pass batches as large as a training
    step's), of the batch's ``k * rows``-th largest activation, which is what BatchTopK training kept.

    The trainer's own threshold is an EMA (rate ``batchtopk_threshold_lr``) of that value as the weights move.
    Over a short run it lags behind them: SmolLM2's transcoders trained for 247 steps kept 42-97 latents a
    row at inference instead of 64. Set ``sae.threshold`` to this after training to remove the lag."""
    if sae.cfg.architecture != "batchtopk" or sae.cfg.k is None:
        raise ConfigError(f"only a BatchTopK SAE has a threshold to calibrate; this one is {sae.cfg.architecture}")
    values = []
    for x in batches:
        acts = F.relu(sae.pre_acts(x)).flatten()
        kept = min(sae.cfg.k * x.shape[0], acts.numel())
        values.append(float(acts.kthvalue(acts.numel() - kept + 1).values))  # the kept-th largest
    if not values:
        raise InputError("no batches to calibrate the threshold on")
    return sum(values) / len(values)


@torch.no_grad()
def resample_dead_latents(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    per_row_error: Tensor,
    fired_total: Tensor,
    cfg: SAETrainConfig,
    step: int,
) -> int:
    """Re-initialise latents that never fired on inputs the SAE reconstructs worst; return how many.

    Anthropic's recipe (Towards Monosemanticity): decoder row = a high-error input's direction,
    encoder column = the same direction at 0.2x the mean live encoder norm, bias 0, and the Adam
    moments of those entries reset. Rank 0 decides; the others receive its parameters.
    """
    dead = (fired_total == 0).nonzero().squeeze(-1)
    n = int(dead.numel())
    if n and dist_info().rank == 0:
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
        weights = per_row_error.double().cpu() + 1e-12
        rows = torch.multinomial(weights, n, replacement=True, generator=generator).to(x.device)
        x_c = sae.centered_input(x[rows])
        directions = x_c / x_c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = fired_total > 0
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = directions
        sae.W_enc[:, dead] = directions.T * 0.2 * enc_norm
        sae.b_enc[dead] = 0.0
        for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            state = optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
    _broadcast_parameters(sae)
    fired_total.zero_()
    return n


def _metrics_line(
    losses: StepLosses, step: int, tokens: int, cfg: SAETrainConfig, tokens_since_fired: Tensor, info: DistInfo
) -> dict[str, float]:
    local = [losses.loss.detach(), losses.mse.detach(), losses.sparsity.detach(), losses.l0, losses.variance]
    stats = _all_reduce(torch.stack(local).double()) / info.world_size
    loss, mse, sparsity, l0, variance = (float(v) for v in stats)
    return {
        "step": step,
        "tokens": tokens,
        "lr": lr_at(cfg, step - 1),
        "loss": loss,
        "mse": mse,
        "sparsity_loss": sparsity,
        "fvu": mse / variance if variance > 0 else float("nan"),
        "l0": l0,
        "dead_fraction": float((tokens_since_fired >= cfg.dead_tokens).double().mean()),
    }


def _progress(cfg: SAETrainConfig, start: int, rank: int):
    return tqdm(total=cfg.total_steps, initial=start, disable=not cfg.progress or rank != 0,
                desc="train-sae", unit="step")


# ---------------------------------------------------------------------------------------------
# Checkpoints: weights, optimiser, counters, RNG and step (the data offset), written atomically.
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    out: Path,
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    step: int,
    tokens: int,
    tokens_since_fired: Tensor,
    fired_total: Tensor,
    cfg: SAETrainConfig | None = None,
) -> None:
    """Write ``out/checkpoint/state.pt`` atomically (rank 0 only; all ranks hold the same state)."""
    if dist_info().rank != 0:
        return
    state = {
        "step": step,
        "tokens": tokens,
        "sae_cfg": sae.cfg.to_dict(),
        "sae": sae.state_dict(),
        "metadata": json.dumps(sae.metadata, default=str),
        "optimizer": optimizer.state_dict(),
        "tokens_since_fired": tokens_since_fired.cpu(),
        "fired_total": fired_total.cpu(),
        "torch_rng": torch.get_rng_state(),
        "train_cfg": json.dumps(cfg.to_dict() if cfg is not None else None),
    }
    write_checkpoint(out / CHECKPOINT_DIR / "state.pt", state)


def load_checkpoint(
    out: Path, sae: SAE, optimizer: torch.optim.Optimizer, cfg: SAETrainConfig | None = None
) -> dict[str, Any]:
    """Load ``out/checkpoint/state.pt`` into ``sae`` and ``optimizer``; return the counters.

    With ``cfg``, refuse a checkpoint written with other training settings (fields outside
    ``RESUMABLE_CHANGES``), as the LM trainer does: a resumed run must follow the same schedule."""
    path = out / CHECKPOINT_DIR / "state.pt"
    state = read_checkpoint(path, sae.device)
    if SAEConfig.from_dict(state["sae_cfg"]) != sae.cfg:
        raise CheckpointError(
            f"checkpoint {path} is for SAE {state['sae_cfg']}, not {sae.cfg.to_dict()}; use another "
            f"output directory or the same SAE config"
        )
    saved = json.loads(state.get("metadata") or "{}")
    for key in ("model_name", "hook_name", "activation_store"):
        if saved.get(key) and sae.metadata.get(key) and saved[key] != sae.metadata[key]:
            raise CheckpointError(
                f"checkpoint {path} was trained on {key}={saved[key]!r}, this run reads {sae.metadata[key]!r}; "
                f"resuming would mix two data sources. Use another output directory, or --no-resume to start over"
            )
    if cfg is not None:
        _check_same_settings(out, path, state, cfg)
    sae.load_state_dict(state["sae"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    return state


def _check_same_settings(out: Path, path: Path, state: dict[str, Any], cfg: SAETrainConfig) -> None:
    saved = json.loads(state.get("train_cfg") or "null")
    if saved is None:  # a checkpoint from before the settings were kept in it: its run's train_config.json
        try:
            saved = json.loads((out / "train_config.json").read_text())["train"]
        except (OSError, ValueError, KeyError, TypeError):
            return
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as saved
    saved = {**{k: v for k, v in json.loads(json.dumps(SAETrainConfig(total_steps=1).to_dict())).items()
                if k in _ADDED_SINCE}, **saved}  # a field added since an old checkpoint: its default
    check_same_settings(saved, now, RESUMABLE_CHANGES, path,
                        "resume with the same settings, or start over (--no-resume) or in another output directory")


