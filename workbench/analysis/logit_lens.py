"""Logit lens and tuned lens: what the residual stream at each layer would predict if decoding began there.

Row ``l`` of a lens is ``blocks.l.hook_resid_pre`` (for ``l < n_layers``) decoded through the final
norm and the unembedding; the last row (label ``final``) is the final residual stream, i.e. the
model's own output. The tuned lens (Belrose et al. 2023) puts one affine translator per layer in
front of that decoding, ``h -> h + A h + b`` with ``A = 0, b = 0`` at initialisation (so it starts
as the logit lens), trained on cached residuals to minimise the KL divergence from the final output.

Prompts of different lengths: :func:`logit_lens` and :func:`tuned_lens` take a padded
:class:`~workbench.padding.Batch`; padded positions get no target (NaN probability, rank -1), and
``padding.masked_mean(result.kl_to_final[i], batch.attention_mask)`` averages over real tokens only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from workbench import padding
from workbench.errors import CheckpointError, ConfigError, InputError
from workbench.locking import output_lock
from workbench.model import HookedGPT
from workbench.names import act_name
from workbench.padding import Batch
from workbench.runs import (
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

LENS_CONFIG_FILE = "tuned_lens.json"
LENS_WEIGHTS_FILE = "tuned_lens.safetensors"
#: the training checkpoint of a tuned lens, in ``OUT_DIR/checkpoint/``
LENS_CHECKPOINT_FILE = "state.pt"


# ------------------------------------------------------------------------------------- residuals


def layer_labels(n_layers: int) -> list[str]:
    """Return the row labels of a lens: ``0 .. n_layers-1`` (resid_pre of each block), then ``final``."""
    return [str(i) for i in range(n_layers)] + ["final"]


def lens_residuals(
    model: HookedGPT, tokens: Int[Tensor, "batch pos"] | Batch
) -> Float[Tensor, "layer batch pos d_model"]:
    """Return resid_pre of every block and the final residual stream, stacked (``n_layers + 1`` rows)."""
    names = [act_name("resid_pre", i) for i in range(model.cfg.n_layers)]
    names.append(act_name("resid_post", model.cfg.n_layers - 1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[n] for n in names])


def _kl(logp_ref: Tensor, logp: Tensor) -> Tensor:
    """KL(ref || p) over the last axis, from log-probabilities."""
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


# ------------------------------------------------------------------------------------- the lens


class LensResult(NamedTuple):
    """Per layer and position: the top predictions, the target's probability and rank, entropy and KL."""

    #: one label per row: block index of the resid_pre decoded, or ``final``
    labels: list[str]
    #: ``[layer batch pos k]`` ids and probabilities of the k most likely next tokens
    top_tokens: Int[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    #: probability and rank (0 = top) of the target token; NaN / -1 where no target is known
    target_prob: Float[Tensor, "layer batch pos"]
    target_rank: Int[Tensor, "layer batch pos"]
    #: entropy of the decoded distribution (nats)
    entropy: Float[Tensor, "layer batch pos"]
    #: KL(final output || decoded) in nats; 0 on the last row
    kl_to_final: Float[Tensor, "layer batch pos"]


@torch.no_grad()
def decode_residuals(
    model: HookedGPT,
    resid: Float[Tensor, "layer batch pos d_model"],
    targets: Int[Tensor, "batch pos"] | None = None,
    k: int = 5,
    labels: list[str] | None = None,
) -> LensResult:
    """Return the lens statistics of residuals already translated (or not) into the final basis.

    The last row is taken as the reference output for the KL. ``targets[b, p]`` is the token the
    prediction at ``p`` is scored on (``-1`` for none).
    """
    n_layer, batch, n_pos, _ = resid.shape
    logp = model.unembed_resid(resid.reshape(n_layer * batch, n_pos, -1)).float().log_softmax(-1)
    logp = logp.view(n_layer, batch, n_pos, -1)
    probs = logp.exp()
    top = probs.topk(min(k, logp.shape[-1]), dim=-1)
    entropy = -(probs * logp).sum(-1)
    kl = _kl(logp[-1:], logp)
    if targets is None:
        target_prob = torch.full((n_layer, batch, n_pos), float("nan"))
        target_rank = torch.full((n_layer, batch, n_pos), -1, dtype=torch.long)
    else:
        has = targets >= 0
        t = targets.clamp(min=0)[None, :, :, None].expand(n_layer, -1, -1, 1)
        tp = logp.gather(-1, t)  # [layer batch pos 1]
        target_prob = torch.where(has, tp.squeeze(-1).exp(), torch.tensor(float("nan")))
        target_rank = torch.where(has, (logp > tp).sum(-1), torch.tensor(-1))
    return LensResult(labels or layer_labels(n_layer - 1), top.indices, top.values, target_prob, target_rank,
                      entropy, kl)


def next_token_targets(
    tokens: Int[Tensor, "batch pos"], attention_mask: Bool[Tensor, "batch pos"] | None = None
) -> Int[Tensor, "batch pos"]:
    """Return the next token at each position (``-1`` at the last, which has none, and wherever this
    token or the next is padding)."""
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)
    if attention_mask is not None:
        real_pair = attention_mask & torch.cat([attention_mask[:, 1:], attention_mask[:, :1] & False], dim=1)
        targets = targets.masked_fill(~real_pair, -1)
    return targets


