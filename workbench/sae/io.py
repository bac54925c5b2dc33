"""SAEs on disk in SAELens' layout, so SAELens users can load what the workbench trains.

A saved SAE is a directory:

- ``cfg.json``                 SAELens (6.x) config: ``architecture`` (``standard`` | ``topk`` |
                               ``jumprelu``), ``d_in``, ``d_sae``, ``dtype``, ``device``,
                               ``apply_b_dec_to_input``, ``normalize_activations``,
                               ``reshape_activations``, ``k`` and ``rescale_acts_by_decoder_norm``
                               (topk), and a free-form ``metadata`` object.
- ``sae_weights.safetensors``  ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
                               ``b_dec [d_in]`` and, for jumprelu, ``threshold [d_sae]``. SAELens
                               loads these with a strict ``load_state_dict``: no other keys.
- ``sparsity.safetensors``     optional: ``sparsity [d_sae]``, log10 of each latent's firing rate.
- ``workbench_sae.json``       the workbench's own record (its architecture name, e.g.
                               ``batchtopk``, and the folded input scale); SAELens ignores it.

SAELens' ``SAE.load_from_disk`` branches on ``metadata.sae_lens_version``: without it (or below
6.0) the config goes through its pre-6.0 converter, so the version of the layout written here is
recorded there. The input scale of ``expected_average_only_in`` is folded into the weights and
``normalize_activations`` written as ``none``, which is what SAELens' own trainer does at the end
of training; a BatchTopK SAE is written as ``jumprelu`` with its learned global threshold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from workbench.errors import CheckpointError
from workbench.sae.model import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
WORKBENCH_FILE = "workbench_sae.json"

#: The SAELens release whose on-disk layout this module writes (its loader reads the version).
SAELENS_FORMAT_VERSION = "6.54.0"

_TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
# Transcoders, named as SAELens names its classes (Transcoder, SkipTranscoder, JumpReLUTranscoder,
# JumpReLUSkipTranscoder). SAELens has no TopK transcoder: `topk_transcoder` is the workbench's own
# name, read only here; BatchTopK travels as JumpReLU with its threshold, which SAELens and
# circuit-tracer load.
_TRANSCODER_PREFIX = {"relu": "", "topk": "topk_", "batchtopk": "jumprelu_", "jumprelu": "jumprelu_"}
_TRANSCODER_FROM_SAELENS = {f"{prefix}{skip}transcoder": (arch, bool(skip))
                            for arch, prefix in _TRANSCODER_PREFIX.items() if arch != "batchtopk"
                            for skip in ("", "skip_")}


def saelens_architecture(cfg: SAEConfig) -> str:
    """Return the ``architecture`` string SAELens' ``cfg.json`` uses for this SAE or transcoder."""
    if not cfg.is_transcoder:
        return _TO_SAELENS[cfg.architecture]
    return f"{_TRANSCODER_PREFIX[cfg.architecture]}{'skip_' if cfg.skip else ''}transcoder"


def saelens_state_dict(sae: SAE) -> dict[str, Tensor]:
    """Return the SAE's weights as SAELens names them, with the input scale folded in."""
    scale = sae.norm_scale.detach().float()
    state = {
        "W_enc": sae.W_enc.detach().float() * scale,
        "W_dec": sae.W_dec.detach().float() / scale,
        "b_enc": sae.b_enc.detach().float(),
        "b_dec": sae.b_dec.detach().float() / scale,
    }
    if sae.cfg.architecture in ("jumprelu", "batchtopk"):
        state["threshold"] = sae.threshold.detach().float()
    if sae.W_skip is not None:  # x @ W_skip.T reads the raw input: unscale it like W_enc
        state["W_skip"] = sae.W_skip.detach().float() * scale
    return {name: tensor.contiguous().cpu() for name, tensor in state.items()}


