"""Transcoders for a model's MLPs: the hook pairs they map, live training pairs, and evaluation by splicing.

A transcoder of layer ``L`` reads ``blocks.L.mlp.hook_in`` (what the MLP reads: ln2's output after
its weight) and predicts ``blocks.L.mlp.hook_out`` (what the MLP writes); see
:mod:`workbench.sae.model` for the arithmetic. Evaluation splices the transcoder's prediction in
place of the MLP's output and measures what the rest of the model makes of it:

- per layer: FVU of the MLP output, L0, dead fraction, and CE loss recovered against zero-ablating
  that MLP (``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``);
- for the whole set at once (every MLP replaced, no error terms): CE loss and how often the
  replaced model's top-1 next token equals the real model's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from workbench.errors import ConfigError, DataError, HookError, InputError
from workbench.sae.model import SAE
from workbench.sae.train import PRECISIONS  # also what KLFinetuneConfig.precision and live_pairs' precision may be
from workbench.store import ReaderConfig


def input_hook(layer: int) -> str:
    """The hook a layer's transcoder reads (the MLP's input, after ln2's weight)."""
    return f"blocks.{layer}.mlp.hook_in"


def output_hook(layer: int) -> str:
    """The hook a layer's transcoder predicts (the MLP's output)."""
    return f"blocks.{layer}.mlp.hook_out"


def pair_layer(in_hook: str, out_hook: str) -> int:
    """Return the layer whose MLP ``in_hook`` -> ``out_hook`` is; refuse any other pair with the right one."""
    parts = in_hook.split(".")
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        raise HookError(f"{in_hook!r} is not a block's hook; a transcoder reads blocks.L.mlp.hook_in")
    layer = int(parts[1])
    if (in_hook, out_hook) != (input_hook(layer), output_hook(layer)):
        raise HookError(
            f"{in_hook!r} -> {out_hook!r} is not the input/output pair of one MLP; a transcoder maps "
            f"{input_hook(layer)!r} -> {output_hook(layer)!r} (ln2.hook_normalized is taken before the norm's "
            "weight, so it is not what a Llama-family MLP reads)")
    return layer


def check_layers(model: Any, layers: Sequence[int]) -> list[int]:
    """Return ``layers`` checked against ``model``: it must have MLPs, and each layer must exist."""
    cfg = model.cfg
    if cfg.attn_only:
        raise ConfigError(f"{cfg.name or 'this model'} is attention-only: it has no MLPs for transcoders to replace; "
                          "choose a model with MLPs (kjv-small, smollm2-135m)")
    layers = list(layers)
    if not layers:
        raise InputError("no layers chosen; pass --layers all or a list such as 0,3,5")
    bad = [layer for layer in layers if not 0 <= layer < cfg.n_layers]
    if bad:
        raise InputError(f"layers {bad} do not exist: the model has layers 0..{cfg.n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise InputError(f"layers {layers} name a layer twice")
    return layers


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"all"`` or ``"0,3,5"`` as a list of layer indices."""
    if spec.strip() == "all":
        return list(range(n_layers))
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--layers {spec!r}: expected 'all' or comma-separated layer numbers such as 0,3,5") from None


def model_autocast(device: torch.device, precision: str):
    """The context the model's passes run in at ``precision``: bfloat16 autocast ("bf16"), or nothing ("fp32")."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Pairs(NamedTuple):
    """One batch of transcoder training rows for one layer."""

    x: Float[Tensor, "rows d_model"]
    """What the MLP read."""
    y: Float[Tensor, "rows d_model"]
    """What it wrote."""


def live_pairs(
    model: Any,
    windows: Int[Tensor, "n_windows pos"],
    layers: Sequence[int],
    batch_windows: int = 8,
    first_position: int = 0,
    start_window: int = 0,
    precision: str = "fp32",
) -> Iterator[dict[int, Pairs]]:
    """Yield, batch by batch, every chosen layer's (input, output) rows from one forward pass.

    One pass feeds all transcoders: no activation store is needed for a full set. Rows are positions
    ``first_position:`` of each window (BOS positions are usually left out). ``start_window`` lets
    a resumed run seek instead of re-reading. ``precision="bf16"`` runs the pass under bfloat16 autocast
    (the rows come back fp32 either way): on SmolLM2, 32 windows of 128 tokens take 3.3-3.8 s instead of
    6.1-6.6 s, and the rows differ from fp32's by an error whose variance is 1e-5 (layer 0) to 4e-4 (layers
    13-29) of theirs, far under a transcoder's FVU (a one-off script)."""
    layers = check_layers(model, layers)
    if batch_windows < 1:
        raise InputError(f"batch_windows={batch_windows} must be at least 1")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is unknown; expected one of {PRECISIONS}")
    names = [h for layer in layers for h in (input_hook(layer), output_hook(layer))]
    last = max(layers) + 1
    device = model.embed.W_E.device
    for b0 in range(start_window, windows.shape[0], batch_windows):
        tokens = windows[b0: b0 + batch_windows].to(device)
        with torch.no_grad(), model_autocast(device, precision):
            # stop after the last block needed: with the last layer chosen, that skips the unembedding, whose
            # logits (vocabulary x tokens: 3.2 GB for 128 SmolLM2 windows) nothing here reads
            _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=last)
        batch: dict[int, Pairs] = {}
        for layer in layers:
            x = cache[input_hook(layer)][:, first_position:].reshape(-1, model.cfg.d_model).float()
            y = cache[output_hook(layer)][:, first_position:].reshape(-1, model.cfg.d_model).float()
            if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                raise DataError(f"layer {layer}'s MLP input or output holds NaN/Inf in windows "
                                f"{b0}..{b0 + len(tokens) - 1}; "
                                "the model produces non-finite activations on this text")
            batch[layer] = Pairs(x, y)
            for name in (input_hook(layer), output_hook(layer)):  # its rows are copied: free the cached ones now
                cache.store.pop(name, None)
        del cache
        yield batch
        del batch  # before the next forward pass: the consumer may still hold it, this frame need not


