"""Workflows: corpus -> token windows -> (store ->) SAE / transcoder training -> evaluation.

The CLI commands, the app and the ``analyses/`` scripts call these functions; each returns a typed
result:

- :func:`token_windows`: a corpus cut into windows in a model's tokenizer;
- :func:`cache_corpus` / :func:`cache_windows` -> :class:`StoreResult`: an activation store;
- :func:`train_sae_on_store` / :func:`train_sae_on_synthetic` -> :class:`SAERunResult`: a trained,
  saved SAE (its SAELens metadata from :func:`sae_metadata`, the one writer of those keys);
- :func:`train_transcoders` -> :class:`TranscoderSet`: a transcoder per MLP, from live activations.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench import paths
from workbench.allocator import GrowthTrimmer, limit_arenas, release_freed_memory
from workbench.analysis.superposition import SyntheticConfig, SyntheticFeatures, mmcs
from workbench.corpora import load_corpus, make_windows
from workbench.distributed import dist_info
from workbench.errors import ConfigError, DataError, InputError
from workbench.loading import available_memory
from workbench.locking import lock_name, output_lock
from workbench.names import layer_of
from workbench.sae.circuit_tracer import save_circuit_tracer
from workbench.sae.io import load_sae, save_sae
from workbench.sae.model import SAE, Architecture, Normalization, SAEConfig
from workbench.sae.train import SKIP_INITS, SAETrainConfig, TrainConfig, TrainResult, collective_group, train_sae
from workbench.sae.transcoders import (
    PRECISIONS,
    KLFinetuneConfig,
    KLFinetuneResult,
    LayerEval,
    SetEval,
    calibrate_thresholds,
    check_layers,
    check_set,
    evaluate_transcoders,
    finetune_on_kl,
    input_hook,
    mixed_live_pairs,
    output_hook,
    parse_layers,
)
from workbench.store import ActivationStore, ReaderConfig, StoreConfig, WriteResult, open_store, write_store
from workbench.zoo import load_model


def token_windows(model: Any, corpus: str, n_ctx: int, n_windows: int) -> Int[Tensor, "batch pos"]:
    """Return the first ``n_windows`` windows of ``n_ctx`` tokens of a corpus, in the model's tokenizer.

    Documents are tokenized only until there are enough tokens. Tokenizers that put BOS in front
    (``add_bos``) get it at the start of every window, as the model saw in training; others get
    plain consecutive chunks of the document stream (documents separated by EOS when there is one).
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ConfigError("this model has no tokenizer; pass token windows to workbench.store.write_store directly")
    if n_ctx > model.cfg.n_ctx or n_ctx < 2:
        raise ConfigError(f"--n-ctx {n_ctx} must lie in [2, {model.cfg.n_ctx}] (the model's context)")
    if n_windows < 1:
        raise InputError(f"{n_windows} windows asked for; ask for at least one (more --tokens)")
    use_bos = bool(tok.add_bos and tok.bos_token_id is not None)
    body = n_ctx - 1 if use_bos else n_ctx
    need = n_windows * body
    docs = load_corpus(corpus).documents
    ids: list[int] = []
    for start in range(0, len(docs), 64):
        for enc in tok.tok.encode_batch(docs[start : start + 64], add_special_tokens=False):
            ids.extend(enc.ids)
            if tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
        if len(ids) >= need:
            break
    have = len(ids) // body
    if have < n_windows:
        raise DataError(
            f"corpus {corpus!r} gives {len(ids)} tokens, {have} windows of {n_ctx}; {n_windows} were asked for. "
            "Lower --tokens or use a bigger corpus"
        )
    stream = torch.tensor(ids[:need], dtype=torch.long)
    return make_windows(stream, n_ctx, tok.bos_token_id) if use_bos else stream.view(n_windows, body)


# ---------------------------------------------------------------------------------------------
# Activation stores and SAEs: corpus -> token windows -> store -> SAE


class StoreResult(NamedTuple):
    """A store that :func:`cache_windows` or :func:`cache_corpus` wrote (or finished), opened for reading."""

    store: ActivationStore
    """The finished store."""
    written: WriteResult
    """What this call did: rows, shards written and kept from an interrupted run, seconds."""


def cache_windows(model: Any, windows: Int[Tensor, "batch pos"], out: str | Path, cfg: StoreConfig, *,
                  model_name: str = "", on_shard: Callable[[int], None] | None = None,
                  progress: bool = False) -> StoreResult:
    """Write (or resume) the activation store ``out`` of ``cfg.hooks`` over ``windows``; return it opened.

    See :func:`workbench.store.write_store` for resuming, ``on_shard`` and ``torchrun``.
    """
    written = write_store(model, windows, out, cfg, model_name=model_name, on_shard=on_shard, progress=progress)
    return StoreResult(open_store(out), written)


