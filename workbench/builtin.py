"""The built-in models: each a recipe (model config, data, training settings) trained here on the CPU.

``train_builtin(name, out_dir)`` reproduces a shipped model from scratch: the same seed and thread
count give the same weights on the same machine (floating-point summation order may differ across
CPUs, thread counts and torch builds, so another machine agrees to rounding, not bit for bit).
``ship(name, run_dir)`` copies a finished run into ``data/models/<name>/``, where the zoo finds it.

A shipped directory holds the final model (``config.json``, ``model.safetensors``, tokenizer files
for text models), ``card.md`` (the model card), ``metrics.jsonl`` (the training log) and, for the
toy models, ``snapshots/step_NNNNNN/``: native checkpoints of the model during training, the
training loop's layout, with weights stored in fp16 to keep the repository small;
``load_snapshot(name, step)`` returns the fp32 model at a step.

- ``attn-only-2l``: two attention-only layers on repeated random tokens; forms a previous-token
  head in layer 0 and an induction head in layer 1, with a phase change partway through training.
- ``attn-only-1l``: the same run with one layer; it cannot compose heads, so no induction head.
- ``kjv-small``: a 4-layer GPT-2-style LM with MLPs on the King James Bible (BPE vocabulary 2048).
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
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
from workbench.errors import CheckpointError, ConfigError
from workbench.loading import is_native_checkpoint, read_safetensors
from workbench.locking import output_lock
from workbench.model import GPTConfig, HookedGPT, parameter_counts
from workbench.names import act_name
from workbench.train import METRICS_FILE, SNAPSHOT_DIR, TrainConfig, TrainResult, next_token_loss, read_metrics, train

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
    #: dtype in which snapshots are stored (the final model always ships in fp32)
    snapshot_dtype: Literal["float16", "float32"] = "float16"
    #: torch threads while training: matmul summation order can depend on it, so bit-for-bit
    #: reproduction needs the same count (and one keeps the run polite on a shared machine)
    threads: int = 1

    def with_steps(self, steps: int) -> Recipe:
        """Return this recipe shortened (or lengthened) to ``steps`` steps; snapshots past the end are dropped."""
        snaps = tuple(s for s in self.train.snapshot_steps if s <= steps)
        return replace(self, train=replace(self.train, steps=steps, snapshot_steps=snaps))


# init_std 0.1, not GPT-2's 0.02: at d_model 64 the smaller init leaves the attention scores so flat
# that in 2,500 steps the model settles for a positional guess ("attend to about one period back",
# repeat loss ~2.1) and never forms the induction circuit; with 0.1 the phase change comes near step 500.
_TOY_MODEL = dict(d_model=64, n_heads=4, d_head=16, d_mlp=0, d_vocab=64, n_ctx=64, attn_only=True,
                  positional="learned", normalization="layernorm", init_std=0.1)  # fmt: skip
_TOY_TRAIN = TrainConfig(
    steps=2500, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0,
    checkpoint_every=500, eval_every=25, log_every=25,
    # every 100 steps: enough points across the phase change for a training-dynamics plot
    snapshot_steps=tuple(range(0, 2501, 100)),
)  # fmt: skip
_KJV_PROMPTS = ("In the beginning", "And the LORD said unto Moses,", "Jesus answered and said unto them,",
                "Blessed are the", "The LORD is my shepherd;")  # fmt: skip


def _toy_recipe(n_layers: int, description: str) -> Recipe:
    """Return the attention-only toy recipe with ``n_layers`` layers (the toys differ in nothing else)."""
    name = f"attn-only-{n_layers}l"
    return Recipe(name=name, description=description, model=dict(_TOY_MODEL, n_layers=n_layers, name=name),
                  data="synthetic", train=_TOY_TRAIN, batch_size=64,
                  synthetic=RepeatedTokensConfig(d_vocab=64, n_ctx=64, min_offset=16, max_offset=31))


RECIPES: dict[str, Recipe] = {
    "attn-only-2l": _toy_recipe(
        2, "2-layer attention-only transformer on repeated random tokens (induction heads, phase change)"),
    "attn-only-1l": _toy_recipe(
        1, "1-layer attention-only control: same task and training, cannot form an induction head"),
    "kjv-small": Recipe(
        name="kjv-small",
        description="4-layer GPT-2-style LM with MLPs on the King James Bible (BPE vocabulary 2048, context 128)",
        model=dict(d_model=128, n_layers=4, n_heads=4, d_mlp=512, n_ctx=128, positional="learned",
                   normalization="layernorm", act_fn="gelu_new", tie_embeddings=True, name="kjv-small"),
        data="corpus",
        # ~2.9M tokens (2.5 epochs of the KJV's 1.1M training tokens): about 8 minutes on one free core
        train=TrainConfig(steps=700, lr=3e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1,
                          grad_clip=1.0, checkpoint_every=100, log_every=10, max_val_windows=512),
        batch_size=32,
        corpus=CorpusWindowsConfig(corpus="kjv", vocab_size=2048, n_ctx=128, val_fraction=0.05, seed=0),
        sample_prompts=_KJV_PROMPTS,
    ),
}  # fmt: skip


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
    pattern_names = [act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
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


# ------------------------------------------------------------------------------------------ recipes


def get_recipe(name: str) -> Recipe:
    """Return the recipe of built-in model ``name`` or raise an error listing the built-in models."""
    if name not in RECIPES:
        raise ConfigError(
            f"no built-in model named {name!r}; the recipes are {sorted(RECIPES)} (`workbench train --list`)"
        )
    return RECIPES[name]


class RecipeData(NamedTuple):
    """What a recipe trains on: batches, held-out windows, extra evaluations, and the tokenizer."""

    batches: object  # a workbench.train.BatchSource
    val_windows: Int[Tensor, "batch pos"]
    evaluate: Callable[[object], dict[str, float]] | None
    tokenizer: object | None  # a workbench.tokenize.Tokenizer for corpus recipes


#: seed of the held-out repeated sequences of the synthetic recipes (never a training step's seed:
#: training batches are seeded by seed * 1_000_003 + step)
_SYNTHETIC_VAL_SEED = 987_654_321


def recipe_data(recipe: Recipe) -> RecipeData:
    """Return the batches, validation windows, evaluation and tokenizer of ``recipe`` (deterministic)."""
    if recipe.data == "synthetic":
        cfg = recipe.synthetic
        val = repeated_tokens(cfg, 256, torch.Generator().manual_seed(_SYNTHETIC_VAL_SEED)).tokens
        return RecipeData(SyntheticBatches(cfg, recipe.batch_size, recipe.seed), val, _induction_metrics(cfg), None)
    if recipe.corpus.n_ctx > recipe.model["n_ctx"]:
        raise ConfigError(
            f"recipe {recipe.name}: windows of {recipe.corpus.n_ctx} tokens exceed the model's context "
            f"n_ctx={recipe.model['n_ctx']}; make them equal"
        )
    windows = corpus_windows(recipe.corpus)
    batches = WindowBatches(windows.split.train, recipe.batch_size, recipe.seed)
    return RecipeData(batches, windows.split.val, None, windows.tokenizer)


def build_model(recipe: Recipe, tokenizer=None):
    """Return the recipe's model with its seeded initial weights (vocabulary from the tokenizer if given)."""
    kwargs = dict(recipe.model)
    if tokenizer is not None:
        kwargs["d_vocab"] = tokenizer.vocab_size
    model = HookedGPT(GPTConfig(**kwargs), tokenizer=tokenizer, init=False)
    model.init_weights(seed=recipe.seed)
    return model