def _lens_input(model: HookedGPT, tokens: Tensor | Batch) -> Tensor | Batch:
    """Return checked tokens, or the batch itself when it is padded."""
    tokens, mask = padding.unpack(tokens, None)
    tokens = model.check_tokens(tokens)
    mask = padding.check_attention_mask(mask, tokens)
    return tokens if mask is None else Batch(tokens, mask)


def logit_lens(
    model: HookedGPT, tokens: Int[Tensor, "batch pos"] | Batch, targets: Int[Tensor, "batch pos"] | None = None,
    k: int = 5,
) -> LensResult:
    """Return the logit lens of every layer on ``tokens`` (targets default to the next tokens)."""
    tokens = _lens_input(model, tokens)
    if targets is None:
        targets = next_token_targets(*tokens) if isinstance(tokens, Batch) else next_token_targets(tokens)
    return decode_residuals(model, lens_residuals(model, tokens), targets, k)


# -------------------------------------------------------------------------------------- tuned lens


@dataclass(frozen=True)
class TunedLensConfig:
    """Training settings of a tuned lens: Adam on the per-layer KL, the learning rate decayed along a cosine."""

    #: optimiser steps; also the length of the cosine schedule
    steps: int = 300
    #: the learning rate of the first step; it decays along a cosine to 0 at the last
    lr: float = 1e-3
    #: windows per step
    batch_size: int = 8
    weight_decay: float = 0.0
    #: fraction of the training windows held out to choose, per layer, between the trained
    #: translator and the identity (never the text the lens is finally evaluated on)
    val_fraction: float = 0.1
    #: evaluate on the validation windows every this many steps and keep each layer's best translator
    eval_every: int = 50
    #: seeds the split into training and validation windows and the order of the training batches
    seed: int = 0
    #: train on the KL over the ``vocab`` tokens the batch's final distributions give most mass
    #: (renormalised over them) instead of the whole vocabulary: much cheaper for big vocabularies
    #: (SmolLM2's 49152) on a CPU. None: the exact KL. Validation and evaluation always use the whole
    #: vocabulary, so the per-layer choice against the identity stays exact.
    vocab: int | None = None
    #: with an output directory, write a checkpoint every this many steps (and at the last step)
    checkpoint_every: int = 50

    def __post_init__(self):
        counts = {"steps": self.steps, "batch_size": self.batch_size, "eval_every": self.eval_every,
                  "checkpoint_every": self.checkpoint_every}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise ConfigError(f"tuned lens settings {bad} must be at least 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must lie strictly between 0 and 1 (a fraction of "
                              "the windows, held out for validation)")
        if self.vocab is not None and self.vocab < 1:
            raise ConfigError(f"vocab={self.vocab} must be at least 1, or None for the exact KL")

    @property
    def schedule(self) -> LRSchedule:
        """No warmup; a cosine from ``lr`` to 0 over ``steps``."""
        return LRSchedule(lr=self.lr, total_steps=self.steps, decay="cosine")