def cache_corpus(
    model_ref: str,
    corpus: str,
    out: str | Path,
    cfg: StoreConfig,
    *,
    tokens: int,
    n_ctx: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> StoreResult:
    """Load the model ``model_ref``, cache ``tokens`` rows of ``corpus`` into the store ``out``; return it opened.

    Windows are ``n_ctx`` tokens long (default: the model's context, at most 128). The store's
    lock is taken before the model loads, so a second writer of the same store fails at once.
    """
    with output_lock(out, lock_name(dist_info().rank)):
        model = load_model(model_ref, device=device)
        n_ctx = n_ctx or min(model.cfg.n_ctx, 128)
        if cfg.first_position >= n_ctx:
            raise ConfigError(f"first_position {cfg.first_position} leaves no positions of windows of {n_ctx} tokens; "
                              "lower --first-position or raise --n-ctx")
        n_windows = max(1, -(-tokens // (n_ctx - cfg.first_position)))
        windows = token_windows(model, corpus, n_ctx, n_windows)
        return cache_windows(model, windows, out, cfg, model_name=str(model_ref), progress=progress)


def sae_metadata(
    model_name: str | None,
    hook: str,
    *,
    dataset: str,
    context_size: int | None = None,
    activation_store: str | Path | None = None,
    prepend_bos: bool | None = None,
) -> dict[str, Any]:
    """The SAELens ``metadata`` of an SAE (or transcoder): what it reads, of which model, on what text.

    The one writer of these keys: ``workbench.sae.train.load_checkpoint`` compares ``model_name``,
    ``hook_name`` and ``activation_store`` before resuming, ``ActivationStore.check_sae`` compares
    ``hook_name`` and ``model_name``, the app finds an SAE's store by ``activation_store``. Keys
    without a value (a hook outside the blocks has no ``hook_layer``) are left out.
    """
    store = None if activation_store is None else str(Path(activation_store).resolve())
    meta: dict[str, Any] = {"model_name": model_name, "hook_name": hook, "hook_layer": layer_of(hook),
                            "context_size": context_size, "dataset_path": dataset, "prepend_bos": prepend_bos,
                            "activation_store": store}
    return {key: value for key, value in meta.items() if value is not None}


@dataclass(frozen=True)
class SAERecipe:
    """The shape of an SAE to train, before the width of its data is known (:meth:`sae_config` completes it)."""

    architecture: Architecture = SAEConfig.architecture
    """How latents are chosen: relu (L1), topk, batchtopk or jumprelu."""
    d_sae: int | None = None
    """Latents; None: ``expansion`` times the data's width."""
    expansion: int = 8
    """Latents per input dimension, when ``d_sae`` is None."""
    k: int = SAEConfig.k
    """topk/batchtopk: active latents per row."""
    normalize_activations: Normalization = "expected_average_only_in"
    """Scale inputs to a mean norm of sqrt(d_in) while training (folded into the weights on save)."""

    def sae_config(self, d_in: int) -> SAEConfig:
        """The SAE's config for data ``d_in`` wide."""
        d_sae = self.d_sae if self.d_sae is not None else self.expansion * d_in
        return SAEConfig(d_in=d_in, d_sae=d_sae, architecture=self.architecture, k=self.k,
                         normalize_activations=self.normalize_activations)


class SAERunResult(NamedTuple):
    """An SAE trained by :func:`train_sae_on_store` or :func:`train_sae_on_synthetic`."""

    sae_dir: Path
    """The trained SAE in SAELens' layout (written by rank 0 under ``torchrun``)."""
    run_dir: Path
    """The run directory: ``metrics.jsonl`` and ``checkpoint/`` (a rerun resumes from it)."""
    train: TrainResult
    """The trainer's result: the SAE, steps, tokens, the step it resumed from, the last metrics."""


class SyntheticSAEResult(NamedTuple):
    """An SAE trained on synthetic sparse features, and how well it found them."""

    run: SAERunResult
    mmcs: float
    """Mean over the true features of the best cosine with a learned decoder direction (1: all found)."""


def train_sae_on_store(
    store: ActivationStore | str | Path,
    hook: str | None,
    recipe: SAERecipe,
    train_cfg: SAETrainConfig,
    out: str | Path | None = None,
    *,
    reader: ReaderConfig | None = None,
    dataset: str | None = None,
    sae_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> SAERunResult:
    """Train an SAE on ``hook`` of an activation store (shuffled batches streamed from disk); save and return it.

    ``hook`` may be None for a store of one hook. ``reader`` sets the global batch and shuffle (default: batches
    of 4096 rows, seeded by ``train_cfg.seed``); under ``torchrun`` each process trains on its slice of every
    global batch. ``out`` is the run directory (default ``$WORKBENCH_HOME/runs/sae-MODEL-HOOK-ARCH-D_SAE``); the
    SAE goes to ``sae_dir`` (default ``out/sae``). ``dataset`` names the text in the SAE's metadata (default: the
    store's path). ``on_step(step)`` is called as each batch is handed to the trainer.
    """
    store = store if isinstance(store, ActivationStore) else open_store(store)
    hook = _store_hook(store, hook)
    reader = reader or ReaderConfig(batch_size=4096, seed=train_cfg.seed)
    rank, world = dist_info()
    local = _local_batch(reader.batch_size, world)

    def batches(start: int) -> Iterator[Tensor]:
        # Every process reads the same shuffled global batch and keeps its slice, so the run is the same
        # however many processes share it.
        for i, batch in enumerate(store.stream(hook, reader, start_row=start * reader.batch_size)):
            if on_step is not None:
                on_step(start + i)
            yield batch[rank * local : (rank + 1) * local]

    model_name = store.manifest.model.name
    metadata = sae_metadata(model_name, hook, dataset=dataset or str(store.path), context_size=store.n_ctx,
                            activation_store=store.path)
    return _train_and_save(batches, recipe.sae_config(store.d_in(hook)), train_cfg, out,
                           f"{model_name or 'model'}-{hook}", metadata, sae_dir, device, resume)


def train_sae_on_synthetic(
    synthetic: SyntheticConfig,
    recipe: SAERecipe,
    train_cfg: SAETrainConfig,
    out: str | Path | None = None,
    *,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    resume: bool = True,
) -> SyntheticSAEResult:
    """Train an SAE on known sparse features (the ground-truth benchmark); save it and say how many it found.

    ``batch_size`` is the global batch (split over ``torchrun`` processes); ``out`` as in :func:`train_sae_on_store`.
    """
    data = SyntheticFeatures(synthetic)
    rank, world = dist_info()
    local = _local_batch(batch_size, world)
    run = _train_and_save(lambda start: data.batches(local, start, rank=rank, world_size=world),
                          recipe.sae_config(synthetic.d_in), train_cfg, out, "synthetic",
                          sae_metadata("synthetic", "synthetic", dataset="synthetic"), None, device, resume)
    return SyntheticSAEResult(run, mmcs(run.train.sae.W_dec, data.features))


def _store_hook(store: ActivationStore, hook: str | None) -> str:
    """Return the hook to train on: ``hook``, checked, or the store's only hook."""
    if hook is None:
        if len(store.hooks) != 1:
            raise ConfigError(f"the store in {store.path} holds hooks {store.hooks}; choose one with --hook")
        hook = store.hooks[0]
    store.check_hook(hook)
    return hook


def _local_batch(batch_size: int, world: int) -> int:
    """Return each process's share of a global batch."""
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} does not split over {world} processes; use a multiple")
    return batch_size // world


def _train_and_save(batches: Callable[[int], Iterable[Tensor]], sae_cfg: SAEConfig, train_cfg: SAETrainConfig,
                    out: str | Path | None, name: str, metadata: dict[str, Any], sae_dir: str | Path | None,
                    device: str | torch.device, resume: bool) -> SAERunResult:
    """Build the SAE, train it under the run directory's lock, save it (rank 0) and return where it all went."""
    _check_sae_memory(sae_cfg, device)  # before anything is allocated or written
    if out is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        out = paths.runs_dir() / f"sae-{safe}-{sae_cfg.architecture}-{sae_cfg.d_sae}"
    out = Path(out)
    sae_dir = Path(sae_dir) if sae_dir is not None else out / "sae"
    rank, _ = dist_info()
    sae = SAE(sae_cfg, seed=train_cfg.seed).to(device)
    sae.metadata = metadata  # set before training: a checkpoint names its data too
    with output_lock(out, lock_name(rank)):  # one run per directory, from training to the saved SAE
        result = train_sae(sae, batches, train_cfg, out, resume=resume)
        if rank == 0:
            save_sae(result.sae, sae_dir, log_feature_density=result.log_feature_density)
    return SAERunResult(sae_dir, out, result)


def _check_sae_memory(cfg: SAEConfig, device: str | torch.device) -> None:
    """Refuse an SAE whose training state cannot fit in the device's memory, before allocating it."""
    # W_enc and W_dec, each with its gradient and Adam's two moments: 8 float32 copies of d_in x d_sae
    need = 8 * 4 * cfg.d_in * cfg.d_sae
    if torch.device(device).type == "cuda":
        available = torch.cuda.mem_get_info(torch.device(device))[0]  # free bytes on that GPU
    else:
        available = available_memory()
    if available is not None and need > available:
        raise ConfigError(
            f"--d-sae {cfg.d_sae} with d_in {cfg.d_in} needs about {need / 2**30:.1f} GiB to train but "
            f"{available / 2**30:.1f} GiB are available; choose a smaller --d-sae or --expansion"
        )


# ---------------------------------------------------------------------------------------------
# Transcoders: every chosen layer of a model, trained together from live activations


@dataclass(frozen=True)
class TranscoderRecipe:
    """What a transcoder set is trained on, and its shape. Every field is recorded with the set.

    kjv-small's shipped set: ``tokens=1_150_000, epochs=2, expansion=8, lr=2e-3, dead_tokens=200_000,
    shuffle=False, mix_steps=1, adam_beta2=0.999, calibrate_windows=0`` (CE recovered >= 0.96 on every layer; the
    defaults were those then).
    SmolLM2-135M's recipe is the defaults (1M tokens of kjv, one epoch, 2,304 latents, BatchTopK k 64, skip,
    lr 4e-3, Adam beta2 0.99, windows shuffled, four steps' rows mixed, thresholds calibrated on 128 windows)
    plus ``kl_steps=150, kl_layers="1,22,23,24:250,25:350,26,27", kl_joint_steps=60, kl_precision="bf16"``, all
    30 layers: 81.5 min of training (205 tokens/s, 10.1 GB peak RSS; 71 min in an earlier run), 30.0 min of
    per-layer fine-tuning and 8.0 min of joint fine-tuning (7.5 GB): 1 h 59.5 min, within the 2 h wanted. Before
    the fine-tunes, CE recovered 0.77-1.21 per layer with 7 of 30 layers under the 0.90 wanted (1, 22-27) and
    every MLP replaced at once agreed with the model's top-1 token on 0.485 of held-out positions (CE 4.517
    against 3.680); after both, layers 1 and 22-27 recover 0.910 / 0.928 / 0.906 / 0.914 / 0.896 / 0.849 / 0.912
    (from 0.847 / 0.889 / 0.864 / 0.846 / 0.852 / 0.765 / 0.823; 2 under 0.90: 25 and 26; every layer
    0.849-1.227) and the whole set agrees on 0.516 (CE 4.240, KL 0.945). The recipe before it, every one of
    those layers 150 steps in fp32 (``kl_layers="1,22,23,24,25,26,27"``), took 36 min and 12.0 min for the two
    fine-tunes (2 h 10 min in all) and left 3 under 0.90 (24-26: 0.889 / 0.875 / 0.847) and top-1 0.514 (CE
    4.227, KL 0.930); after its per-layer stage alone, 0.894 / 0.917 / 0.888 / 0.878 / 0.863 / 0.831 / 0.892
    and 0.497 (CE 4.433). With the trainer's EMA
    thresholds (no calibration) an earlier run of the same training gave 9 under 0.90 (1, 9, 22-28) and top-1
    0.474 (CE 4.53); trained at beta2 0.999, the same within noise (10 under 0.90, top-1 0.473, CE 4.49): beta2
    matters past one epoch (``adam_beta2``).
    The same shape at lr 2e-3 with the windows in corpus order gave 0.61-1.18 (18 under 0.90) and 0.342.
    The wider set the issue names (``expansion=8, k=32``) trained SmolLM2's layer 3 alone 1.6x slower
    (98.5 s against 63 s for 1M tokens; a one-off script).
    """

    corpus: str = "kjv"
    """Training text (``workbench corpora`` lists the names); the last ``eval_windows`` windows are held out."""
    n_ctx: int = 128
    """Tokens per window."""
    tokens: int = 1_000_000
    """Training text per layer, in tokens (positions from ``first_position`` on)."""
    epochs: int = 1
    """Passes over the training text (each pass after the first reads its windows in its own seeded order)."""
    batch_windows: int = 32
    """Windows per optimizer step (one forward pass feeds every layer)."""
    shuffle: bool = True
    """Read the training windows in a seeded random order (False: the corpus's order, as every set trained
    before this field existed was; kjv's books one after another left SmolLM2's layer 3 at held-out FVU 0.577
    against 0.474 shuffled: ``python -m benchmarks.transcoder_order --adam-beta2 0.999``)."""
    mix_steps: int = 4
    """Shuffle the rows of this many steps together (one forward pass over ``mix_steps * batch_windows``
    windows), so a step's rows come from that many more windows; 1 keeps each step's windows to itself, as
    sets trained before this field existed did."""
    first_position: int = 1
    """Positions before this one are not trained on (1 leaves out the BOS position)."""
    expansion: int = 4
    """Latents per model dimension (d_sae = expansion * d_model)."""
    architecture: str = "batchtopk"
    """batchtopk (exported to circuit-tracer as JumpReLU), topk, relu or jumprelu."""
    k: int = 64
    """Active latents per row (topk/batchtopk)."""
    skip: bool = True
    """A linear skip term W_skip beside the features (Paulo et al. 2025)."""
    skip_init: str = "ridge"
    """zero, or ridge: W_skip and b_dec start at the ridge regression of the MLP's output on its input over the first
    batch."""
    latent_init_scale: float = 0.1
    """At the start, the latents' output is scaled to this fraction of what the skip term (or b_dec) leaves to
    predict."""
    lr: float = 4e-3
    """Adam's peak learning rate for every layer's transcoder (the SAE trainer's schedule). On SmolLM2's layer 3
    (windows shuffled, 246 steps) held-out FVU was 0.60 at 1e-3, 0.48 at 2e-3 and 0.41 at 4e-3, and 8e-3
    diverged (Adam beta2 0.999; figures from a one-off script; ``python -m benchmarks.transcoder_order --lr ...
    --adam-beta2 0.999`` redoes them)."""
    adam_beta2: float = 0.99
    """Adam's second-moment decay. At 0.999 (the SAE trainer's default, and every set trained before this field
    existed) lr 4e-3 holds for the recipe's 247 steps but not much longer: SmolLM2's layer 26 held at 4e-3 for
    two epochs (492 steps) went from training FVU 0.25 at step 330 to 0.93 at step 400 and 132 at step 460,
    while at 0.99 it kept falling, to 0.23 (held-out 0.31, CE recovered 0.798 against 0.782 for one epoch).
    Within one epoch the two agree (held-out FVU 0.347 either way; the whole SmolLM2 set retrained at 0.99
    recovers the same CE loss per layer within 0.02). The training FVU of layers 11 and 28 jumps at the same
    steps under both (layer 28: 0.23 -> 0.76 -> 0.22 at steps 140-160): batches with rows the transcoder
    cannot reconstruct, not the optimiser. Figures from a one-off script on cached pairs;
    ``python -m benchmarks.transcoder_order --layer 26 --lr 4e-3 --orders mixed --epochs 2 --decay-fraction 0
    --adam-beta2 0.999 0.99`` redoes the two-epoch comparison. lr 8e-3 still diverges at 0.99."""
    precision: str = "fp32"
    """bf16: training's forward passes run the model under bfloat16 autocast (``live_pairs``'s ``precision``; the
    rows reach the trainers as fp32) and each trainer picks its active latents from a bfloat16 encoder matmul,
    their values computed exactly (``SAETrainConfig.precision``); the transcoders' weights, gradients, losses
    and Adam stay fp32, and calibration and evaluation run in fp32. fp32: all of it in fp32, as every set
    trained before this field existed was. The fine-tunes have their own ``kl_precision``. SmolLM2's 30 layers
    under the recipe's training settings: 65.8 min in bf16 (2026-12-07) against 81.5 in fp32 (2026-12-06), and
    every layer's last-step training FVU within 0.003 of fp32's (28 of 30 within 0.0006). Calibrated, fine-tuned
    (``kl_layers="1,3,22,23,24:250,25:450,26,27"``, the rest as the recipe's; 48.7 min) and evaluated, that set
    agrees on top-1 0.520 (CE 4.246) but leaves 4 layers under 0.90 (1, 3, 25, 26: 0.879 / 0.856 / 0.895 /
    0.842) where the fp32-trained recipe leaves 2, so the recipe trains in fp32."""
    calibrate_windows: int = 128
    """After training, each BatchTopK transcoder's inference threshold is set from its final weights on the last
    this many training windows, in batches of a step's windows
    (:func:`workbench.sae.transcoders.calibrate_thresholds`); 0 keeps the trainer's EMA, as sets trained before
    this field existed did. Over the recipe's 247 steps the EMA lags behind the weights, so SmolLM2's layers
    kept 42-97 latents a row at inference instead of 64; calibrated on 128 windows they keep 56-72, every
    MLP replaced at once agrees with the model's top-1 token on 0.485 of held-out positions instead of 0.474
    (CE 4.506 against 4.530, KL 1.17 against 1.22), and the layers under CE recovered 0.90 go from 9 to 7
    (layer 9: 0.899 -> 0.991, layer 28: 0.855 -> 0.914; layer 3: 0.910 -> 0.901). Only the thresholds
    depend on it, so it may change when a finished set is run again: that recalibrates the set from its
    checkpoints and evaluates it anew without training."""
    kl_steps: int = 0
    """After training, fine-tune the ``kl_layers`` transcoders this many steps on the spliced model's next-token
    KL against the real model (:func:`workbench.sae.transcoders.finetune_on_kl`), before the thresholds are
    calibrated; 0: no fine-tune. The windows are a seeded draw from the training text. It may change on a
    finished set (as may the other ``kl_*`` fields): the fine-tune then starts again from the training
    checkpoints. On SmolLM2, 150 steps of 8 windows took 14.3 s a step in fp32 (8.9 s under
    ``kl_precision="bf16"``) for layers 1 and 22-27 together and lifted their CE recovered by 0.011-0.066 (layer
    26: 0.765 -> 0.831); the width and k of the transcoder had barely moved it (``python -m
    benchmarks.transcoder_order --layer 26 ... --expansion 4 8 --k 64 128``). 400 steps (bf16, a one-off run) took
    layers 24 / 25 / 26 to 0.921 / 0.894 / 0.844: layer 26 gains little past 150, hence the recipe's own counts
    for 24 and 25. The joint fine-tune after it (``kl_joint_steps``) lifts those layers further. On the
    bf16-trained set (``precision``), layer 26 alone, 150 steps: 0.761 -> 0.824 at lr 3e-4, 0.807 at 1e-3, and
    0.827 with ``kl_fvu_weight=0.01`` (one-off runs of ``--layers 26 --kl-layers 26`` on a copy); layer 3 alone
    went *down*, 0.881 -> 0.844, so the recipe leaves it to the joint stage."""
    kl_layers: str = "all"
    """Which of the trained layers are fine-tuned: 'all' or comma-separated layers such as 1,22,23; LAYER:STEPS
    gives a layer its own step count instead of ``kl_steps`` (1,22,24:300 fine-tunes layer 24 for 300 steps,
    the others for ``kl_steps``)."""
    kl_windows: int = 8
    """Windows per fine-tuning step."""
    kl_lr: float = 3e-4
    """The fine-tune's Adam learning rate (warmed up over its first tenth of the steps, decayed to 0 over the last
    three tenths)."""
    kl_fvu_weight: float = 0.05
    """Weight of the MLP output's FVU beside the KL in the fine-tune's loss (each layer's, in the joint fine-tune)."""
    kl_joint_steps: int = 0
    """After training and the ``kl_steps`` fine-tune, fine-tune every trained layer's transcoder together this many
    steps on the KL of the model with all of them spliced in at once (``KLFinetuneConfig.joint``): the loss behind
    the set's top-1 agreement; 0: none. Windows of ``kl_windows``, a seeded draw of their own. It may change on a
    finished set, like the other ``kl_*`` fields. On SmolLM2, 60 steps after the per-layer fine-tune took 12.0 s a
    step in fp32 (8.0 s under bf16) and raised the whole set's top-1 agreement from 0.497 to 0.514 and every weak
    layer's CE recovered when spliced in alone (layers 1 and 22-27, by 0.011-0.020).
    A one-off run of 40 steps on the same set gave 0.502."""
    kl_joint_lr: float = 1e-4
    """The joint fine-tune's Adam learning rate (the same warmup and decay as ``kl_lr``'s)."""
    kl_precision: str = "fp32"
    """bf16: both fine-tunes run the model under bfloat16 autocast (``KLFinetuneConfig.precision``; the transcoders,
    their Adam steps and the KL stay fp32); fp32: all of it in fp32. Training follows ``precision``, and the
    calibration and evaluation run in fp32 either way. On SmolLM2's layers 24 and 26 a per-layer step takes
    2.90 s against 5.14 s (``python -m benchmarks.bench_transcoders --part finetune``), and 50 steps at lr 1e-3
    left them at CE recovered 0.859 / 0.800 against 0.858 / 0.801 in fp32 (a one-off run)."""
    seed: int = 0
    """Seeds the initialisation and the order of the windows."""
    eval_windows: int = 32
    """Held-out windows for the evaluation."""
    dead_tokens: int = 100_000
    """A latent silent for this many tokens counts as dead (and AuxK revives it)."""
    checkpoint_every: int = 200
    """Steps between each layer's atomic checkpoints (0: only at the end); a killed run resumes from the last one."""

    def __post_init__(self) -> None:
        for name in ("n_ctx", "tokens", "epochs", "batch_windows", "mix_steps", "expansion", "k", "eval_windows",
                     "kl_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.first_position < self.n_ctx - 1:
            raise ConfigError(f"first_position={self.first_position} must lie in [0, n_ctx - 1)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr} must be a positive number")
        if self.calibrate_windows and self.calibrate_windows < self.batch_windows:
            raise ConfigError(f"calibrate_windows={self.calibrate_windows} must be 0 (keep the training EMA) or at "
                              f"least batch_windows={self.batch_windows} (one batch)")
        for name in ("kl_steps", "kl_joint_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be 0 (no fine-tune) or more")
            if getattr(self, name) and self.architecture == "batchtopk" and not self.calibrate_windows:
                raise ConfigError(f"the KL fine-tune ({name}) moves BatchTopK's weights away from the thresholds "
                                  "training left; calibrate them after it (calibrate_windows >= batch_windows)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is unknown; expected one of {PRECISIONS}")
        if self.kl_precision not in PRECISIONS:
            raise ConfigError(f"kl_precision={self.kl_precision!r} is unknown; expected one of {PRECISIONS}")
        if ":" in self.kl_layers and not self.kl_steps:
            raise ConfigError(f"kl_layers={self.kl_layers!r} gives layers step counts, but kl_steps=0 turns the "
                              "per-layer fine-tune off; set kl_steps (the other layers' count)")
        for name in ("kl_lr", "kl_joint_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive number")
        if not (math.isfinite(self.kl_fvu_weight) and self.kl_fvu_weight >= 0):
            raise ConfigError(f"kl_fvu_weight={self.kl_fvu_weight} must be a number >= 0")
        if not 0 < self.adam_beta2 < 1:
            raise ConfigError(f"adam_beta2={self.adam_beta2} must lie in (0, 1)")
        if not (math.isfinite(self.latent_init_scale) and self.latent_init_scale > 0):
            raise ConfigError(f"latent_init_scale={self.latent_init_scale} must be a positive number")
        if self.skip_init not in SKIP_INITS:
            raise ConfigError(f"skip_init={self.skip_init!r} is unknown; expected one of {SKIP_INITS}")

    def rows_per_step(self) -> int:
        return self.batch_windows * (self.n_ctx - self.first_position)

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.tokens / self.rows_per_step()))

    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch()


@dataclass
class TranscoderSet:
    """A trained set, as :func:`train_transcoders` gives it back."""

    transcoders: dict[int, SAE]
    """Layer -> transcoder."""
    per_layer: list[LayerEval]
    whole: SetEval
    out_dir: Path
    seconds: float
    """Wall time of the training (not the evaluation)."""
    tokens_per_second: float
    """Training tokens (per layer) per second of wall time."""
    resumed: dict[int, int | None] = field(default_factory=dict)
    """Layer -> the step its training resumed from (None: from scratch)."""


_STOP = object()


class _Feed:
    """One producer of (x, y) pairs for many trainer threads, each starting at its own step."""

    def __init__(self, layers: Sequence[int], parallel: int):
        # One batch waits per layer (18.7 MB of pairs at SmolLM2's shape) beside the one its trainer works on
        # and the producer's next: a queue of two held ~0.5 GB more over 30 layers and trained no faster.
        self.queues = {layer: queue.Queue(maxsize=1) for layer in layers}
        # Trainers working on a batch at once. Each step holds a dense [batch, d_sae] pre-activation
        # matrix (75 MB at SmolLM2's shape; the dense BatchTopK step held ~0.6 GB, and 30 at once took
        # 17 GB and met the OOM killer).
        self.slots = threading.Semaphore(parallel)
        # The trainers free a step's temporaries between long-lived batches in one arena; the holes are handed
        # back once they add up to 1 GB (with the queue of one: a 5-step run of all 30 SmolLM2 layers peaked
        # at 9.5 GB, now 7.5; 8 layers x 15 steps train in 53-54 s either way). Mixing four steps' rows holds
        # a group's pairs beside these: the full 30-layer run peaked at 9.8-9.9 GB.
        self.trim = GrowthTrimmer()
        self.starts: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def opener(self, layer: int):
        def open_from(start: int) -> Iterator[tuple[Tensor, Tensor]]:
            with self.lock:
                self.starts[layer] = start
            return self._drain(layer)
        return open_from

    def _drain(self, layer: int) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            item = self.queues[layer].get()
            if item is _STOP:
                return
            with self.slots:  # held while the trainer works on this batch, until it asks for the next
                yield item
            del item
            self.trim()  # the step's temporaries, once enough of them have piled up

    def put(self, layer: int, item: Any) -> None:
        while True:
            if self.errors:
                raise self.errors[0]
            try:
                self.queues[layer].put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def stop_all(self) -> None:
        for q in self.queues.values():
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            q.put(_STOP)


def train_transcoders(
    model: Any,
    layers: Sequence[int],
    recipe: TranscoderRecipe,
    out_dir: str | Path,
    *,
    progress: bool = True,
    parallel: int = 2,
) -> TranscoderSet:
    """Train one transcoder per chosen layer from live activations, save them, evaluate them, and return the set.

    One forward pass per ``recipe.mix_steps`` steps feeds every layer's trainer (each in its own thread, all of
    them the workbench's SAE trainer), so no activation store is written; those steps' rows are mixed
    (:func:`workbench.sae.transcoders.mixed_rows`), and held for every layer until the last of them is taken
    (SmolLM2, 30 layers, four steps: 2.2 GB). Each layer checkpoints under
    ``out_dir/layer_L/``: a killed run resumes every layer where its checkpoint left it, to the same
    weights as an unbroken run. ``out_dir/layer_L/transcoder`` holds the result in SAELens' layout;
    ``out_dir/set.json`` the recipe and the evaluation. At most ``parallel`` layers train a batch at
    once (memory; on a 2-core CPU more would not be faster); the results do not depend on it.

    Under ``torchrun`` (the caller joins the group first: :func:`workbench.distributed.init_distributed`)
    each process runs the forward pass on its share of every step's ``batch_windows`` and each layer's
    gradients are averaged over one process group per layer, so N processes train what one would
    (TopK exactly; BatchTopK's batch-wide selection is per process). Every layer then steps at once
    (``parallel`` is not applied: processes holding different layers' slots would wait on each other).
    Rank 0 writes the files; every rank evaluates and returns the set.
    """
    if parallel < 1:
        raise ConfigError(f"parallel={parallel} must be at least 1")
    info = dist_info()
    if recipe.batch_windows % info.world_size:
        raise ConfigError(f"batch_windows={recipe.batch_windows} does not split evenly among {info.world_size} "
                          "processes; choose a multiple of the process count")
    layers = check_layers(model, layers)
    if recipe.kl_steps:
        _kl_layers(recipe, model, layers)  # refused before anything is trained
    out = Path(out_dir)
    steps = recipe.total_steps()
    n_train = recipe.steps_per_epoch() * recipe.batch_windows
    windows = token_windows(model, recipe.corpus, recipe.n_ctx, n_train + recipe.eval_windows)
    text, held_out = windows[:n_train], windows[n_train:]
    train_windows = text[window_order(recipe, n_train)]
    # the last windows trained on, whole on every rank (calibration is the same computation everywhere)
    calibration = train_windows[-min(recipe.calibrate_windows, n_train):] if recipe.calibrate_windows else None
    batch_windows = recipe.batch_windows // info.world_size
    if info.world_size > 1:  # this rank's share of every step's windows
        share = slice(info.rank * batch_windows, (info.rank + 1) * batch_windows)
        train_windows = train_windows.view(-1, recipe.batch_windows, recipe.n_ctx)[:, share].reshape(-1, recipe.n_ctx)
        parallel = len(layers)
    sae_cfg, train_cfg = transcoder_configs(recipe, model.cfg.d_model)
    with output_lock(out, lock_name(info.rank)):
        _check_recipe(out, recipe, model, write=info.rank == 0)
        feed = _Feed(layers, parallel)
        # one process group per layer, made in the same order on every rank (see collective_group)
        groups = {layer: dist.new_group() if info.world_size > 1 else None for layer in layers}
        results: dict[int, Any] = {}
        transcoders = {layer: SAE(sae_cfg, seed=recipe.seed + layer) for layer in layers}
        for layer, tc in transcoders.items():  # set before training, so a checkpoint names its data too
            tc.metadata = transcoder_metadata(model, layer, recipe)

        def run(layer: int) -> None:
            try:
                with collective_group(groups[layer]):
                    results[layer] = train_sae(
                        transcoders[layer], feed.opener(layer), train_cfg, out / f"layer_{layer}")
                feed.trim()  # its last step's and final checkpoint's temporaries
            except BaseException as exc:  # noqa: BLE001 - handed to the producer, which re-raises it
                feed.errors.append(exc)
                with feed.lock:
                    feed.starts.setdefault(layer, steps)  # no longer waiting for data

        threads = [threading.Thread(target=run, args=(layer,), name=f"transcoder-{layer}", daemon=True)
                   for layer in layers]
        limit_arenas(1)  # one thread per layer: their freed temporaries must serve each other (see there)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            while len(feed.starts) < len(layers):  # every trainer has read its checkpoint and asked from where
                if feed.errors:
                    raise feed.errors[0]
                time.sleep(0.01)
            first = min(feed.starts.values())
            bar = _bar(progress, steps, first)
            pairs = mixed_live_pairs(model, train_windows, layers, batch_windows, recipe.mix_steps,
                                     recipe.first_position, start_step=first, seed=recipe.seed,
                                     first_column=info.rank * batch_windows, precision=recipe.precision)
            for step, batch in zip(range(first, steps), pairs):
                for layer in layers:
                    if feed.starts[layer] <= step:
                        feed.put(layer, (batch[layer].x, batch[layer].y))
                del batch
                feed.trim()  # what the last steps freed goes back instead of piling up
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
                    if feed.errors:
                        raise feed.errors[0]
        except BaseException:
            feed.stop_all()
            for t in threads:
                t.join(timeout=10)
            raise
        seconds = time.perf_counter() - t0
        trained = {layer: results[layer].sae for layer in layers}
        release_freed_memory()
        finetune = joint = None
        if recipe.kl_steps:
            finetune = _finetune(model, trained, text, recipe, out, progress)
            trained.update(finetune.transcoders)
            release_freed_memory()
        if recipe.kl_joint_steps:
            joint = _finetune(model, trained, text, recipe, out, progress, joint=True)
            trained.update(joint.transcoders)
            release_freed_memory()
        thresholds = {} if calibration is None else calibrate_thresholds(
            model, trained, calibration, recipe.batch_windows, recipe.first_position)
        for layer, tc in trained.items():
            if info.rank == 0:
                save_sae(tc, out / f"layer_{layer}" / "transcoder",
                         log_feature_density=results[layer].log_feature_density)
        release_freed_memory()  # the trainers' freed memory, before the evaluation's vocabulary-wide logits
        per_layer, whole = evaluate_transcoders(model, trained, held_out, first_position=recipe.first_position)
        fresh = [layer for layer in layers if results[layer].resumed_from is None]
        done_steps = sum(steps - (results[layer].resumed_from or 0) for layer in layers) / len(layers)
        rate = done_steps * recipe.rows_per_step() / max(seconds, 1e-9)
        record = {"model": model.cfg.name, "layers": layers, "recipe": asdict(recipe), "seconds": seconds,
                  "tokens_per_second": rate, "fresh_layers": fresh,
                  "thresholds": {str(layer): {"training": before, "calibrated": after}
                                 for layer, (before, after) in thresholds.items()},
                  **{key: None if stage is None else {
                      "layers": sorted(stage.transcoders), "seconds": stage.seconds,
                      "steps": {str(layer): n for layer, n in stage.steps.items()},
                      "resumed_from": stage.resumed_from,
                      "history": {str(layer): h for layer, h in stage.history.items()}}
                     for key, stage in (("finetune", finetune), ("finetune_joint", joint))},
                  "per_layer": [ev._asdict() for ev in per_layer], "whole": whole._asdict()}
        if info.rank == 0:
            (out / "set.json").write_text(json.dumps(record, indent=2))
            _record_recipe(out, recipe, model)
    return TranscoderSet(trained, per_layer, whole, out, seconds, rate,
                         {layer: results[layer].resumed_from for layer in layers})


def _kl_layers(recipe: TranscoderRecipe, model: Any, layers: Sequence[int]) -> dict[int, int]:
    """Layer -> fine-tuning steps, for the layers the recipe fine-tunes, all of them among ``layers`` (the trained
    ones): ``kl_steps`` unless ``kl_layers`` gives the layer its own count (``LAYER:STEPS``)."""
    spec = recipe.kl_layers.strip()
    steps = {layer: recipe.kl_steps for layer in layers} if spec == "all" else {}
    for part in ([] if spec == "all" else [p.strip() for p in spec.split(",") if p.strip()]):
        layer, _, count = part.partition(":")
        try:
            steps[parse_layers(layer, model.cfg.n_layers)[0]] = int(count) if count else recipe.kl_steps
        except (ValueError, IndexError, InputError):
            raise ConfigError(f"kl_layers={recipe.kl_layers!r}: {part!r} is not LAYER or LAYER:STEPS; expected "
                              "'all' or entries such as 1,22,24:300") from None
    missing = sorted(set(steps) - set(layers))
    if missing or not steps:
        raise ConfigError(f"kl_layers={recipe.kl_layers!r} names layers {missing or 'none'} this run does not train "
                          f"(it trains {sorted(layers)}); fine-tune 'all' or a subset of --layers")
    if min(steps.values()) < 1:
        raise ConfigError(f"kl_layers={recipe.kl_layers!r} gives a layer fewer than 1 step")
    return dict(sorted(steps.items()))


def _finetune(model: Any, trained: dict[int, SAE], text: Tensor, recipe: TranscoderRecipe, out: Path,
              progress: bool, joint: bool = False) -> KLFinetuneResult:
    """The recipe's KL fine-tune of its ``kl_layers`` (:attr:`TranscoderRecipe.kl_steps`), or with ``joint`` of
    every trained layer together (:attr:`TranscoderRecipe.kl_joint_steps`), checkpointed in ``out``."""
    steps = {} if joint else _kl_layers(recipe, model, sorted(trained))
    chosen = sorted(trained) if joint else list(steps)
    every = max(1, recipe.checkpoint_every // 8) if recipe.checkpoint_every else 0  # a fine-tune step costs more
    cfg = KLFinetuneConfig(recipe.kl_joint_steps if joint else recipe.kl_steps, recipe.kl_windows,
                           recipe.kl_joint_lr if joint else recipe.kl_lr, recipe.kl_fvu_weight,
                           first_position=recipe.first_position, checkpoint_every=every, joint=joint,
                           precision=recipe.kl_precision,
                           layer_steps=tuple((layer, n) for layer, n in steps.items() if n != recipe.kl_steps))
    need = max(steps.values(), default=cfg.steps) * cfg.batch_windows  # the longest layer's steps
    # a seeded draw from the training text (all of it, on every rank: the fine-tune splits each step itself)
    seed = recipe.seed * 1000 + (600 if joint else 500)
    order = torch.cat([
        torch.randperm(text.shape[0], generator=torch.Generator().manual_seed(seed + e))
        for e in range(math.ceil(need / text.shape[0]))])[:need]
    return finetune_on_kl(model, {layer: trained[layer] for layer in chosen}, text[order], cfg, out, progress=progress)


def window_order(recipe: TranscoderRecipe, n_train: int) -> Tensor:
    """The order in which the live trainer reads its ``n_train`` training windows, every epoch one after another:
    each epoch in its own seeded order (the first in corpus order when ``recipe.shuffle`` is off)."""
    return torch.cat([
        torch.randperm(n_train, generator=torch.Generator().manual_seed(recipe.seed * 1000 + e))
        if e or recipe.shuffle else torch.arange(n_train)
        for e in range(recipe.epochs)
    ])


def transcoder_configs(recipe: TranscoderRecipe, d_model: int) -> tuple[SAEConfig, SAETrainConfig]:
    """The shape and the training settings every layer's transcoder of ``recipe`` gets."""
    sae_cfg = SAEConfig(d_in=d_model, d_sae=recipe.expansion * d_model, architecture=recipe.architecture,  # type: ignore[arg-type]
                        k=recipe.k, apply_b_dec_to_input=False, d_out=d_model, skip=recipe.skip)
    train_cfg = TrainConfig(total_steps=recipe.total_steps(), lr=recipe.lr, seed=recipe.seed,
                            dead_tokens=recipe.dead_tokens, checkpoint_every=recipe.checkpoint_every, progress=False,
                            decay_fraction=0.3, skip_init=recipe.skip_init,  # type: ignore[arg-type]
                            latent_init_scale=recipe.latent_init_scale, adam_betas=(0.9, recipe.adam_beta2),
                            precision=recipe.precision)  # type: ignore[arg-type]
    return sae_cfg, train_cfg


def transcoder_metadata(model: Any, layer: int, recipe: TranscoderRecipe) -> dict[str, Any]:
    """The SAELens ``metadata`` of one layer's transcoder: an SAE's (:func:`sae_metadata`) plus what it predicts."""
    meta = sae_metadata(model.cfg.name, input_hook(layer), dataset=recipe.corpus, context_size=recipe.n_ctx,
                        prepend_bos=recipe.first_position > 0)
    return {**meta, "hook_name_out": output_hook(layer)}


#: What a recipe written before a field existed means by leaving it out (fields not named here: their default).
RECIPE_BEFORE_FIELD: dict[str, Any] = {"shuffle": False, "mix_steps": 1, "adam_beta2": 0.999, "calibrate_windows": 0,
                                       "kl_steps": 0}

#: Recipe fields that decide only what is done with the trained weights, so a finished or interrupted set may
#: be run again with another value (the new value is recorded once the set is written).
RECIPE_AFTER_TRAINING = frozenset({"calibrate_windows", "kl_steps", "kl_layers", "kl_windows", "kl_lr",
                                   "kl_fvu_weight", "kl_joint_steps", "kl_joint_lr", "kl_precision"})


def _check_recipe(out: Path, recipe: TranscoderRecipe, model: Any, write: bool = True) -> None:
    """Refuse to resume a set trained with another recipe or model (or record this one for a fresh set)."""
    path = out / "recipe.json"
    mine = {"model": model.cfg.name, **asdict(recipe)}
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"{path} is corrupt; delete {out} or choose another --out") from None
        # a field added since reads as what runs before it did
        defaults = {**{f.name: f.default for f in fields(TranscoderRecipe)}, **RECIPE_BEFORE_FIELD}
        changed = sorted(k for k in (set(mine) | set(theirs)) - RECIPE_AFTER_TRAINING
                         if mine.get(k) != theirs.get(k, defaults.get(k)))
        if changed:
            raise ConfigError(f"{out} holds a transcoder set trained with other settings ({', '.join(changed)}); "
                              "resume with the same settings, or choose another --out")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=2))


