"""What the analysis scripts share: a timestamped log, loading a model (or skipping it with the way
to get it), and the loop that studies each model into one report."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.report import Report


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(name: str):
    """Return the model, or None after saying how to get it (a built-in not trained yet, a zoo model not fetched)."""
    from workbench.builtin import BUILTIN_DIR, RECIPES
    from workbench.zoo import load_model

    if name in RECIPES and not (BUILTIN_DIR / name / "config.json").is_file():
        log(f"skipping {name}: its checkpoint is not in {BUILTIN_DIR / name} yet; `workbench train {name} --ship` "
            "trains and ships it (or pass --models PATH to study another model)")
        return None
    try:
        return load_model(name)
    except WorkbenchError as exc:
        log(f"skipping {name}: {exc}")
        return None


def study_models(report: Report, models: Sequence[str], study: Callable[[str, object], dict], out: Path) -> dict:
    """Return the report's numbers after ``study(name, model)`` for every model that loads (the others are
    listed as skipped) and writing the report to ``out``."""
    report.numbers["models"] = {}
    skipped = []
    for name in models:
        model = load(name)
        if model is None:
            skipped.append(name)
            report.text(f"{name}: not available in this checkout (skipped).")
            continue
        report.numbers["models"][name] = study(name, model)
    report.numbers["skipped"] = skipped
    paths = report.write(out)
    log(f"report: {paths.html}  numbers: {paths.json}")
    return report.numbers