def saelens_config(sae: SAE, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the ``cfg.json`` dictionary SAELens 6.x reads for this SAE."""
    meta = {**sae.metadata, **(metadata or {})}
    meta.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
    meta.setdefault("sae_lens_training_version", SAELENS_FORMAT_VERSION)
    meta.setdefault("trained_with", "interp-workbench")
    cfg: dict[str, Any] = {
        "architecture": saelens_architecture(sae.cfg),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if sae.cfg.architecture == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if sae.cfg.is_transcoder:
        cfg["d_out"] = sae.cfg.d_out
        cfg["hook_name_out"] = meta.get("hook_name_out", "")
    return cfg


def save_sae(
    sae: SAE,
    path: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    log_feature_density: Tensor | None = None,
) -> Path:
    """Write ``sae`` to the directory ``path`` in SAELens' layout and return the directory.

    Files are written under temporary names and renamed, so an interrupted save never leaves a
    half-written weights file under the real name.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = saelens_state_dict(sae)
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"refusing to save SAE to {path}: {bad} hold NaN/Inf values")
    _atomic(path / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    if log_feature_density is not None:
        density = log_feature_density.detach().float().cpu().contiguous()
        _atomic(path / SPARSITY_FILE, lambda tmp: save_file({"sparsity": density}, str(tmp)))
    cfg = saelens_config(sae, metadata)
    _atomic(path / CFG_FILE, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2)))
    record = {"sae": sae.cfg.to_dict(), "folded_norm_scale": float(sae.norm_scale)}
    _atomic(path / WORKBENCH_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved in SAELens' layout (by the workbench or by SAELens 6.x).

    ``sae.metadata`` holds the config's ``metadata`` object (model and hook name, ...).
    """
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_path.exists() or not weights_path.exists():
        raise CheckpointError(
            f"{path} is not an SAE directory: expected {CFG_FILE} and {WEIGHTS_FILE} in it; "
            f"point at the directory `workbench train-sae` or SAELens' save_model wrote"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
        state = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - corrupt JSON or safetensors: same advice
        raise CheckpointError(f"cannot read the SAE in {path} ({exc}); the files are corrupt") from exc
    sae_cfg = _config_from_saelens(cfg, path)
    expected = {
        "W_enc": (sae_cfg.d_in, sae_cfg.d_sae),
        "W_dec": (sae_cfg.d_sae, sae_cfg.out_dim),
        "b_enc": (sae_cfg.d_sae,),
        "b_dec": (sae_cfg.out_dim,),
    }
    if sae_cfg.architecture in ("jumprelu", "batchtopk"):
        expected["threshold"] = (sae_cfg.d_sae,)
    if sae_cfg.skip:
        expected["W_skip"] = (sae_cfg.out_dim, sae_cfg.d_in)
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{weights_path} has no tensor {name!r} (it has {sorted(state)})")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{weights_path}: {name} has shape {tuple(state[name].shape)}, but cfg.json "
                f"(d_in={sae_cfg.d_in}, d_sae={sae_cfg.d_sae}, d_out={sae_cfg.out_dim}) needs {shape}"
            )
        if not torch.isfinite(state[name]).all():
            raise CheckpointError(f"{weights_path}: {name} holds NaN/Inf values")
    weights = {name: state[name].float() for name in expected}
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scales the pre-activations by the decoder norms and decodes with unit rows:
        # the same function as folding the norms into the encoder.
        norms = weights["W_dec"].norm(dim=-1)
        weights["W_enc"] = weights["W_enc"] * norms
        weights["b_enc"] = weights["b_enc"] * norms
        weights["W_dec"] = weights["W_dec"] / norms[:, None]
    sae = SAE(sae_cfg)
    with torch.no_grad():
        for name, tensor in weights.items():
            getattr(sae, name).copy_(tensor)
    sae.metadata = dict(cfg.get("metadata") or {})
    return sae.to(device).eval()


def load_log_feature_density(path: str | Path) -> Tensor | None:
    """Return the saved log10 feature densities [d_sae], or None if the SAE has none."""
    file = Path(path) / SPARSITY_FILE
    return load_file(str(file))["sparsity"] if file.exists() else None


def _config_from_saelens(cfg: dict[str, Any], path: Path) -> SAEConfig:
    for field in ("d_in", "d_sae"):
        if field not in cfg:
            raise CheckpointError(f"{path / CFG_FILE} lacks the required field {field!r}")
    arch = cfg.get("architecture", "standard")
    if arch in _TRANSCODER_FROM_SAELENS:
        return _transcoder_config(cfg, arch, path)
    if arch not in _FROM_SAELENS:
        raise CheckpointError(
            f"{path / CFG_FILE}: architecture {arch!r} is not supported; the workbench loads "
            f"{sorted(_FROM_SAELENS) + sorted(_TRANSCODER_FROM_SAELENS)}"
        )
    normalize = cfg.get("normalize_activations", "none")
    # `expected_average_only_in` is a training-time scale SAELens folds away; at inference its
    # SAE applies nothing for it, and neither do we.
    if normalize not in ("none", "expected_average_only_in", False, None):
        raise CheckpointError(
            f"{path / CFG_FILE}: normalize_activations={normalize!r} is not supported (only 'none' "
            f"and 'expected_average_only_in'); fold the normalisation into the weights first"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise CheckpointError(
            f"{path / CFG_FILE}: reshape_activations={cfg['reshape_activations']!r} (hook_z SAEs) "
            f"is not supported; the workbench reads [..., d_in] activations"
        )
    workbench_file = path / WORKBENCH_FILE
    architecture = _FROM_SAELENS[arch]
    k = int(cfg.get("k", 100))  # SAELens' TopKSAEConfig default
    if workbench_file.exists():
        own = json.loads(workbench_file.read_text()).get("sae", {})
        if _TO_SAELENS.get(own.get("architecture", ""), None) == arch:
            architecture = own["architecture"]
            k = int(own.get("k", k))
    return SAEConfig(
        d_in=int(cfg["d_in"]),
        d_sae=int(cfg["d_sae"]),
        architecture=architecture,
        k=k if architecture in ("topk", "batchtopk") else SAEConfig.k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
    )


def _transcoder_config(cfg: dict[str, Any], arch: str, path: Path) -> SAEConfig:
    if "d_out" not in cfg:
        raise CheckpointError(f"{path / CFG_FILE}: a {arch} needs 'd_out' (the width of its output hook)")
    architecture, skip = _TRANSCODER_FROM_SAELENS[arch]
    k = SAEConfig.k
    workbench_file = path / WORKBENCH_FILE
    if workbench_file.exists():  # the workbench's own name: BatchTopK travels as jumprelu
        own = json.loads(workbench_file.read_text()).get("sae", {})
        if _TRANSCODER_PREFIX.get(own.get("architecture", "")) == _TRANSCODER_PREFIX[architecture]:
            architecture, k = own["architecture"], int(own.get("k", k))
    if architecture == "topk":
        k = int(cfg.get("k", k))
    return SAEConfig(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), architecture=architecture, k=k,
                     apply_b_dec_to_input=False, d_out=int(cfg["d_out"]), skip=skip)


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)
