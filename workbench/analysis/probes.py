"""Linear probes: is a property linearly readable from a layer?

    ds = truth_dataset()                                         # workbench.analysis.probe_data
    result = probe_model(model, ds, kind="resid_post")           # one probe per layer, held out
    result.frame()                                               # accuracy, AUROC, control, selectivity
    result.direction(result.best).save("runs/truth-probe")      # the direction with its metadata

Per hook, two probes read the activation at the dataset's position (Alain & Bengio 2016):

- logistic regression (scikit-learn) on standardised activations, its regularisation picked by
  cross-validation on the training split;
- the mean difference of the two classes (a "mass-mean" probe, Marks & Tegmark 2023), thresholded
  half-way between the projected class means: the simplest baseline, and often the better direction.

Held-out accuracy and AUROC are measured on a stratified split the probes never saw. A *control
task* (Hewitt & Liang 2019) gives each token type a random label (here the type is the token read
and the one before it, see :class:`~workbench.analysis.probe_data.ReadPositions`); a logistic probe
of the same capacity is trained on those labels with the same split. Its held-out accuracy says
how much a probe can get by memorising token identities; *selectivity* is the task accuracy minus
the control accuracy.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from workbench.analysis.probe_data import MIN_PER_CLASS, ProbeDataset, ReadPositions, read_positions
from workbench.errors import CheckpointError, DataError, InputError
from workbench.names import act_name, layer_of
from workbench.report import jsonable

if TYPE_CHECKING:
    from workbench.model import HookedGPT

ProbeMethod = Literal["logistic", "mean_diff"]
DIRECTION_FILE = "direction.safetensors"
META_FILE = "direction.json"


@dataclass(frozen=True)
class ProbeConfig:
    """How probes are trained and evaluated."""

    #: fraction of the examples held out for evaluation (stratified by label)
    test_fraction: float = 0.25
    #: seeds the split and the control task's random labels
    seed: int = 0
    #: inverse regularisation strengths the cross-validation chooses from
    Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    #: cross-validation folds on the training split
    folds: int = 3
    #: iterations of the logistic regression solver
    max_iter: int = 1000
    #: also train the control-task probe (one more fit per hook)
    control: bool = True
    #: how cross-validation on the training split picks C: the best task ``accuracy``, or the best ``selectivity``
    #: (task minus control-task accuracy; Hewitt & Liang advise the selective probe among capacities that read the
    #: task: a weaker probe that memorises less). Needs the control task; without one it falls back to accuracy.
    choose_C_by: Literal["accuracy", "selectivity"] = "accuracy"

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise InputError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.folds < 2:
            raise InputError(f"folds must be >= 2 for cross-validation, got {self.folds}")
        if self.choose_C_by not in ("accuracy", "selectivity"):
            raise InputError(f"choose_C_by must be 'accuracy' or 'selectivity', got {self.choose_C_by!r}")


# ------------------------------------------------------------------------------------ hook names


def probe_hooks(model: HookedGPT, kind: str = "resid_post", layers: Sequence[int] | None = None) -> list[str]:
    """Return the hook names of ``kind`` at ``layers`` (default: every layer); a layer out of range is an error."""
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise InputError(f"layer {bad[0]} is out of range: {model.cfg.name or 'the model'} has {n} layers, "
                         f"numbered 0..{n - 1}")
    names = [act_name(kind, layer) for layer in layers]
    for name in names:
        model.hook_point(name)  # an unknown kind is an error listing the nearest names
    return names


# ----------------------------------------------------------------------------------- activations


def collect_activations(model: HookedGPT, reads: ReadPositions, hooks: Sequence[str], batch_size: int = 32,
                        ) -> Float[Tensor, "hook batch d_model"]:
    """Return the activation at each text's read position for every hook (CPU, float32).

    Texts of different lengths share a batch padded on the right: the model is causal, so the tokens
    after a read position never reach it, and the pad's value does not matter.
    """
    stop = None
    if all(layer_of(h) is not None for h in hooks):
        stop = max(layer_of(h) for h in hooks) + 1  # nothing after the last probed block is needed
    device = model.embed.W_E.device
    order = sorted(range(len(reads.tokens)), key=lambda i: len(reads.tokens[i]))  # similar lengths batch together
    out: list[Tensor | None] = [None] * len(order)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            width = max(len(reads.tokens[i]) for i in idx)
            tokens = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                tokens[row, : len(reads.tokens[i])] = torch.tensor(reads.tokens[i])
            pos = torch.tensor([reads.positions[i] for i in idx], device=device)
            _, cache = model.run_with_cache(tokens.to(device), names_filter=list(hooks), stop_at_layer=stop)
            rows = torch.arange(len(idx), device=device)
            got = torch.stack([cache[h][rows, pos] for h in hooks], dim=1).float().cpu()  # [batch hook d]
            for row, i in enumerate(idx):
                out[i] = got[row]
    return torch.stack(out, dim=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- probes


class ProbeFit(NamedTuple):
    """One probe on one hook, trained on the training split and scored on the held-out one."""

    #: unit vector in activation space pointing towards label 1
    direction: Float[Tensor, " d_model"]
    #: the probe's score is ``x @ weight + bias`` (a logit for the logistic probe; > 0 means label 1)
    weight: Float[Tensor, " d_model"]
    bias: float
    #: held-out accuracy and AUROC
    accuracy: float
    auroc: float
    #: accuracy on the training split
    train_accuracy: float
    #: the regularisation strength chosen by cross-validation (NaN for the mean-difference probe)
    C: float


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    # scikit-learn: ~1.3 s to import (python -X importtime), paid only when a probe is fitted
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else float("nan")


def fit_logistic(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                 cfg: ProbeConfig = ProbeConfig(), C: float | None = None) -> ProbeFit:
    """Return a logistic-regression probe (standardised inputs; C as given, else chosen by cross-validated accuracy
    on the training split, the strongest regularisation on ties) and its held-out scores."""
    # scikit-learn: ~1.3 s to import (python -X importtime), paid only when a probe is fitted
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    mean = X_train.mean(0)
    scale = X_train.std(0) + 1e-6
    Z = (X_train - mean) / scale
    folds = max(2, min(cfg.folds, int(np.bincount(y_train).min())))
    cv = list(StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(Z, y_train))

    def fit(C: float, rows: np.ndarray) -> LogisticRegression:
        # liblinear: on a CPU shared with other work it is steadily fast here, where lbfgs stalled (~0.5 s a fit)
        return LogisticRegression(C=C, solver="liblinear", max_iter=cfg.max_iter).fit(Z[rows], y_train[rows])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if C is None:
            cv_acc = [np.mean([fit(c, tr).score(Z[va], y_train[va]) for tr, va in cv]) for c in cfg.Cs]
            C = cfg.Cs[int(np.argmax(cv_acc))]
        clf = fit(C, np.arange(len(y_train)))
    coef = clf.coef_[0] / scale  # back to activation space: score = (x - mean) / scale @ coef + b
    bias = float(clf.intercept_[0] - (mean * coef).sum())
    w = torch.from_numpy(coef.astype(np.float32))
    score_test = X_test @ coef + bias
    return ProbeFit(w / w.norm().clamp_min(1e-12), w, bias, float(((score_test > 0) == y_test).mean()),
                    _auroc(y_test, score_test), float((((X_train @ coef + bias) > 0) == y_train).mean()), float(C))


def selective_C(X_train: np.ndarray, y_train: np.ndarray, control_train: np.ndarray, cfg: ProbeConfig = ProbeConfig()
                ) -> float:
    """Return the C of ``cfg.Cs`` whose logistic probes have the highest cross-validated selectivity on the training
    split: mean fold accuracy on the task minus that on the control labels, same folds (the strongest regularisation
    on ties)."""
    # scikit-learn: ~1.3 s to import (python -X importtime), paid only when a probe is fitted
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    Z = (X_train - X_train.mean(0)) / (X_train.std(0) + 1e-6)
    folds = max(2, min(cfg.folds, int(np.bincount(y_train).min())))
    cv = list(StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(Z, y_train))

    def cv_accuracy(C: float, y: np.ndarray) -> float:
        scores = []
        for tr, va in cv:
            if len(set(y[tr].tolist())) < 2:  # a fold whose training part holds one label predicts it
                scores.append(float((y[va] == y[tr][0]).mean()))
                continue
            clf = LogisticRegression(C=C, solver="liblinear", max_iter=cfg.max_iter).fit(Z[tr], y[tr])
            scores.append(clf.score(Z[va], y[va]))
        return float(np.mean(scores))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sel = [cv_accuracy(c, y_train) - cv_accuracy(c, control_train) for c in cfg.Cs]
    return float(cfg.Cs[int(np.argmax(sel))])


def fit_mean_diff(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray) -> ProbeFit:
    """Return the mean-difference probe (class 1 mean minus class 0 mean), thresholded half-way, and its scores."""
    mu1, mu0 = X_train[y_train == 1].mean(0), X_train[y_train == 0].mean(0)
    diff = mu1 - mu0
    unit = diff / max(float(np.linalg.norm(diff)), 1e-12)
    bias = -float(unit @ (mu1 + mu0) / 2)
    score_test = X_test @ unit + bias
    w = torch.from_numpy(unit.astype(np.float32))
    return ProbeFit(w, w.clone(), bias, float(((score_test > 0) == y_test).mean()), _auroc(y_test, score_test),
                    float((((X_train @ unit + bias) > 0) == y_train).mean()), float("nan"))


def control_labels(types: Sequence[object], seed: int = 0) -> np.ndarray:
    """Return a random label for each example, the same for every example of one type (half the types get 1)."""
    distinct = sorted(set(types), key=repr)
    if len(distinct) < 2:
        raise DataError(f"the control task needs at least two token types, found {len(distinct)}; every example "
                        "reads the same tokens, so selectivity cannot be measured")
    rng = random.Random(seed)
    rng.shuffle(distinct)
    one = set(distinct[: len(distinct) // 2])
    return np.array([int(t in one) for t in types])


def split(labels: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return the train and test indices: a stratified split, the same for every hook and the control task."""
    # scikit-learn: ~1.3 s to import (python -X importtime), paid only when a probe is fitted
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=labels)
    return np.sort(train), np.sort(test)