# ----------------------------------------------------------------------------------------- training


def default_run_dir(name: str) -> Path:
    """Where ``workbench train NAME`` writes unless told: ``$WORKBENCH_HOME/runs/NAME``."""
    return paths.runs_dir() / name


def train_builtin(
    name: str,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    train_overrides: dict | None = None,
) -> TrainResult:
    """Train built-in model ``name`` from its recipe into ``out_dir`` and return how the run ended.

    ``steps`` overrides the recipe's length (the result then differs from the shipped model; the
    schedule is stretched to the new length). ``train_overrides``: other TrainConfig fields to change
    (``workbench train``'s flags). ``resume`` continues a killed run from its checkpoint.
    When the run completes, the snapshots are stored in fp16 and the model card is written;
    ``ship(name, out_dir)`` then copies the run into ``data/models/<name>/``.
    """
    recipe = get_recipe(name)
    if steps is not None:
        recipe = recipe.with_steps(steps)
    if train_overrides:
        recipe = replace(recipe, train=replace(recipe.train, **train_overrides))
    out_dir = Path(out_dir) if out_dir is not None else default_run_dir(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        # held from the first write to the card (train() takes it again, re-entrantly)
        with output_lock(out_dir):
            data = recipe_data(recipe)
            model = build_model(recipe, data.tokenizer)
            t0 = time.perf_counter()
            result = train(model, data.batches, recipe.train, out_dir, val_windows=data.val_windows,
                           evaluate=data.evaluate, resume=resume, progress=progress)  # fmt: skip
            wall_s = time.perf_counter() - t0
            if result.step == recipe.train.steps:
                compact_snapshots(out_dir, getattr(torch, recipe.snapshot_dtype))
                write_card(recipe, model, out_dir, result, wall_s=wall_s, resumed=resume)
    finally:
        torch.set_num_threads(threads)
    return result


# ---------------------------------------------------------------------------------------- snapshots


def compact_snapshots(run_dir: str | Path, dtype: torch.dtype = torch.float16) -> list[int]:
    """Rewrite the run's ``snapshots/step_*/`` weights in ``dtype`` (halving them for fp16); return the steps.

    The layout stays the training loop's (one native checkpoint directory a step, which
    ``HookedGPT.load`` reads and the app's training-dynamics page lists); only the stored dtype
    changes. Loading casts back to the model's fp32.
    """
    dirs = snapshot_dirs(Path(run_dir))
    for d in dirs.values():
        weights = d / "model.safetensors"
        state = read_safetensors(weights)
        if all(v.dtype == dtype for v in state.values()):
            continue  # already compacted (a resumed run that had finished)
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(weights)
    return sorted(dirs)


def snapshot_dirs(directory: Path) -> dict[int, Path]:
    """Return the snapshot directories (``snapshots/step_NNNNNN/``) under a run or model directory, by step."""
    root = directory / SNAPSHOT_DIR
    if not root.is_dir():
        return {}
    return {int(d.name.removeprefix("step_")): d for d in root.iterdir()
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit()}  # fmt: skip


def _model_dir(name_or_dir: str | Path) -> Path:
    d = Path(name_or_dir)
    if d.is_dir():
        return d
    if (BUILTIN_DIR / str(name_or_dir)).is_dir():
        return BUILTIN_DIR / str(name_or_dir)
    raise CheckpointError(
        f"{name_or_dir!r} is neither a directory nor a shipped built-in model "
        f"({sorted(p.name for p in BUILTIN_DIR.glob('*'))})"
    )


def snapshot_steps(name_or_dir: str | Path) -> list[int]:
    """Return the steps at which a built-in model (name, or a run/shipped directory) has snapshots."""
    return sorted(snapshot_dirs(_model_dir(name_or_dir)))


def load_snapshot(name_or_dir: str | Path, step: int):
    """Return the model (fp32, eval mode) as it was after ``step`` training steps (one of ``snapshot_steps``)."""
    directory = _model_dir(name_or_dir)
    dirs = snapshot_dirs(directory)
    if step not in dirs:
        raise CheckpointError(f"no snapshot at step {step} in {directory}; the snapshot steps are {sorted(dirs)}")
    return HookedGPT.load(dirs[step], dtype=torch.float32).eval()


# ------------------------------------------------------------------------------ shipping, comparing

#: what ``ship`` copies from a run directory (the optimiser checkpoint stays behind: it is 3x the model)
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_meta.json", CARD_FILE,
                 METRICS_FILE)  # fmt: skip