def mixed_rows(
    steps: int, batch_windows: int, rows_per_window: int, seed: int, group: int, first_column: int = 0
) -> Int[Tensor, "steps rows"]:
    """Which rows of a group of ``steps`` consecutive steps each of them trains on, when the group's rows are mixed.

    The rows are numbered as :func:`live_pairs` gives a forward pass over the group's ``steps * batch_windows``
    windows (window by window). A *column* is one window slot of a step followed through the group (slot ``c``
    of every step: ``steps`` windows); each column's rows go in a seeded random order and are cut into
    ``steps`` equal parts, and step ``j`` trains on part ``j`` of every column. A step thus holds as many rows
    as before, from ``steps`` times as many windows. Columns are seeded by their global index
    (``first_column`` is this process's first slot), so data-parallel processes, each holding its own slots,
    train together on the rows one process would."""
    window = torch.arange(steps)[:, None] * batch_windows  # [steps, 1]: each step's first window in the group
    position = torch.arange(rows_per_window)
    parts = []
    for c in range(batch_windows):
        rows = ((window + c) * rows_per_window + position).reshape(-1)  # column c: steps windows' rows
        g = torch.Generator().manual_seed((seed * 1_000_003 + group) * 65_537 + first_column + c)
        parts.append(rows[torch.randperm(rows.numel(), generator=g)].view(steps, rows_per_window))
    return torch.stack(parts, dim=1).reshape(steps, batch_windows * rows_per_window)


def mixed_live_pairs(
    model: Any,
    windows: Int[Tensor, "n_windows pos"],
    layers: Sequence[int],
    batch_windows: int,
    mix_steps: int = 1,
    first_position: int = 0,
    start_step: int = 0,
    seed: int = 0,
    first_column: int = 0,
    precision: str = "fp32",
) -> Iterator[dict[int, Pairs]]:
    """Yield one step's pairs at a time, as :func:`live_pairs` with ``batch_windows`` does, with the rows of
    ``mix_steps`` consecutive steps mixed (:func:`mixed_rows`; ``mix_steps=1`` is ``live_pairs`` itself).

    One forward pass reads the group's ``mix_steps * batch_windows`` windows, and every layer takes the same
    rows for a step, so row ``i`` of ``x`` and ``y`` stay one token. A step's rows then come from more
    windows, fewer of them neighbours in one passage. The order depends only on ``seed``, the group and the
    column, so a run resumed at ``start_step`` reads what an unbroken one would. ``precision`` is
    :func:`live_pairs`'.
    """
    if mix_steps < 1:
        raise InputError(f"mix_steps={mix_steps} must be at least 1")
    if mix_steps == 1:
        yield from live_pairs(model, windows, layers, batch_windows, first_position,
                              start_window=start_step * batch_windows, precision=precision)
        return
    group = start_step // mix_steps
    rows_per_window = windows.shape[1] - first_position
    for big in live_pairs(model, windows, layers, batch_windows * mix_steps, first_position,
                          start_window=group * mix_steps * batch_windows, precision=precision):
        n_windows = big[layers[0]].x.shape[0] // rows_per_window
        steps = n_windows // batch_windows
        if steps * batch_windows != n_windows:
            raise DataError(f"{n_windows} windows do not make whole steps of {batch_windows}")
        index = mixed_rows(steps, batch_windows, rows_per_window, seed, group, first_column)
        for j in range(steps):
            if group * mix_steps + j >= start_step:
                yield {layer: Pairs(big[layer].x[index[j]], big[layer].y[index[j]]) for layer in layers}
        del big
        group += 1