@dataclass
class LayerProbes:
    """Probes on each hook of one dataset: held-out scores, control task, and the directions."""

    #: the hooks probed, in order; every per-hook field below has one row per hook
    hooks: list[str]
    #: logistic probe: held-out accuracy, AUROC, training accuracy and the chosen C
    accuracy: Float[Tensor, " hook"]
    auroc: Float[Tensor, " hook"]
    train_accuracy: Float[Tensor, " hook"]
    C: Float[Tensor, " hook"]
    #: mean-difference probe: held-out accuracy and AUROC
    mean_diff_accuracy: Float[Tensor, " hook"]
    mean_diff_auroc: Float[Tensor, " hook"]
    #: logistic probe on the control task's labels: held-out accuracy (NaN when not run)
    control_accuracy: Float[Tensor, " hook"]
    #: unit directions towards label 1 of the logistic and the mean-difference probe
    directions: Float[Tensor, "hook d_model"]
    mean_diff_directions: Float[Tensor, "hook d_model"]
    #: the logistic probe's score is ``x @ weights[i] + biases[i]``
    weights: Float[Tensor, "hook d_model"]
    biases: Float[Tensor, " hook"]
    #: the mean projection of each class (label 0, label 1) on each logistic direction, over the training split
    class_means: Float[Tensor, "hook 2"]
    #: the raw mean difference (class 1 - class 0) on the training split: the contrast steering vector
    mean_diff: Float[Tensor, "hook d_model"]
    n_train: int
    n_test: int
    #: what the probes read, for the saved directions' metadata
    meta: dict = field(default_factory=dict)

    @property
    def selectivity(self) -> Float[Tensor, " hook"]:
        """Task accuracy minus control-task accuracy (Hewitt & Liang), per hook."""
        return self.accuracy - self.control_accuracy

    @property
    def best(self) -> int:
        """Index of the hook whose logistic probe has the highest held-out accuracy (the earliest on ties)."""
        return int(torch.argmax(self.accuracy))

    def frame(self) -> pd.DataFrame:
        """Return one row per hook: layer, hook, both probes' accuracy and AUROC, control, selectivity, C."""
        return pd.DataFrame({
            "layer": [layer_of(h) for h in self.hooks], "hook": self.hooks,
            "accuracy": self.accuracy.tolist(), "auroc": self.auroc.tolist(),
            "mean_diff_accuracy": self.mean_diff_accuracy.tolist(), "mean_diff_auroc": self.mean_diff_auroc.tolist(),
            "control_accuracy": self.control_accuracy.tolist(), "selectivity": self.selectivity.tolist(),
            "train_accuracy": self.train_accuracy.tolist(), "C": self.C.tolist()})

    def direction(self, i: int, method: ProbeMethod = "logistic") -> ProbeDirection:
        """Return hook ``i``'s probe direction with its metadata, ready to save or to steer with."""
        if not -len(self.hooks) <= i < len(self.hooks):
            raise InputError(f"probe index {i} is out of range; {len(self.hooks)} hooks were probed")
        if method == "logistic":
            vec, weight, bias = self.directions[i], self.weights[i], float(self.biases[i])
            acc, auroc = float(self.accuracy[i]), float(self.auroc[i])
        elif method == "mean_diff":
            vec = self.mean_diff_directions[i]
            weight, bias = vec, float("nan")
            acc, auroc = float(self.mean_diff_accuracy[i]), float(self.mean_diff_auroc[i])
        else:
            raise InputError(f"method must be 'logistic' or 'mean_diff', got {method!r}")
        means = (self.mean_diff[i] @ vec).item()  # how far apart the class means lie along the direction
        return ProbeDirection(vec.clone(), self.hooks[i], method, weight.clone(), bias,
                              {**self.meta, "accuracy": acc, "auroc": auroc, "class_gap": means,
                               "n_train": self.n_train, "n_test": self.n_test})