def ship(name: str, run_dir: str | Path) -> Path:
    """Copy a finished run of built-in ``name`` into ``data/models/<name>/`` (replacing it); return that path."""
    run_dir = Path(run_dir)
    get_recipe(name)
    if not (is_native_checkpoint(run_dir) and (run_dir / CARD_FILE).is_file()):
        raise CheckpointError(
            f"{run_dir} holds no finished run (config.json, model.safetensors and {CARD_FILE} are written at the "
            f"last step); finish it with `workbench train {name} --out {run_dir} --resume`"
        )
    target = BUILTIN_DIR / name
    tmp = BUILTIN_DIR / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in SHIPPED_FILES:
        if (run_dir / f).is_file():
            shutil.copy2(run_dir / f, tmp / f)
    if (run_dir / SNAPSHOT_DIR).is_dir():
        shutil.copytree(run_dir / SNAPSHOT_DIR, tmp / SNAPSHOT_DIR)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


def compare_with_shipped(name: str, run_dir: str | Path) -> float | None:
    """Return the largest absolute weight difference between a run and the shipped ``name`` (None: none shipped).

    0.0 means the run reproduced the shipped weights bit for bit.
    """
    shipped = BUILTIN_DIR / name / "model.safetensors"
    if not shipped.is_file():
        return None
    a, b = read_safetensors(Path(run_dir) / "model.safetensors"), read_safetensors(shipped)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise CheckpointError(
            f"the run in {run_dir} and the shipped {shipped.parent} have different architectures; "
            "the recipe changed since the model was shipped: ship the new run with `workbench train NAME --ship`"
        )
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