#: TunedLensConfig fields a resumed run may change: they decide when checkpoints are written, never the weights
RESUMABLE_CHANGES = frozenset({"checkpoint_every"})


class TunedLens(nn.Module):
    """One affine translator per block: ``resid_pre[l] -> resid_pre[l] + A_l resid_pre[l] + b_l``."""

    def __init__(self, n_layers: int, d_model: int, model_name: str = ""):
        super().__init__()
        self.n_layers, self.d_model, self.model_name = n_layers, d_model, model_name
        self.translators = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(n_layers)])
        self.reset_to_identity()

    @classmethod
    def for_model(cls, model: HookedGPT) -> TunedLens:
        p = model.W_E
        return cls(model.cfg.n_layers, model.cfg.d_model, model.cfg.name).to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def reset_to_identity(self, layers: list[int] | None = None) -> None:
        for i in range(self.n_layers) if layers is None else layers:
            self.translators[i].weight.zero_()
            self.translators[i].bias.zero_()

    def forward(self, resid: Float[Tensor, "layer batch pos d_model"]) -> Float[Tensor, "layer batch pos d_model"]:
        """Translate the ``n_layers`` resid_pre rows; a final row, if present, passes unchanged."""
        rows = [resid[i] + self.translators[i](resid[i]) for i in range(self.n_layers)]
        return torch.stack(rows + list(resid[self.n_layers:]))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / LENS_WEIGHTS_FILE))
        meta = {"n_layers": self.n_layers, "d_model": self.d_model, "model_name": self.model_name}
        (directory / LENS_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: HookedGPT | None = None) -> TunedLens:
        directory = Path(directory)
        cfg_path, weights = directory / LENS_CONFIG_FILE, directory / LENS_WEIGHTS_FILE
        if not cfg_path.is_file() or not weights.is_file():
            raise CheckpointError(f"{directory} holds no tuned lens ({LENS_CONFIG_FILE} + {LENS_WEIGHTS_FILE}); "
                                  "train one with `workbench tuned-lens train MODEL --out DIR`")
        meta = json.loads(cfg_path.read_text())
        if model is not None and (meta["n_layers"], meta["d_model"]) != (model.cfg.n_layers, model.cfg.d_model):
            raise CheckpointError(
                f"the tuned lens in {directory} was trained for {meta['n_layers']} layers x d_model {meta['d_model']}, "
                f"but the model has {model.cfg.n_layers} x {model.cfg.d_model}; train a lens for this model")
        lens = cls(meta["n_layers"], meta["d_model"], meta.get("model_name", ""))
        lens.load_state_dict(load_file(str(weights)))
        if model is not None:
            lens = lens.to(device=model.W_E.device, dtype=model.W_E.dtype)
        return lens


