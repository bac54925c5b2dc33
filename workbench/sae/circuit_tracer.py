"""Transcoder sets in circuit-tracer's layout, written and read, so sets trained here can be used there.

A set is a directory with one transcoder per layer of the model:

- ``config.yaml``          ``model_name``, ``model_kind: transcoder_set``, ``feature_input_hook:
                           mlp.hook_in``, ``feature_output_hook: mlp.hook_out``, and a ``transcoders``
                           list (``id``, ``layer``, ``filepath``) naming the files below;
- ``layer_{i}.safetensors`` ``W_enc [d_tc, d_model]`` (transposed relative to SAELens' layout),
                           ``W_dec [d_tc, d_model]``, ``b_enc [d_tc]``, ``b_dec [d_model]``, an optional
                           ``W_skip [d_model, d_model]`` (applied as ``x @ W_skip.T``; every layer has one or
                           none does) and, for JumpReLU, ``activation_function.threshold [d_tc]``.

circuit-tracer's transcoders are ReLU or JumpReLU; a TopK set has no exact counterpart there, so it
is refused with the way out: train BatchTopK (``architecture="batchtopk"``), whose inference-time
form is a JumpReLU with its learned threshold, and export that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.errors import CheckpointError, InputError
from workbench.sae.io import saelens_state_dict
from workbench.sae.model import SAE, SAEConfig

CONFIG_FILE = "config.yaml"
INPUT_HOOK = "mlp.hook_in"
OUTPUT_HOOK = "mlp.hook_out"
THRESHOLD = "activation_function.threshold"


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def save_circuit_tracer(transcoders: Sequence[SAE], directory: str | os.PathLike, model_name: str) -> Path:
    """Write one transcoder per layer (``transcoders[i]`` for layer ``i``) in circuit-tracer's layout."""
    directory = Path(directory)
    if not transcoders:
        raise InputError("no transcoders to export; pass one per layer, layer 0 first")
    for layer, tc in enumerate(transcoders):
        if not tc.cfg.is_transcoder:
            raise InputError(f"layer {layer} holds an SAE, not a transcoder (its config has no d_out)")
        if tc.cfg.architecture == "topk":
            raise InputError(
                f"layer {layer} is a TopK transcoder, which circuit-tracer cannot load (it reads ReLU and JumpReLU); "
                "train the set with architecture='batchtopk' (exported as JumpReLU with its threshold)")
    if len({tc.W_skip is not None for tc in transcoders}) > 1:
        raise InputError("circuit-tracer takes W_skip in every layer or in none; this set mixes the two")
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for layer, tc in enumerate(transcoders):
        state = saelens_state_dict(tc)
        out = {"W_enc": state["W_enc"].T.contiguous(), "W_dec": state["W_dec"], "b_enc": state["b_enc"],
               "b_dec": state["b_dec"]}
        if "W_skip" in state:
            out["W_skip"] = state["W_skip"]
        if "threshold" in state:
            out[THRESHOLD] = state["threshold"]
        _atomic(directory / layer_file(layer), lambda tmp, out=out: save_file(out, str(tmp)))
        filepath = str((directory / layer_file(layer)).resolve())
        entries.append({"id": f"layer_{layer}", "layer": layer, "filepath": filepath})
    config = {"model_name": model_name, "model_kind": "transcoder_set", "feature_input_hook": INPUT_HOOK,
              "feature_output_hook": OUTPUT_HOOK, "transcoders": entries}
    _atomic(directory / CONFIG_FILE, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))
    return directory


def load_circuit_tracer(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[list[SAE], dict[str, Any]]:
    """Return the transcoders of a circuit-tracer set (layer 0 first) and its ``config.yaml``."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    try:
        config = yaml.safe_load(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a circuit-tracer transcoder set: it has no {CONFIG_FILE}") from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{config_path} is not valid YAML ({exc}); re-export the set") from None
    if not isinstance(config, dict) or config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise CheckpointError(f"{config_path}: expected model_kind: transcoder_set (per-layer transcoders)")
    files = sorted(directory.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    layers = [int(p.stem.split("_")[1]) for p in files]
    if not files or layers != list(range(len(files))):
        raise CheckpointError(f"{directory}: expected layer_0.safetensors ... layer_N.safetensors, one per layer; "
                              f"found layers {layers}")
    transcoders = [_read_layer(path) for path in files]
    if len({tc.W_skip is not None for tc in transcoders}) > 1:
        raise CheckpointError(f"{directory}: W_skip is in some layers and not others")
    return [tc.to(device).eval() for tc in transcoders], config


def _read_layer(path: Path) -> SAE:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); the file is truncated or corrupt, re-export it") from None
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; a circuit-tracer transcoder holds W_enc, W_dec, b_enc, b_dec")
    d_sae, d_in = state["W_enc"].shape
    d_out = state["W_dec"].shape[1]
    shapes = {"W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,), "W_skip": (d_out, d_in),
              THRESHOLD: (d_sae,)}
    for name, shape in shapes.items():
        if name in state and tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {shape} "
                                  f"(W_enc is [d_tc={d_sae}, d_model={d_in}])")
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path}: {bad} hold NaN/Inf values")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu" if THRESHOLD in state else "relu",
                    apply_b_dec_to_input=False, d_out=d_out, skip="W_skip" in state)
    tc = SAE(cfg)
    with torch.no_grad():
        tc.W_enc.copy_(state["W_enc"].T)
        for name in ("W_dec", "b_enc", "b_dec") + (("W_skip",) if cfg.skip else ()):
            getattr(tc, name).copy_(state[name])
        if THRESHOLD in state:
            tc.threshold.copy_(state[THRESHOLD])
    return tc


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {target}: {exc.strerror or exc}; choose a writable directory") from None