# --------------------------------------------------------------------------------------- model card


def _read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Return the training-loss records and the evaluation records of a run, each keyed by step."""
    logs, evals = {}, {}
    path = run_dir / METRICS_FILE
    for record in read_metrics(path) if path.is_file() else []:
        (logs if "loss" in record else evals)[record["step"]] = record
    return logs, evals


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _table(header: list[str], rows: list[list[str]]) -> str:
    # first column left-aligned (labels), the rest right-aligned (numbers)
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _card_rows(recipe: Recipe, logs: dict[int, dict], evals: dict[int, dict]) -> tuple[list[str], list[list[str]]]:
    """Return the per-checkpoint table: at each snapshot step (toys) or checkpoint (text LM)."""
    cfg = recipe.train
    if recipe.train.snapshot_steps:
        steps = {s for s in cfg.snapshot_steps if s in evals}
    else:
        steps = {s for s in evals if s % cfg.checkpoint_every == 0}
    steps = sorted(steps | ({cfg.steps} & evals.keys()))  # the final evaluation always has a row
    header = ["step", "train loss", "val loss"]
    synthetic = recipe.data == "synthetic"
    if synthetic:
        header += ["loss, first half", "loss, repeat", "best prev-token head (L0)", "best induction head (last layer)"]
    rows, prev = [], 0
    for s in steps:
        window = [r["loss"] for step, r in logs.items() if prev < step <= s]
        train_loss = f"{sum(window) / len(window):.3f}" if window else ""
        e = evals[s]
        row = [str(s), train_loss, f"{e['val_loss']:.3f}" if "val_loss" in e else ""]
        if synthetic:
            row += [f"{e['loss_first']:.3f}", f"{e['loss_repeat']:.3f}", f"{e['max_prev_token_l0']:.2f}",
                    f"{e['max_induction_last_layer']:.2f}"]  # fmt: skip
        rows.append(row)
        prev = s
    return header, rows


def write_card(recipe: Recipe, model, run_dir: str | Path, result: TrainResult, wall_s: float, resumed: bool) -> Path:
    """Write ``card.md`` for a finished run (config, data, training, losses, per-checkpoint table); return its path."""
    run_dir = Path(run_dir)
    model.eval()
    cfg, tc = model.cfg, recipe.train
    logs, evals = _read_metrics(run_dir)
    n_params = parameter_counts(cfg)["total"]
    tokens_seen = tc.steps * recipe.batch_size * cfg.n_ctx
    out = [f"# {recipe.name}", "", f"{recipe.description}. Trained by the workbench on the CPU; "
           f"`workbench train {recipe.name}` reproduces it.", ""]  # fmt: skip

    out += ["## Model", "", f"{n_params:,} parameters (fp32).", ""]
    arch = {k: v for k, v in cfg.to_dict().items() if k not in ("name",)}
    out += [_table(["field", "value"], [[k, f"`{v}`"] for k, v in arch.items()]), ""]

    out += ["## Data", ""]
    if recipe.data == "synthetic":
        s = recipe.synthetic
        out += [
            f"Synthetic repeated random tokens: BOS (id 0), then L tokens drawn uniformly from 1..{s.d_vocab - 1}, "
            f"repeated to fill {s.n_ctx} positions; L is drawn per sequence from [{s.min_offset}, {s.max_offset}] "
            "(a fixed L would let one layer cheat through positions). Each step draws a fresh batch seeded by "
            f"the step; validation: 256 held-out sequences. Chance loss on a new token is ln({s.d_vocab - 1}) = "
            f"{math.log(s.d_vocab - 1):.3f}.",
            "",
        ]
    else:
        c = recipe.corpus
        n_train = tc.steps * recipe.batch_size
        out += [
            f"Corpus `{c.corpus}` (`workbench corpora`): byte-level BPE tokenizer with {c.vocab_size} tokens trained "
            f"on it (HF tokenizers), documents joined with `<|endoftext|>`, cut into windows of {c.n_ctx} tokens "
            f"(BOS + {c.n_ctx - 1}); a seeded random {c.val_fraction:.0%} of the windows are held out for validation. "
            f"The run reads {n_train:,} training windows (reshuffled each epoch).",
            "",
        ]

    out += ["## Training", ""]
    rows = [
        ["steps", f"{tc.steps:,}"], ["batch", f"{recipe.batch_size} x {cfg.n_ctx} tokens"],
        ["tokens seen", f"{tokens_seen:,}"],
        ["optimiser", f"AdamW (betas {tc.beta1}, {tc.beta2}; weight decay {tc.weight_decay} on matrices)"],
        ["learning rate", f"{tc.lr:g}, linear warmup {tc.warmup_steps} steps, cosine to {tc.lr * tc.min_lr_ratio:g}"],
        ["gradient clipping", str(tc.grad_clip)], ["precision", tc.precision], ["seed", str(recipe.seed)],
        ["threads", str(recipe.threads)],
        ["wall time", f"{wall_s / 60:.1f} min" + (" (the last session of a resumed run)" if resumed else "")],
        ["machine", f"{_cpu_name()}, torch {torch.__version__}"],
    ]  # fmt: skip
    out += [_table(["setting", "value"], rows), ""]

    out += ["## Results", ""]
    final_val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    out += [f"Final training loss (last batch) {result.train_loss:.4f}, validation loss {final_val}.", ""]
    if recipe.data == "synthetic":
        out += _induction_section(recipe, model, evals)
    header, table_rows = _card_rows(recipe, logs, evals)
    out += ["## Validation loss per checkpoint", "",
            "Train loss is the mean of the logged batch losses since the previous row.", "",
            _table(header, table_rows), ""]  # fmt: skip
    if recipe.sample_prompts and model.tokenizer is not None:
        out += ["## Greedy samples", "", "Greedy decoding (temperature 0), 48 new tokens, prompt in bold.", ""]
        for prompt in recipe.sample_prompts:
            text = model.generate(prompt, max_new_tokens=48).texts[0]
            out += [f"**{prompt}**", "", "```", prompt + text, "```", ""]
    steps = snapshot_steps(run_dir)
    if steps:
        out += ["## Snapshots", "",
                f"`{SNAPSHOT_DIR}/step_NNNNNN/` hold the model after steps {_steps_text(steps)} "
                f"({len(steps)} snapshots, weights stored in {recipe.snapshot_dtype}). "
                f"`workbench.builtin.load_snapshot(\"{recipe.name}\", step)` rebuilds the model at a step.",
                ""]  # fmt: skip
    out += [
        "## Reproduce", "",
        "```bash",
        f"workbench train {recipe.name}          # into $WORKBENCH_HOME/runs/{recipe.name}; "
        "compares with the shipped weights",
        f"workbench train {recipe.name} --ship   # and replace data/models/{recipe.name}",
        "```", "",
        f"The same seed and thread count ({recipe.threads}) give the same weights bit for bit on the same machine and "
        "torch build; elsewhere they agree to rounding. A killed run continues with `--resume`.", "",
    ]  # fmt: skip
    path = run_dir / CARD_FILE
    path.write_text("\n".join(out))
    return path


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def _induction_section(recipe: Recipe, model, evals: dict[int, dict]) -> list[str]:
    s = induction_scores(model, recipe.synthetic)
    chance = math.log(recipe.synthetic.d_vocab - 1)
    out = [
        f"On 256 fresh repeated sequences: loss on the first occurrence {s.loss_first:.3f}, on the repeat "
        f"{s.loss_repeat:.3f} (chance {chance:.3f}).",
        "",
    ]
    below = [step for step, e in sorted(evals.items()) if "loss_repeat" in e and e["loss_repeat"] < chance / 2]
    if below:
        out += [f"Phase change: the repeat-half loss first falls below half of chance at step {below[0]} "
                "(evaluated every "
                f"{recipe.train.eval_every} steps).", ""]  # fmt: skip
    else:
        out += ["No phase change: the repeat-half loss never falls below half of chance.", ""]
    heads = [f"head {h}" for h in range(model.cfg.n_heads)]
    for title, scores in (("Previous-token score (mean attention to the previous token)", s.prev_token),
                          ("Induction score (mean attention from a repeated token to the token after its "
                           "previous occurrence)", s.induction)):  # fmt: skip
        out += [f"{title}:", ""]
        rows = [[f"layer {layer}"] + [f"{float(v):.2f}" for v in scores[layer]] for layer in range(scores.shape[0])]
        out += [_table([""] + heads, rows), ""]
    return out