def train_probes(acts: Float[Tensor, "hook batch d_model"], labels: Sequence[int], hooks: Sequence[str],
                 types: Sequence[object] | None = None, cfg: ProbeConfig = ProbeConfig(), progress=None
                 ) -> LayerProbes:
    """Return both probes (and the control task's, when ``types`` are given) on every hook's activations.

    ``progress(done, total)`` is called after each hook when given."""
    y = np.asarray(labels, dtype=np.int64)
    if acts.ndim != 3 or acts.shape[1] != len(y) or acts.shape[0] != len(hooks):
        raise InputError(
            f"activations of shape {tuple(acts.shape)} do not match {len(hooks)} hooks and {len(y)} labels"
        )
    n0, n1 = int((y == 0).sum()), int((y == 1).sum())
    if min(n0, n1) < MIN_PER_CLASS:
        raise DataError(f"{n0} examples of label 0 and {n1} of label 1; a probe needs at least {MIN_PER_CLASS} of each")
    train, test = split(y, cfg)
    control = control_labels(types, cfg.seed) if (types is not None and cfg.control) else None
    if control is not None and len(set(control[train].tolist())) < 2:
        control = None  # every training type drew one label: nothing to learn, reported as NaN
    rows = []
    for h in range(len(hooks)):
        X = acts[h].double().numpy()
        C = (selective_C(X[train], y[train], control[train], cfg)
             if cfg.choose_C_by == "selectivity" and control is not None else None)
        logistic = fit_logistic(X[train], y[train], X[test], y[test], cfg, C=C)
        md = fit_mean_diff(X[train], y[train], X[test], y[test])
        # the control probe has the task probe's capacity (its C), as in Hewitt & Liang: selectivity compares
        # what one probe configuration reads from the representation with what it can memorise
        ctrl = (fit_logistic(X[train], control[train], X[test], control[test], cfg, C=logistic.C).accuracy
                if control is not None else float("nan"))
        proj = X[train] @ logistic.direction.double().numpy()
        means = [float(proj[y[train] == c].mean()) for c in (0, 1)]
        diff = torch.from_numpy((X[train][y[train] == 1].mean(0) - X[train][y[train] == 0].mean(0)).astype(np.float32))
        rows.append((logistic, md, ctrl, means, diff))
        if progress is not None:
            progress(h + 1, len(hooks))
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return LayerProbes(
        list(hooks), t([r[0].accuracy for r in rows]), t([r[0].auroc for r in rows]),
        t([r[0].train_accuracy for r in rows]), t([r[0].C for r in rows]),
        t([r[1].accuracy for r in rows]), t([r[1].auroc for r in rows]), t([r[2] for r in rows]),
        torch.stack([r[0].direction for r in rows]), torch.stack([r[1].direction for r in rows]),
        torch.stack([r[0].weight for r in rows]), t([r[0].bias for r in rows]), t([r[3] for r in rows]),
        torch.stack([r[4] for r in rows]), len(train), len(test))