def tuned_lens(
    model: HookedGPT, lens: TunedLens, tokens: Int[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"] | None = None, k: int = 5,
) -> LensResult:
    """Return the tuned lens of every layer on ``tokens`` (same fields as :func:`logit_lens`)."""
    tokens = _lens_input(model, tokens)
    if targets is None:
        targets = next_token_targets(*tokens) if isinstance(tokens, Batch) else next_token_targets(tokens)
    with torch.no_grad():
        resid = lens(lens_residuals(model, tokens))
    return decode_residuals(model, resid, targets, k)


def _layer_kl(model: HookedGPT, resid: Tensor, lens: TunedLens | None, attention_mask: Tensor | None = None
              ) -> Float[Tensor, " layer"]:
    """Return the mean KL(final || decoded) of each resid_pre row (no final row in the result), over the
    real tokens when ``attention_mask`` is given."""
    final = model.unembed_resid(resid[-1]).float().log_softmax(-1)
    rows = resid[:-1] if lens is None else lens(resid)[:-1]
    out = []
    for i in range(rows.shape[0]):
        logp = model.unembed_resid(rows[i]).float().log_softmax(-1)
        out.append(padding.masked_mean(_kl(final, logp), attention_mask))
    return torch.stack(out)


@torch.no_grad()
def _residual_chunks(model: HookedGPT, tokens: Int[Tensor, "batch pos"], chunk: int = 8
                     ) -> Iterator[tuple[Float[Tensor, "layer batch pos d_model"], int]]:
    """Yield :func:`lens_residuals` of ``chunk`` windows at a time, with the number of windows."""
    tokens = model.check_tokens(tokens)
    for lo in range(0, tokens.shape[0], chunk):
        part = tokens[lo: lo + chunk]
        yield lens_residuals(model, part), part.shape[0]


@torch.no_grad()  # scoring only: without it a lens being trained would record an autograd graph of every window
def _lens_kls(
    model: HookedGPT, tokens: Int[Tensor, "batch pos"], lenses: list[TunedLens | None], chunk: int = 8,
    residuals: list[tuple[Tensor, int]] | None = None,
) -> list[Float[Tensor, " layer"]]:
    """Return :func:`lens_kl` of each lens, caching the residuals of each chunk once for all of them
    (or reading them from ``residuals``, :func:`_residual_chunks` of the same tokens kept in memory)."""
    totals = [torch.zeros(model.cfg.n_layers, dtype=torch.float64) for _ in lenses]
    n_windows = 0
    for resid, n in residuals if residuals is not None else _residual_chunks(model, tokens, chunk):
        n_windows += n
        for total, lens in zip(totals, lenses):
            total += _layer_kl(model, resid, lens).double().cpu() * n
    return [(total / n_windows).float() for total in totals]


def lens_kl(
    model: HookedGPT, tokens: Int[Tensor, "batch pos"] | Batch, lens: TunedLens | None = None, chunk: int = 8
) -> Float[Tensor, " layer"]:
    """Return the mean KL(final output || lens) per block over ``tokens`` (logit lens when ``lens`` is None);
    over the real tokens only for a padded :class:`~workbench.padding.Batch`."""
    tokens = _lens_input(model, tokens)
    if not isinstance(tokens, Batch):
        return _lens_kls(model, tokens, [lens], chunk)[0]
    total, n_real = torch.zeros(model.cfg.n_layers, dtype=torch.float64), 0
    with torch.no_grad():
        for lo in range(0, tokens.tokens.shape[0], chunk):
            part = Batch(tokens.tokens[lo: lo + chunk], tokens.attention_mask[lo: lo + chunk])
            n = int(part.attention_mask.sum())
            total += _layer_kl(model, lens_residuals(model, part), lens, part.attention_mask).double().cpu() * n
            n_real += n
    return (total / n_real).float()


#: train_tuned_lens keeps the validation windows' residuals in memory up to this many bytes
VAL_CACHE_BYTES = 512 << 20


class TunedLensTraining(NamedTuple):
    """A trained lens and what its training saw."""

    lens: TunedLens
    #: mean training loss (sum over layers of the KL) every step
    losses: list[float]
    #: per-layer validation KL of the logit lens and of the kept translators
    val_kl_logit: Float[Tensor, " layer"]
    val_kl_tuned: Float[Tensor, " layer"]
    #: layers whose translator was reset to the identity because it did worse on validation
    reset_layers: list[int]


def _batches(windows: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Yield batches of ``windows`` forever, one shuffled pass after another; a function of ``gen``'s state
    alone, so skipping the first k batches gives the batches a run resumed at step k needs."""
    while True:
        for idx in torch.randperm(windows.shape[0], generator=gen).split(batch_size):
            if len(idx) == batch_size or windows.shape[0] < batch_size:
                yield windows[idx]


def _training_decoder(model: HookedGPT, final_logits: Tensor, vocab: int | None):
    """Return (decode, final log-probs): the full unembedding, or one restricted to the ``vocab``
    tokens with the most final probability mass in this batch."""
    if vocab is None or vocab >= final_logits.shape[-1]:
        return model.unembed_resid, final_logits.log_softmax(-1)
    idx = final_logits.softmax(-1).sum(dim=(0, 1)).topk(vocab).indices
    W_U = model.W_U[:, idx]
    b_U = None if model.unembed.b_U is None else model.unembed.b_U[idx]

    def decode(resid: Tensor) -> Tensor:
        return torch.nn.functional.linear(model.ln_final(resid), W_U.T, b_U)

    return decode, final_logits[..., idx].log_softmax(-1)


def _lens_step(model: HookedGPT, lens: TunedLens, opt: torch.optim.Optimizer, batch: Int[Tensor, "batch pos"],
               vocab: int | None) -> float:
    """Take one Adam step on the sum over layers of the mean KL(final || lens) on ``batch``; return that sum."""
    resid = lens_residuals(model, batch)
    with torch.no_grad():
        final_logits = model.unembed_resid(resid[-1]).float()
        decode, final = _training_decoder(model, final_logits, vocab)
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    # translators are independent, so one backward per layer gives the same gradients as one
    # over the sum while holding a single layer's d_vocab-wide log-probabilities at a time
    for i, t in enumerate(lens.translators):
        logp = decode(resid[i] + t(resid[i])).float().log_softmax(-1)
        layer_loss = _kl(final, logp).mean()
        # gradients for this translator only: the model may be shared (the app's sessions), so its
        # weights keep their requires_grad flags and get no .grad from a lens
        params = list(t.parameters())
        for p, g in zip(params, torch.autograd.grad(layer_loss, params)):
            p.grad = g
        loss += float(layer_loss.detach())
    opt.step()
    return loss


class _Kept:
    """Each layer's best translator so far on the validation windows (the identity is every layer's first
    candidate), with its validation KL."""

    def __init__(self, lens: TunedLens, val_logit: Float[Tensor, " layer"]):
        self.kl = val_logit.clone()
        self.state = [{k: torch.zeros_like(v) for k, v in t.state_dict().items()} for t in lens.translators]

    def update(self, lens: TunedLens, kl: Float[Tensor, " layer"]) -> None:
        for i in range(lens.n_layers):
            if kl[i] < self.kl[i]:
                self.kl[i] = kl[i]
                self.state[i] = {k: v.detach().clone() for k, v in lens.translators[i].state_dict().items()}


def _windows_digest(windows: Tensor) -> str:
    """Return a short hash of the token ids, so a resumed run can tell that it reads the same windows."""
    return hashlib.sha256(windows.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _run_identity(model: HookedGPT, windows: Tensor, cfg: TunedLensConfig) -> dict[str, Any]:
    """Return what a checkpoint must agree with to be resumed: the settings, the model's shape, the windows."""
    return {**asdict(cfg), "model_name": model.cfg.name, "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model, "d_vocab": model.cfg.d_vocab, "windows": _windows_digest(windows)}


def _save_lens_state(path: Path, step: int, lens: TunedLens, opt: torch.optim.Optimizer, kept: _Kept,
                     val_logit: Tensor, losses: list[float], identity: dict[str, Any]) -> None:
    write_checkpoint(path, {
        "step": step,
        # the data position: the run's batches are a function of (seed, step), so the next one is batch ``step``
        "data": {"next_batch": step},
        "settings": identity,
        "lens": lens.state_dict(),
        "optimizer": opt.state_dict(),
        "kept_state": kept.state,
        "kept_kl": kept.kl,
        "val_kl_logit": val_logit,
        "losses": losses,
        "rng": rng_state(),
    })


def _load_lens_state(path: Path, lens: TunedLens, opt: torch.optim.Optimizer, kept: _Kept,
                     identity: dict[str, Any]) -> tuple[int, Tensor, list[float]]:
    """Restore lens, optimiser, kept translators and RNG from ``path``; return (step, val KL of the logit
    lens, the losses so far)."""
    state = read_checkpoint(path, lens.translators[0].weight.device)
    want = {"step": int, "settings": dict, "lens": dict, "optimizer": dict, "kept_state": list,
            "kept_kl": Tensor, "val_kl_logit": Tensor, "losses": list, "rng": dict}
    bad = [k for k, kind in want.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if bad:
        raise CheckpointError(f"{path} is not a tuned-lens checkpoint (missing or malformed: {', '.join(bad)}); "
                              "delete it to start over")
    check_same_settings(state["settings"], identity, RESUMABLE_CHANGES, path,
                        "resume with the same model, windows and settings, or start over in another output directory")
    lens.load_state_dict(state["lens"])
    opt.load_state_dict(state["optimizer"])
    kept.state, kept.kl = state["kept_state"], state["kept_kl"]
    set_rng_state(state["rng"])
    return state["step"], state["val_kl_logit"], state["losses"]


def train_tuned_lens(
    model: HookedGPT,
    windows: Int[Tensor, "batch pos"],
    cfg: TunedLensConfig = TunedLensConfig(),
    lens: TunedLens | None = None,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
) -> TunedLensTraining:
    """Return a tuned lens trained on ``windows`` to minimise, per layer, KL(final output || lens).

    The model is left as it is (only the translators get gradients); each step caches the residuals
    of one batch and takes an Adam step on the sum over layers of the mean KL, at the learning rate
    of ``cfg.schedule``. Every ``eval_every``
    steps each layer's translator is scored on validation windows split off ``windows``, and each
    layer keeps its best translator so far (the identity counts as a candidate), so no layer ends
    worse than the logit lens on that split. The validation residuals are computed once and kept
    while they fit in :data:`VAL_CACHE_BYTES`. ``on_step(steps_done)``, when given, is called after
    every step (the app's progress bar; it may raise to stop).

    ``out_dir``: write ``metrics.jsonl`` there (the loss and learning rate of every step, the
    validation KL per layer at each evaluation) and, every ``cfg.checkpoint_every`` steps, a
    checkpoint (lens, optimiser, kept translators, RNG state, data position) to
    ``out_dir/checkpoint/``. With ``resume`` a run that finds a checkpoint there continues from it to
    the weights an unbroken run gives; it must be given the same model, windows and settings. One
    writer per directory (:func:`workbench.locking.output_lock`). The lens itself is not saved there:
    call ``result.lens.save(directory)``.
    """
    windows = model.check_tokens(windows)
    if windows.shape[0] < 2:
        raise InputError(f"got {windows.shape[0]} training window(s); a tuned lens needs at least 2 (more is better)")
    if out_dir is None:
        return _train_tuned_lens(model, windows, cfg, lens, progress, on_step, None, resume=False)
    out_dir = Path(out_dir)
    with output_lock(out_dir):  # a second writer would interleave metrics.jsonl and checkpoints
        return _train_tuned_lens(model, windows, cfg, lens, progress, on_step, out_dir, resume)


def _train_tuned_lens(model: HookedGPT, windows: Tensor, cfg: TunedLensConfig, lens: TunedLens | None,
                      progress: bool, on_step: Callable[[int], None] | None, out: Path | None,
                      resume: bool) -> TunedLensTraining:
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(windows.shape[0], generator=gen)
    n_val = max(1, int(round(cfg.val_fraction * windows.shape[0])))
    val, train = windows[perm[:n_val]], windows[perm[n_val:]]
    lens = lens or TunedLens.for_model(model)
    opt = torch.optim.Adam(lens.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the validation residuals are the same at every evaluation: keep them when they fit in VAL_CACHE_BYTES
    val_bytes = val.numel() * (model.cfg.n_layers + 1) * model.cfg.d_model * model.embed.W_E.element_size()
    val_resid = list(_residual_chunks(model, val)) if val_bytes <= VAL_CACHE_BYTES else None

    ckpt = None if out is None else out / CHECKPOINT_DIR / LENS_CHECKPOINT_FILE
    identity = _run_identity(model, windows, cfg)
    kept = _Kept(lens, torch.zeros(lens.n_layers))
    start, losses = 0, []
    if ckpt is not None and resume and ckpt.is_file():
        start, val_logit, losses = _load_lens_state(ckpt, lens, opt, kept, identity)
    else:
        val_logit = _lens_kls(model, val, [None], residuals=val_resid)[0]
        kept.kl = val_logit.clone()
    metrics = None if out is None else MetricsLog(out / METRICS_FILE, start if start else None)
    batches = _batches(train, cfg.batch_size, gen)
    for _ in range(start):  # the data offset: skip the batches the checkpointed steps trained on
        next(batches)

    bar = tqdm(total=cfg.steps, initial=start, desc="tuned lens", disable=not progress)
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            losses.append(_lens_step(model, lens, opt, next(batches), cfg.vocab))
            done = step + 1
            bar.update(1)
            if metrics is not None:
                metrics.write({"step": done, "loss": losses[-1], "lr": lr})
            if done % cfg.eval_every == 0 or done == cfg.steps:
                kl = _lens_kls(model, val, [lens], residuals=val_resid)[0]
                kept.update(lens, kl)
                if metrics is not None:
                    metrics.write({"step": done, "val_kl": kl.tolist(), "val_kl_kept": kept.kl.tolist()})
            if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                _save_lens_state(ckpt, done, lens, opt, kept, val_logit, losses, identity)
            if on_step is not None:
                on_step(done)
    finally:
        bar.close()
    with torch.no_grad():
        for t, s in zip(lens.translators, kept.state):
            t.load_state_dict(s)
    reset = [i for i in range(lens.n_layers) if not kept.kl[i] < val_logit[i]]
    return TunedLensTraining(lens, losses, val_logit, kept.kl, reset)


class LensComparison(NamedTuple):
    """Held-out KL(final || lens) per layer for the logit lens and a tuned lens."""

    labels: list[str]
    logit_kl: Float[Tensor, " layer"]
    tuned_kl: Float[Tensor, " layer"]


def compare_lenses(model: HookedGPT, lens: TunedLens, tokens: Int[Tensor, "batch pos"]) -> LensComparison:
    """Return the per-layer KL of the logit lens and of ``lens`` on (held-out) ``tokens``."""
    logit_kl, tuned_kl = _lens_kls(model, tokens, [None, lens])
    return LensComparison(layer_labels(model.cfg.n_layers)[:-1], logit_kl, tuned_kl)


def lens_frame(result: LensResult, str_tokens: list[str] | None = None, batch_index: int = 0):
    """Return a long DataFrame (one row per layer and position) of a lens result, for tables and JSON."""
    import pandas as pd  # here, not at the top: pandas is ~0.5 s of this module's ~2.4 s import (python -X importtime)

    rows = []
    n_layer, _, n_pos = result.entropy.shape
    for li in range(n_layer):
        for p in range(n_pos):
            rows.append({
                "layer": result.labels[li], "pos": p,
                "token": str_tokens[p] if str_tokens else None,
                "top_token": int(result.top_tokens[li, batch_index, p, 0]),
                "top_prob": float(result.top_probs[li, batch_index, p, 0]),
                "target_prob": float(result.target_prob[li, batch_index, p]),
                "target_rank": int(result.target_rank[li, batch_index, p]),
                "entropy": float(result.entropy[li, batch_index, p]),
                "kl_to_final": float(result.kl_to_final[li, batch_index, p]),
            })
    return pd.DataFrame(rows)


__all__ = [
    "LensResult", "TunedLens", "TunedLensConfig", "TunedLensTraining", "LensComparison", "logit_lens", "tuned_lens",
    "decode_residuals", "lens_residuals", "lens_kl", "train_tuned_lens", "compare_lenses", "lens_frame",
    "next_token_targets", "layer_labels",
]