def _record_recipe(out: Path, recipe: TranscoderRecipe, model: Any) -> None:
    """Once a set is written, record this recipe if ``recipe.json`` names another value of a field a rerun may
    change (:data:`RECIPE_AFTER_TRAINING`): the files now hold this recipe's. Atomic, and only when it differs,
    so a plain resume never rewrites (and a kill never truncates) the file :func:`_check_recipe` reads."""
    path = out / "recipe.json"
    mine = {"model": model.cfg.name, **asdict(recipe)}
    if json.loads(path.read_text()) == mine:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(mine, indent=2))
    os.replace(tmp, path)


#: Transcoder sets that ship with the project: ``data/transcoders/<model name>/``.
SHIPPED_TRANSCODERS = paths.DATA_DIR / "transcoders"


def transcoders_home(model_name: str) -> Path:
    """Where ``workbench train-transcoders MODEL`` trains a set by default: ``$WORKBENCH_HOME/transcoders/MODEL``."""
    return paths.subdir("transcoders") / model_name


def find_transcoder_set(name_or_dir: str | Path) -> Path:
    """Return the directory of a transcoder set: a path, else a shipped set's name, else one trained under the home."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    for candidate in (SHIPPED_TRANSCODERS / str(name_or_dir), paths.home() / "transcoders" / str(name_or_dir)):
        if candidate.is_dir():
            return candidate
    shipped = sorted(p.name for p in SHIPPED_TRANSCODERS.glob("*") if p.is_dir())
    raise InputError(f"{str(name_or_dir)!r} is neither a directory nor a transcoder set by name (shipped: {shipped}); "
                     f"train one with `workbench train-transcoders MODEL`")


def load_transcoder_set(
    name_or_dir: str | Path, model: Any = None, device: str | torch.device = "cpu"
) -> dict[int, SAE]:
    """Return the transcoders of a set by layer: a directory a :func:`train_transcoders` run wrote, or a
    set's name (``"kjv-small"``: the shipped one; a model name trained under the home). With ``model``,
    each is checked to fit that model's MLPs."""
    directory = find_transcoder_set(name_or_dir)
    found = sorted(directory.glob("layer_*/transcoder"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not found:
        raise InputError(f"{directory} holds no transcoders (layer_L/transcoder); train them with "
                         "`workbench train-transcoders MODEL --out DIR`")
    transcoders = {int(p.parent.name.split("_")[1]): load_sae(p, device).eval() for p in found}
    if model is not None:
        check_set(model, transcoders)
        names = {tc.metadata.get("model_name") for tc in transcoders.values()} - {None}
        if names and model.cfg.name and names != {model.cfg.name}:
            raise InputError(f"the transcoders in {directory} were trained on {sorted(names)}, not {model.cfg.name!r}; "
                             "load the set trained for this model")
    return transcoders


def export_circuit_tracer(name_or_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a set (every layer of its model) in circuit-tracer's layout; return the directory."""
    transcoders = load_transcoder_set(name_or_dir)
    layers = sorted(transcoders)
    if layers != list(range(len(layers))):
        raise InputError(f"circuit-tracer needs a transcoder for every layer from 0; this set has layers {layers}. "
                         "Train it with --layers all")
    model_name = transcoders[0].metadata.get("model_name") or "unknown"
    return save_circuit_tracer([transcoders[layer] for layer in layers], out_dir, model_name=model_name)


def ship_transcoders(run_dir: str | Path, name: str, command: str) -> Path:
    """Copy a finished set's transcoders and evaluation (not its checkpoints) to ``data/transcoders/<name>/``
    with a card naming ``command``, the way to reproduce it; replace what was there; return the directory."""
    run_dir = Path(run_dir)
    record_path = run_dir / "set.json"
    if not record_path.exists():
        raise InputError(f"{run_dir} holds no finished transcoder set (no set.json); let the training finish first")
    record = json.loads(record_path.read_text())
    target = SHIPPED_TRANSCODERS / name
    tmp = SHIPPED_TRANSCODERS / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for layer in record["layers"]:
        shutil.copytree(run_dir / f"layer_{layer}" / "transcoder", tmp / f"layer_{layer}" / "transcoder")
    (tmp / "set.json").write_text(json.dumps(record, indent=2))
    (tmp / "card.md").write_text(transcoder_card(record, command))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def transcoder_card(record: dict[str, Any], command: str) -> str:
    """A markdown card for a set: recipe, per-layer and whole-set evaluation, and the command that made it."""
    r = record["recipe"]
    whole = record["whole"]
    epochs = f" x {e} epochs" if (e := r.get("epochs", 1)) > 1 else ""
    order = "in a seeded random order" if r.get("shuffle", RECIPE_BEFORE_FIELD["shuffle"]) else "in corpus order"
    if (mixed := r.get("mix_steps", RECIPE_BEFORE_FIELD["mix_steps"])) > 1:
        order += f", the rows of {mixed} steps mixed"
    bf16 = "; the model under bfloat16 autocast" if r.get("kl_precision", "fp32") == "bf16" else ""
    train_bf16 = (" (the model under bfloat16 autocast, latents chosen from a bfloat16 encoder matmul)"
                  if r.get("precision", "fp32") == "bf16" else "")
    lines = [
        f"# Transcoders for {record['model']} (layers {', '.join(map(str, record['layers']))})", "",
        f"One transcoder per MLP: reads `blocks.L.mlp.hook_in`, predicts `blocks.L.mlp.hook_out`. "
        f"{r['architecture']}, {r['expansion']}x d_model latents, k={r['k']}, "
        f"skip term: {'yes' if r['skip'] else 'no'}. "
        f"Trained on {r['tokens']:,} tokens of `{r['corpus']}`{epochs} per layer (windows of {r['n_ctx']}, "
        f"positions from {r['first_position']}; {order}), all layers at once from live activations"
        f"{train_bf16}, in {record['seconds'] / 60:.1f} min "
        f"({record['tokens_per_second']:,.0f} tokens/s).", "",
        *([f"BatchTopK inference thresholds calibrated on the last {calibrate} training windows "
           "(the mean over batches of each batch's k x rows-th activation, with the final weights).", ""]
          if (calibrate := r.get("calibrate_windows", RECIPE_BEFORE_FIELD["calibrate_windows"]))
          and r["architecture"] == "batchtopk" else []),
        *([f"Then layers {', '.join(map(str, ft['layers']))} fine-tuned {r['kl_steps']} steps of {r['kl_windows']} "
           f"windows{_own_steps(ft, r['kl_steps'])} on the next-token KL against the real model with the layer's "
           "transcoder spliced in (plus "
           f"{r['kl_fvu_weight']} x FVU; Adam lr {r['kl_lr']}{bf16}), in {ft['seconds'] / 60:.1f} min.", ""]
          if (ft := record.get("finetune")) else []),
        *([f"Then every layer's transcoder fine-tuned together {r['kl_joint_steps']} steps of {r['kl_windows']} "
           f"windows on the next-token KL against the real model with every MLP replaced at once (plus "
           f"{r['kl_fvu_weight']} x each layer's FVU; Adam lr {r['kl_joint_lr']}{bf16}), in {jt['seconds'] / 60:.1f} "
           "min.",
           ""] if (jt := record.get("finetune_joint")) else []),
        "Reproduce:", "", "```", command, "```", "",
        f"Evaluated on the {r['eval_windows']} windows after the training text (held out):", "",
        "| layer | FVU | L0 | dead | CE clean | CE spliced | CE zero-ablated | CE recovered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ev in record["per_layer"]:
        lines.append(f"| {ev['layer']} | {ev['fvu']:.3f} | {ev['l0']:.1f} | {ev['dead_fraction']:.3f} "
                     f"| {ev['ce_clean']:.4f} | {ev['ce_spliced']:.4f} | {ev['ce_zero']:.4f} "
                     f"| {ev['ce_loss_recovered']:.3f} |")
    lines += ["", f"Every MLP replaced at once (no error terms): CE {whole['ce_replaced']:.4f} "
              f"against {whole['ce_clean']:.4f} clean, top-1 agreement {whole['top1_agreement']:.3f}, "
              f"KL {whole['kl']:.4f} nats, on {whole['n_tokens']} tokens.",
              "", "Load: `workbench.pipelines.load_transcoder_set(\"" + record["model"] + "\")` "
              "(layer -> SAE with d_out). "
              "circuit-tracer layout: `workbench train-transcoders ... --export-circuit-tracer DIR`, or "
              "`workbench.pipelines.export_circuit_tracer(name, DIR)`.", ""]
    return "\n".join(lines)


def _own_steps(stage: dict[str, Any], default: int) -> str:
    """`` (24: 300 steps, 25: 300 steps)`` for the layers of a fine-tune ``stage`` record with a count of their own."""
    own = [f"{layer}: {n} steps" for layer, n in stage.get("steps", {}).items() if n != default]
    return f" ({', '.join(own)})" if own else ""


def _bar(progress: bool, total: int, start: int):
    if not progress:
        return None
    return tqdm(total=total, initial=start, unit="step", desc="transcoders")