def probe_model(model: HookedGPT, dataset: ProbeDataset, kind: str = "resid_post",
                layers: Sequence[int] | None = None, cfg: ProbeConfig = ProbeConfig(), batch_size: int = 32,
                progress=None) -> LayerProbes:
    """Return probes of ``dataset``'s labels on hook ``kind`` at each of ``layers`` (default: all) of ``model``."""
    dataset.check()
    hooks = probe_hooks(model, kind, layers)
    reads = read_positions(model, dataset)
    acts = collect_activations(model, reads, hooks, batch_size)
    result = train_probes(acts, dataset.labels, hooks, reads.types, cfg, progress)
    result.meta = {"model": model.cfg.name, "dataset": dataset.name, "position": dataset.position,
                   "label_names": list(dataset.label_names), "d_model": model.cfg.d_model}
    return result


def project(model: HookedGPT, dataset: ProbeDataset, direction: ProbeDirection, batch_size: int = 32
            ) -> Float[Tensor, " batch"]:
    """Return every example's activation at ``direction.hook`` projected on the (unit) direction."""
    direction.check_width(model.cfg.d_model)
    acts = collect_activations(model, read_positions(model, dataset), [direction.hook], batch_size)[0]
    return acts @ direction.vector.float()


# ---------------------------------------------------------------------------------- saved directions