def store_pairs(
    store: Any, layer: int, batch_size: int, seed: int = 0
) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    """Return a batch source for :func:`workbench.sae.train.train_sae`: step -> (x, y) pairs of ``layer`` from a store.

    Both hooks are read with the same shuffle (the store's order depends only on the reader's seed
    and epoch), so row ``i`` of ``x`` and of ``y`` are the same token."""
    missing = [h for h in (input_hook(layer), output_hook(layer)) if h not in store.hooks]
    if missing:
        raise DataError(f"the store in {store.path} lacks {missing} (it holds {sorted(store.hooks)}); a transcoder "
                        f"trains on both hooks of one MLP: cache them with `workbench cache --hooks "
                        f"{input_hook(layer)},{output_hook(layer)}`")
    reader = ReaderConfig(batch_size=batch_size, seed=seed)

    def open_from(step: int) -> Iterator[tuple[Tensor, Tensor]]:
        start = step * batch_size
        return zip(store.stream(input_hook(layer), reader, start), store.stream(output_hook(layer), reader, start))
    return open_from


def calibrate_thresholds(
    model: Any,
    transcoders: Mapping[int, SAE],
    windows: Int[Tensor, "n_windows pos"],
    batch_windows: int,
    first_position: int = 0,
) -> dict[int, tuple[float, float]]:
    """Set every BatchTopK transcoder's inference threshold from its final weights, on training windows.

    One forward pass per ``batch_windows`` windows feeds every layer (:func:`live_pairs`); each batch (pass
    a training step's ``batch_windows``, so that a batch is what BatchTopK selected over) gives the
    ``k * rows``-th largest activation, and the threshold becomes their mean
    (:func:`workbench.sae.train.batchtopk_threshold`). Returns layer -> (mean threshold before, after); other
    architectures are left alone. Deterministic: the same weights and windows give the same thresholds."""
    from workbench.sae.train import batchtopk_threshold  # the trainer imports this module

    chosen = sorted(layer for layer, tc in transcoders.items() if tc.cfg.architecture == "batchtopk")
    if not chosen:
        return {}
    if windows.shape[0] < batch_windows:
        raise InputError(f"{windows.shape[0]} windows cannot calibrate in batches of {batch_windows}; "
                         "give at least one batch")
    values: dict[int, list[float]] = {layer: [] for layer in chosen}  # per batch, so no batch is held
    usable = windows[: windows.shape[0] // batch_windows * batch_windows]  # whole batches only
    for batch in live_pairs(model, usable, chosen, batch_windows, first_position):
        for layer in chosen:
            values[layer].append(batchtopk_threshold(transcoders[layer], [batch[layer].x]))
    out = {}
    for layer in chosen:
        tc = transcoders[layer]
        before, value = float(tc.threshold.mean()), sum(values[layer]) / len(values[layer])
        with torch.no_grad():
            tc.threshold.fill_(value)
        out[layer] = (before, value)
    return out


# ---------------------------------------------------------------------------------------------
# Fine-tuning on what the rest of the model makes of the prediction




@dataclasses.dataclass(frozen=True)
class KLFinetuneConfig:
    """Settings of :func:`finetune_on_kl`."""

    steps: int
    """Optimizer steps; every chosen layer takes one per step."""
    batch_windows: int = 8
    """Windows per step (split among torchrun processes)."""
    lr: float = 3e-4
    """Adam's learning rate: linearly up over the first ``warmup_fraction`` of the steps (Adam's first steps move
    every weight by about ``lr`` whatever its gradient, which a trained transcoder does not need), constant, then
    linearly to 0 over the last ``decay_fraction``."""
    fvu_weight: float = 0.05
    """Weight of the MLP output's FVU beside the KL (keeps the prediction an MLP output, not any vector the
    later layers happen to tolerate)."""
    first_position: int = 1
    """Positions before this one keep the MLP's real output and are not scored (as in training)."""
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.3
    checkpoint_every: int = 25
    """Steps between atomic checkpoints of the whole stage (0: none); a killed run resumes from the last one."""
    joint: bool = False
    """Splice every layer's transcoder in at once and tune them together on KL(real || replaced), the loss of the
    model with every MLP replaced (what the set's top-1 agreement measures), plus ``fvu_weight`` times each layer's
    FVU; False: each layer spliced in alone, on its own KL."""
    layer_steps: tuple[tuple[int, int], ...] = ()
    """``(layer, steps)`` pairs: those layers take that many steps instead of ``steps`` (each on its own learning-rate
    schedule; the stage runs as long as its longest layer, later steps reading later windows). Per-layer mode
    only: spend steps where a layer still gains from them."""
    precision: str = "fp32"
    """bf16 runs the model's forward and backward passes under ``torch.autocast(bfloat16)`` (its weights stay
    fp32, the transcoders run in fp32 and take fp32 Adam steps; the KL is taken in fp32); fp32 runs all of it
    in fp32."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_windows < 1:
            raise ConfigError(f"steps={self.steps} and batch_windows={self.batch_windows} must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr} must be a positive number")
        if not (math.isfinite(self.fvu_weight) and self.fvu_weight >= 0):
            raise ConfigError(f"fvu_weight={self.fvu_weight} must be a number >= 0")
        if not (0 <= self.decay_fraction <= 1 and 0 <= self.warmup_fraction <= 1):
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} and decay_fraction={self.decay_fraction} "
                              "must lie in [0, 1]")
        if any(n < 1 for _, n in self.layer_steps):
            raise ConfigError(f"layer_steps={self.layer_steps}: every layer's step count must be at least 1")
        if self.joint and self.layer_steps:
            raise ConfigError("layer_steps is per-layer only: a joint fine-tune steps every layer together")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is unknown; expected one of {PRECISIONS}")

    @property
    def schedule(self) -> Any:
        """The learning-rate schedule, for :func:`workbench.runs.lr_at`."""
        from workbench.runs import LRSchedule

        return LRSchedule(self.lr, self.steps, warmup_steps=round(self.steps * self.warmup_fraction), decay="linear",
                          decay_fraction=self.decay_fraction)


class KLFinetuneResult(NamedTuple):
    transcoders: dict[int, SAE]
    """Layer -> the fine-tuned transcoder (a copy; the ones passed in are left as they were)."""
    history: dict[int, list[dict[str, float]]]
    """Layer -> ``{"step", "kl", "fvu", "l0"}`` of every ``log_every``-th step (on that step's training batch)."""
    resumed_from: int | None
    seconds: float
    steps: dict[int, int]
    """Layer -> the steps it took (``cfg.steps`` unless ``cfg.layer_steps`` gives it its own)."""


FINETUNE_DIR = "finetune"
"""Where :func:`finetune_on_kl` checkpoints in its ``out_dir`` (``finetune_joint`` for a joint fine-tune)."""


def spliced_logits(
    model: Any,
    layer: int,
    resid_mid: Float[Tensor, "batch pos d_model"],
    mlp_out: Float[Tensor, "batch pos d_model"],
    first_position: int = 0,
) -> Float[Tensor, "batch scored d_vocab"]:
    """Return the logits at positions ``first_position:`` when block ``layer``'s MLP writes ``mlp_out``, running
    only the blocks after it from the cached ``blocks.L.hook_resid_mid`` (blocks are sequential: the block's
    output is ``resid_mid + mlp_out``). The same logits as splicing by a hook, without the layers before."""
    resid = model.run_blocks(resid_mid + mlp_out, start=layer + 1)
    return model.unembed_resid(resid[:, first_position:])


#: Settings added to :class:`KLFinetuneConfig` after checkpoints were written without them, at the value those
#: checkpoints had: a checkpoint that lacks one matches a run that has it at this value.
FINETUNE_SETTINGS_ADDED: dict[str, Any] = {"joint": False, "precision": "fp32", "layer_steps": []}


def _same_fine_tune(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a checkpoint's fingerprint is this run's (settings added since count at their old value)."""
    def norm(fp: dict[str, Any]) -> dict[str, Any]:
        settings = {**FINETUNE_SETTINGS_ADDED, **fp.get("settings", {})}
        return {**fp, "settings": settings}
    return norm(stored) == norm(current)


def _kl(p_clean: Tensor, logp_clean: Tensor, logits: Tensor) -> Tensor:
    """Mean KL(clean || ``logits``) over positions, from the clean distribution and its log."""
    return (p_clean * (logp_clean - F.log_softmax(logits.float(), dim=-1))).sum(-1).mean()


def finetune_on_kl(
    model: Any,
    transcoders: Mapping[int, SAE],
    windows: Int[Tensor, "n_windows pos"],
    cfg: KLFinetuneConfig,
    out_dir: Any = None,
    *,
    progress: bool = False,
    log_every: int = 5,
) -> KLFinetuneResult:
    """Fine-tune each layer's transcoder, spliced in alone, on the KL between the real model's next-token
    distribution and the spliced model's (plus ``fvu_weight`` times the FVU of the MLP output).

    The layer-local objective trains what the evaluation measures (CE loss recovered): each MLP's prediction
    is judged by what the later layers make of it, not only by its distance to the real output (end-to-end
    dictionary training: Braun et al. 2024; a short KL fine-tune after MSE training: Karvonen 2025). Per step,
    one clean forward pass over ``batch_windows`` windows caches every chosen layer's MLP input, output and
    ``resid_mid``; each layer then runs only the blocks after it (:func:`spliced_logits`) and takes an Adam
    step. With ``cfg.joint`` every chosen transcoder is spliced in at once instead: one forward pass of the
    model with all those MLPs replaced gives one KL (the loss behind the whole set's top-1 agreement), and
    every transcoder takes its step on that KL plus ``fvu_weight`` times its own FVU, the gradient reaching each
    through the layers after it (the transcoders learn to work together; each layer alone is judged by the
    per-layer evaluation). The model is frozen. BatchTopK transcoders select over the step's rows as in
    training (recalibrate their thresholds afterwards); decoder rows stay unit-norm.

    ``windows`` holds ``cfg.steps * cfg.batch_windows`` windows (of the longest layer's steps, with
    ``cfg.layer_steps``), read in order. With ``out_dir`` the stage
    checkpoints there (``finetune/state.pt``, ``finetune_joint/state.pt`` when joint) and a killed run resumes
    to the same weights as an unbroken one;
    a checkpoint written with other settings, layers or windows is not resumed (the stage starts over). Under
    torchrun each process takes its share of every step's windows and the gradients are averaged (BatchTopK
    selects over each process's rows, and the FVU term divides by each process's own variance)."""
    import copy
    import time
    from pathlib import Path

    from workbench.distributed import dist_info
    from workbench.runs import lr_at, read_checkpoint, write_checkpoint
    from workbench.sae.train import _average_gradients, project_decoder_gradient

    check_set(model, transcoders)
    layers = sorted(transcoders)
    steps_of = {layer: cfg.steps for layer in layers}
    for layer, n in cfg.layer_steps:
        if layer not in steps_of:
            raise InputError(f"layer_steps names layer {layer}, which is not among the transcoders given ({layers})")
        steps_of[layer] = n
    total = max(steps_of.values())
    # each layer's learning-rate schedule over its own steps
    schedules = {layer: dataclasses.replace(cfg, steps=n, layer_steps=()) for layer, n in steps_of.items()}
    info = dist_info()
    windows = torch.as_tensor(windows)
    need = total * cfg.batch_windows
    if windows.ndim != 2 or windows.shape[0] < need or windows.shape[1] < cfg.first_position + 2:
        raise InputError(f"fine-tuning {total} steps of {cfg.batch_windows} windows needs [>= {need}, "
                         f">= {cfg.first_position + 2}] token windows; got {tuple(windows.shape)}")
    if cfg.batch_windows % info.world_size:
        raise ConfigError(f"batch_windows={cfg.batch_windows} does not split evenly among {info.world_size} "
                          "processes; choose a multiple of the process count")
    share = cfg.batch_windows // info.world_size
    device = model.embed.W_E.device
    tuned = {layer: copy.deepcopy(transcoders[layer]).train() for layer in layers}
    optims = {layer: torch.optim.Adam(tuned[layer].parameters(), lr=cfg.lr) for layer in layers}
    # what a checkpoint must match to be resumed: the settings, the layers, the windows and the starting weights
    digest = hashlib.sha256(windows[:need].cpu().contiguous().numpy().tobytes())
    for layer in layers:
        for tensor in transcoders[layer].state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    fingerprint = {"settings": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "layers": layers,
                   "data": digest.hexdigest()}
    stage = FINETUNE_DIR + ("_joint" if cfg.joint else "")
    path = Path(out_dir) / stage / "state.pt" if out_dir is not None else None
    start, resumed, history = 0, None, {layer: [] for layer in layers}
    if path is not None and path.exists():
        state = read_checkpoint(path, device)
        if _same_fine_tune(json.loads(state["fingerprint"]), json.loads(json.dumps(fingerprint))):
            for layer in layers:
                tuned[layer].load_state_dict(state["sae"][str(layer)])
                optims[layer].load_state_dict(state["adam"][str(layer)])
            start = resumed = int(state["step"])
            history = {int(k): v for k, v in json.loads(state["history"]).items()}

    def checkpoint(step: int) -> None:
        if info.rank == 0:
            write_checkpoint(path, {
                "step": step, "fingerprint": json.dumps(fingerprint), "history": json.dumps(history),
                "sae": {str(layer): tuned[layer].state_dict() for layer in layers},
                "adam": {str(layer): optims[layer].state_dict() for layer in layers}})

    def names(chosen: list[int]) -> list[str]:
        return [h for layer in chosen
                for h in (input_hook(layer), output_hook(layer), f"blocks.{layer}.hook_resid_mid")]
    fp = cfg.first_position

    def model_precision():
        """The context the model's passes run in: bf16 autocast, or nothing."""
        return model_autocast(device, cfg.precision)

    def predict(layer: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """Layer ``layer``'s MLP output with the transcoder's prediction from ``fp`` on, its FVU there and its L0."""
        rows_x = x[:, fp:].reshape(-1, x.shape[-1]).float()
        target = y[:, fp:].detach().float()
        with torch.autocast(device.type, enabled=False):  # the transcoder in fp32 whatever the model runs in
            out = tuned[layer](rows_x)
        pred = out.x_hat.view_as(target)
        flat = target.reshape(-1, target.shape[-1])
        fvu = (pred.reshape_as(flat) - flat).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum().clamp_min(1e-12)
        return torch.cat([y[:, :fp], pred.to(y.dtype)], dim=1), fvu, float((out.latents != 0).sum()) / rows_x.shape[0]

    def take_step(step: int, chosen: list[int], kl: Tensor, fvu: dict[int, Tensor], l0: dict[int, float]) -> None:
        """One Adam step of the ``chosen`` layers' transcoders on ``kl`` + ``fvu_weight`` x their FVUs."""
        loss = kl + cfg.fvu_weight * sum(fvu.values())
        if not torch.isfinite(loss):
            what = f"layer {chosen[0]}'s transcoder" if len(chosen) == 1 else f"layers {chosen} jointly"
            raise DataError(f"KL fine-tuning {what} gave a non-finite loss at step {step} (KL {float(kl)}, FVU "
                            f"{[round(float(v), 4) for v in fvu.values()]}); lower the fine-tune's learning rate. "
                            "Nothing of this step was written; the last checkpoint holds")
        # gradients of these transcoders only: the model's weights (perhaps shared with other callers) get none
        params = [q for layer in chosen for q in tuned[layer].parameters() if q.requires_grad]
        for q, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
            q.grad = g
        _average_gradients(params, info.world_size)  # over the default group: every rank, layers in order
        for layer in chosen:
            project_decoder_gradient(tuned[layer])
            for group in optims[layer].param_groups:
                group["lr"] = lr_at(schedules[layer], step)
            optims[layer].step()
            tuned[layer].normalize_decoder()
            if step % log_every == 0 or step == steps_of[layer] - 1:
                history[layer].append({"step": step, "kl": float(kl.detach()), "fvu": float(fvu[layer].detach()),
                                       "l0": l0[layer]})

    def joint_hooks(fvu: dict[int, Tensor], l0: dict[int, float]) -> list:
        """Hooks that put every chosen layer's prediction in place of its MLP's output, keeping FVU and L0."""
        seen: dict[int, Tensor] = {}

        def keep(x: Tensor, hook, layer: int) -> None:
            seen[layer] = x

        def replace(y: Tensor, hook, layer: int) -> Tensor:
            out, fvu[layer], l0[layer] = predict(layer, seen.pop(layer), y)
            return out
        return [h for layer in layers for h in ((input_hook(layer), functools.partial(keep, layer=layer)),
                                                 (output_hook(layer), functools.partial(replace, layer=layer)))]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, unit="step", desc="KL fine-tune")
    t0 = time.perf_counter()
    try:
        for step in range(start, total):
            b0 = step * cfg.batch_windows + info.rank * share
            tokens = windows[b0: b0 + share].to(device)
            active = [layer for layer in layers if step < steps_of[layer]]  # every layer, unless layer_steps
            with torch.no_grad(), model_precision():
                logits, cache = model.run_with_cache(tokens, names_filter=[] if cfg.joint else names(active))
                logp_clean = F.log_softmax(logits[:, fp:].float(), dim=-1)
                p_clean = logp_clean.exp()
                del logits

            if cfg.joint:  # every chosen MLP replaced in one forward pass of the whole model
                fvu: dict[int, Tensor] = {}
                l0: dict[int, float] = {}
                with torch.enable_grad(), model.hooks(joint_hooks(fvu, l0)), model_precision():
                    logits = model(tokens)[:, fp:]
                kl = _kl(p_clean, logp_clean, logits)
                take_step(step, layers, kl, fvu, l0)
                del fvu, kl, logits
            else:  # each layer spliced in alone, running only the blocks after it
                for layer in active:
                    mlp_out, fvu_l, l0_l = predict(layer, cache[input_hook(layer)], cache[output_hook(layer)])
                    with model_precision():
                        logits = spliced_logits(model, layer, cache[f"blocks.{layer}.hook_resid_mid"], mlp_out, fp)
                    kl = _kl(p_clean, logp_clean, logits)
                    take_step(step, [layer], kl, {layer: fvu_l}, {layer: l0_l})
                    del mlp_out, fvu_l, kl, logits
            del cache, logp_clean, p_clean
            done = step + 1
            if path is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == total):
                checkpoint(done)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for tc in tuned.values():
        tc.eval()
    return KLFinetuneResult(tuned, history, resumed, time.perf_counter() - t0, steps_of)


# ---------------------------------------------------------------------------------------------
# Evaluation


class LayerEval(NamedTuple):
    """One layer's transcoder, spliced in alone."""

    layer: int
    fvu: float
    """Fraction of the MLP output's variance the transcoder leaves unexplained."""
    l0: float
    """Mean active latents per position."""
    dead_fraction: float
    """Latents that never fired on the evaluation text."""
    ce_clean: float
    ce_spliced: float
    """Next-token CE with this MLP's output replaced by the transcoder's prediction (skip included)."""
    ce_zero: float
    """... with this MLP's output zeroed."""
    ce_loss_recovered: float


class SetEval(NamedTuple):
    """Every MLP replaced by its transcoder at once (no error terms)."""

    ce_clean: float
    ce_replaced: float
    top1_agreement: float
    """Fraction of scored positions where the replaced model's top token is the real model's."""
    kl: float
    """Mean KL(real || replaced) of the next-token distributions (nats)."""
    n_tokens: int


def check_set(model: Any, transcoders: Mapping[int, SAE]) -> None:
    """Raise unless every transcoder is one and fits its layer's MLP in ``model`` (widths, layer exists)."""
    check_layers(model, list(transcoders))
    for layer, tc in transcoders.items():
        if not tc.cfg.is_transcoder:
            raise InputError(f"layer {layer}: this is an SAE (no d_out), not a transcoder")
        if tc.cfg.d_in != model.cfg.d_model or tc.cfg.out_dim != model.cfg.d_model:
            raise InputError(f"layer {layer}: the transcoder maps {tc.cfg.d_in} -> {tc.cfg.out_dim}, the model's MLPs "
                             f"{model.cfg.d_model} -> {model.cfg.d_model}; was it trained for another model?")


def _replace_hooks(transcoders: Mapping[int, SAE], zero: bool = False) -> list:
    """Hooks that put each transcoder's prediction (or zeros) in place of its MLP's output."""
    seen: dict[int, Tensor] = {}
    hooks = []
    for layer, tc in transcoders.items():
        def keep(x: Tensor, hook, layer=layer) -> None:
            seen[layer] = x

        def replace(y: Tensor, hook, layer=layer, tc=tc) -> Tensor:
            if zero:
                return torch.zeros_like(y)
            return tc(seen[layer].to(tc.W_enc.dtype)).x_hat.to(y.dtype)
        hooks += [(input_hook(layer), keep), (output_hook(layer), replace)]
    return hooks


@torch.no_grad()
def evaluate_transcoders(
    model: Any,
    transcoders: Mapping[int, SAE],
    windows: Int[Tensor, "n_windows pos"],
    batch_windows: int = 8,
    first_position: int = 0,
) -> tuple[list[LayerEval], SetEval]:
    """Return each layer's spliced evaluation and the whole set's, on held-out token windows."""
    check_set(model, transcoders)
    windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.shape[1] < first_position + 2:
        raise DataError("expected token windows [n, n_ctx] with n_ctx >= first_position + 2, "
                        f"got {tuple(windows.shape)}")
    layers = sorted(transcoders)
    ce = {key: 0.0 for key in [("clean",), ("set",)] + [(m, layer) for layer in layers for m in ("tc", "zero")]}
    stats = {layer: torch.zeros(3, dtype=torch.float64) for layer in layers}  # sq err, total var, l0 sum
    fired = {layer: torch.zeros(transcoders[layer].cfg.d_sae, dtype=torch.bool) for layer in layers}
    agree = kl = 0.0
    n_tok = n_rows = 0
    for b0 in range(0, windows.shape[0], batch_windows):
        tokens = windows[b0: b0 + batch_windows].to(model.embed.W_E.device)
        targets = tokens[:, first_position + 1:]
        scored = slice(first_position, -1)

        def nll(logits: Tensor) -> tuple[float, Tensor]:
            logp = F.log_softmax(logits[:, scored].float(), dim=-1)
            return float(-logp.gather(-1, targets[..., None]).double().sum()), logp

        names = [h for layer in layers for h in (input_hook(layer), output_hook(layer))]
        logits, cache = model.run_with_cache(tokens, names_filter=names)
        clean, logp_clean = nll(logits)
        ce[("clean",)] += clean
        for layer in layers:
            tc = transcoders[layer]
            x = cache[input_hook(layer)][:, first_position:].float()
            y = cache[output_hook(layer)][:, first_position:].float()
            out = tc(x)
            flat_y = y.reshape(-1, y.shape[-1]).double()
            stats[layer][0] += (out.x_hat.double().reshape_as(flat_y) - flat_y).pow(2).sum()
            stats[layer][1] += (flat_y - flat_y.mean(0)).pow(2).sum()
            stats[layer][2] += (out.latents != 0).sum()
            fired[layer] |= (out.latents != 0).reshape(-1, tc.cfg.d_sae).any(0).cpu()
            ce[("tc", layer)] += nll(model.run_with_hooks(tokens, fwd_hooks=_replace_hooks({layer: tc})))[0]
            zeroed = model.run_with_hooks(tokens, fwd_hooks=_replace_hooks({layer: tc}, zero=True))
            ce[("zero", layer)] += nll(zeroed)[0]
        replaced, logp_set = nll(model.run_with_hooks(tokens, fwd_hooks=_replace_hooks(transcoders)))
        ce[("set",)] += replaced
        agree += float((logp_set.argmax(-1) == logp_clean.argmax(-1)).sum())
        kl += float((logp_clean.exp() * (logp_clean - logp_set)).sum(-1).double().sum())
        n_tok += targets.numel()
        n_rows += tokens.shape[0] * (tokens.shape[1] - first_position)
    mean = {key: value / n_tok for key, value in ce.items()}
    for key in (("clean",), ("set",)):
        if not math.isfinite(mean[key]):
            raise DataError("the model gives non-finite logits on this text; evaluate on other windows")
    per_layer = []
    for layer in layers:
        sq, var, l0 = stats[layer].tolist()
        gap = mean[("zero", layer)] - mean[("clean",)]
        recovered = (mean[("zero", layer)] - mean[("tc", layer)]) / gap if abs(gap) > 1e-9 else float("nan")
        per_layer.append(LayerEval(layer, sq / max(var, 1e-30), l0 / n_rows, float((~fired[layer]).float().mean()),
                                   mean[("clean",)], mean[("tc", layer)], mean[("zero", layer)], recovered))
    whole = SetEval(mean[("clean",)], mean[("set",)], agree / n_tok, kl / n_tok, n_tok)
    return per_layer, whole