@dataclass
class ProbeDirection:
    """A direction in one hook's activation space, with what it was found from."""

    #: unit vector towards label 1
    vector: Float[Tensor, " d_model"]
    #: the hook it lives at, e.g. ``blocks.12.hook_resid_post``
    hook: str
    #: how it was found: ``logistic``, ``mean_diff`` (a probe), ``contrast``, ``sae_feature``
    method: str
    #: the probe's score is ``x @ weight + bias`` (bias NaN where the method has none)
    weight: Float[Tensor, " d_model"]
    bias: float
    #: model, dataset, position, accuracy, AUROC, ``class_gap`` (class-mean distance along the vector), ...
    meta: dict = field(default_factory=dict)

    def check_width(self, d_model: int) -> None:
        """Raise an InputError unless the direction has ``d_model`` entries."""
        if self.vector.ndim != 1 or self.vector.shape[0] != d_model:
            raise InputError(f"the direction has shape {tuple(self.vector.shape)}, but {self.hook} of this model has "
                             f"width {d_model}; use a direction found on the same model and hook")

    def save(self, directory: str | Path) -> Path:
        """Write ``direction.safetensors`` (vector, weight) and ``direction.json`` (hook, method, meta).

        Return the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"vector": self.vector.float().contiguous(), "weight": self.weight.float().contiguous()},
                  str(directory / DIRECTION_FILE))
        (directory / META_FILE).write_text(json.dumps(
            jsonable({"hook": self.hook, "method": self.method, "bias": self.bias, **self.meta}), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ProbeDirection:
        """Read a direction written by :meth:`save`."""
        directory = Path(directory)
        if not (directory / DIRECTION_FILE).is_file() or not (directory / META_FILE).is_file():
            raise CheckpointError(f"{directory} holds no saved direction ({DIRECTION_FILE} + {META_FILE}); "
                                  "`workbench probe ... --save DIR` writes one")
        tensors = load_file(str(directory / DIRECTION_FILE))
        meta = json.loads((directory / META_FILE).read_text())
        hook, method, bias = meta.pop("hook"), meta.pop("method"), meta.pop("bias")
        return cls(tensors["vector"], hook, method, tensors["weight"], float("nan") if bias is None else bias, meta)
