"""Weights in and out: HF GPT-2 / Llama (objects, directories, hub ids) and native checkpoints.

This is the one place that maps HF parameter names to the workbench's. A native checkpoint is a
directory with ``config.json`` (the GPTConfig), ``model.safetensors`` (the per-head weights under
their workbench names) and, when the model has one, ``tokenizer.json`` + ``tokenizer_meta.json``.
Nothing is ever pickled. Every load checks names and shapes of all tensors before copying any, so
a bad checkpoint fails whole, with the offending names, and leaves nothing half-loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from workbench.errors import CheckpointError, ConfigError
from workbench.model import GPTConfig, HookedGPT
from workbench.tokenize import Tokenizer

FORMAT = "workbench-gpt"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# State dicts


def load_weights(model: HookedGPT, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Copy ``state_dict`` into ``model`` after checking that names and shapes match exactly."""
    _check_fit(model, state_dict, source)
    with torch.no_grad():
        model.load_state_dict(dict(state_dict), strict=True)


def model_for_weights(cfg: GPTConfig, state_dict: Mapping[str, Tensor], tokenizer=None,
                      source: str = "checkpoint") -> HookedGPT:
    """Return an (uninitialised) HookedGPT for ``cfg``, built only once ``state_dict`` is known to fit it.

    The sizes a config names are checked before anything is allocated: the layer count against the
    layers the weights hold, then every parameter's shape on a ``meta``-device model (no memory), then
    the bytes the real model needs (parameters and position tables) against the memory available.
    A config.json or GGUF header claiming 1e9 layers is a one-line error, not a machine out of memory
    (a 2^32-token context costs nothing up front: RoPE tables grow to the positions a pass uses).
    """
    layers = {k.split(".")[1] for k in state_dict if k.startswith("blocks.")}
    if cfg.n_layers != len(layers):
        raise CheckpointError(
            f"{source}: the config says n_layers={cfg.n_layers} but the weights hold {len(layers)} layers; "
            "check that the config and the weights come from the same model"
        )
    try:
        with torch.device("meta"):
            skeleton = HookedGPT(cfg, init=False)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{source}: a model cannot be built from this config ({exc}); fix the config") from None
    _check_fit(skeleton, state_dict, source)
    need = sum(t.numel() * t.element_size() for t in (*skeleton.parameters(), *skeleton.buffers()))
    available = available_memory()
    if available is not None and need > available:
        tables = sum(b.numel() * b.element_size() for b in skeleton.buffers())
        raise ConfigError(
            f"{source}: the model needs {need / 2**30:.1f} GiB ({tables / 2**30:.1f} GiB of them position tables for "
            f"n_ctx={cfg.n_ctx}) but {available / 2**30:.1f} GiB of memory are available; a config with a smaller "
            "context (n_ctx / context_length) or a machine with more memory is needed"
        )
    return HookedGPT(cfg, tokenizer=tokenizer, init=False)


def available_memory() -> int | None:
    """Return the bytes of memory available now (Linux MemAvailable), or None where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fit(model: HookedGPT, state_dict: Mapping[str, Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [f"{k}: {got[k]} (expected {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit this model configuration ({'; '.join(problems)}); "
            "check that the config and the weights come from the same model"
        )


def _contiguous_state_dict(model: HookedGPT) -> dict[str, Tensor]:
    # safetensors stores contiguous tensors; per-head views are copied into their logical layout
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Native checkpoints


def save_native(model: HookedGPT, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a native checkpoint directory; files are replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / (WEIGHTS_FILE + ".tmp")
    save_file(_contiguous_state_dict(model), str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, directory / WEIGHTS_FILE)
    tmp_cfg = directory / (CONFIG_FILE + ".tmp")
    tmp_cfg.write_text(json.dumps({"format": FORMAT, "version": 1, "config": model.cfg.to_dict()}, indent=2))
    os.replace(tmp_cfg, directory / CONFIG_FILE)
    if model.tokenizer is not None:
        model.tokenizer.save(directory)
    return directory


def is_native_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def read_native_config(directory: str | os.PathLike) -> GPTConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist; a native checkpoint has {CONFIG_FILE} and {WEIGHTS_FILE}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt, re-create it") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raw = raw if isinstance(raw, dict) else {}
        raise CheckpointError(
            f"{path} is not a workbench checkpoint (format={raw.get('format')!r}); for HF directories use from_hf"
        )
    try:
        return GPTConfig.from_dict(raw["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path} holds an invalid model config: {exc}") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Return the tensors of a safetensors file, or raise CheckpointError if it is truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({exc}); delete it and re-create it (for zoo models: workbench fetch NAME)"
        ) from None


def load_native(directory: str | os.PathLike, device=None, dtype=None) -> HookedGPT:
    """Load a native checkpoint directory (with its tokenizer, if it has one)."""
    directory = Path(directory)
    cfg = read_native_config(directory)
    state = read_safetensors(directory / WEIGHTS_FILE)
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    model = model_for_weights(cfg, state, tokenizer, source=str(directory / WEIGHTS_FILE))
    load_weights(model, state, source=str(directory / WEIGHTS_FILE))
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


# ---------------------------------------------------------------------------------------------
# HF transformers


def config_from_hf(hf_config: Mapping | object) -> GPTConfig:
    """Return the GPTConfig of an HF GPT-2 or Llama config (a PretrainedConfig or its dict)."""
    c = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    try:
        return _config_from_hf(c)
    except KeyError as exc:
        raise ConfigError(
            f"the HF {c.get('model_type')} config lacks {exc.args[0]!r}; it is incomplete: "
            "use the model's own config.json"
        ) from None


def _config_from_hf(c: dict) -> GPTConfig:
    kind = c.get("model_type")
    if kind == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if c.get(flag):
                raise ConfigError(f"GPT-2 variant with {flag}=True is not supported")
        if c.get("scale_attn_weights") is False:
            raise ConfigError("GPT-2 variant with scale_attn_weights=False is not supported")
        act = c.get("activation_function", "gelu_new")
        act = {"gelu_pytorch_tanh": "gelu_new"}.get(act, act)
        d = c["n_embd"]
        return GPTConfig(
            d_model=d, n_layers=c["n_layer"], n_heads=c["n_head"],
            d_mlp=c.get("n_inner") or 4 * d, d_vocab=c["vocab_size"], n_ctx=c["n_positions"],
            positional="learned", normalization="layernorm", act_fn=act, use_bias=True,
            tie_embeddings=c.get("tie_word_embeddings", True), norm_eps=c.get("layer_norm_epsilon", 1e-5),
            name=c.get("_name_or_path", "") or "gpt2",
        )
    if kind == "llama":
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ConfigError(f"Llama RoPE scaling {rope.get('rope_type')!r} is not supported (only the default RoPE)")
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        d, H = c["hidden_size"], c["num_attention_heads"]
        if c.get("attention_bias", False) != c.get("mlp_bias", False):
            raise ConfigError("Llama variants with attention_bias != mlp_bias are not supported")
        return GPTConfig(
            d_model=d, n_layers=c["num_hidden_layers"], n_heads=H, d_head=c.get("head_dim"),
            d_mlp=c["intermediate_size"], d_vocab=c["vocab_size"], n_ctx=c["max_position_embeddings"],
            n_kv_heads=c.get("num_key_value_heads") or H, positional="rotary", normalization="rmsnorm",
            act_fn=c.get("hidden_act", "silu"), gated_mlp=True, use_bias=bool(c.get("attention_bias", False)),
            tie_embeddings=c.get("tie_word_embeddings", False), rope_theta=float(theta),
            norm_eps=c.get("rms_norm_eps", 1e-6), name=c.get("_name_or_path", "") or "llama",
        )
    raise ConfigError(f"HF model_type {kind!r} is not supported; the workbench reads 'gpt2' and 'llama' models")


# Tensors that map one to one, per layer: (HF name, workbench name, transposed). Both directions of
# the conversion read these, so a name is written once; the per-head reshapes are spelled out below.
_GPT2_PAIRS = (
    ("attn.c_proj.bias", "attn.b_O", False), ("mlp.c_fc.weight", "mlp.W_in", False),
    ("mlp.c_fc.bias", "mlp.b_in", False), ("mlp.c_proj.weight", "mlp.W_out", False),
    ("mlp.c_proj.bias", "mlp.b_out", False), ("ln_1.weight", "ln1.w", False), ("ln_1.bias", "ln1.b", False),
    ("ln_2.weight", "ln2.w", False), ("ln_2.bias", "ln2.b", False),
)
_LLAMA_PAIRS = (
    ("mlp.gate_proj.weight", "mlp.W_gate", True), ("mlp.up_proj.weight", "mlp.W_in", True),
    ("mlp.down_proj.weight", "mlp.W_out", True), ("input_layernorm.weight", "ln1.w", False),
    ("post_attention_layernorm.weight", "ln2.w", False),
)
_LLAMA_BIAS_PAIRS = (
    ("self_attn.o_proj.bias", "attn.b_O", False), ("mlp.gate_proj.bias", "mlp.b_gate", False),
    ("mlp.up_proj.bias", "mlp.b_in", False), ("mlp.down_proj.bias", "mlp.b_out", False),
)


def _pairs_to_workbench(pairs, sd: Mapping[str, Tensor], h: str, b: str, out: dict[str, Tensor]) -> None:
    for hf_name, wb_name, transposed in pairs:
        out[b + wb_name] = sd[h + hf_name].T if transposed else sd[h + hf_name]


def _pairs_to_hf(pairs, sd: Mapping[str, Tensor], h: str, b: str, out: dict[str, Tensor]) -> None:
    for hf_name, wb_name, transposed in pairs:
        out[h + hf_name] = sd[b + wb_name].T if transposed else sd[b + wb_name]


def _gpt2_to_workbench(cfg: GPTConfig, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    p = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    out = {"embed.W_E": sd[f"{p}wte.weight"], "pos_embed.W_pos": sd[f"{p}wpe.weight"],
           "ln_final.w": sd[f"{p}ln_f.weight"], "ln_final.b": sd[f"{p}ln_f.bias"]}
    for i in range(cfg.n_layers):
        h, b = f"{p}h.{i}.", f"blocks.{i}."
        # Conv1D weights are [in, out]; c_attn's out axis is q, k, v each [head d_head]
        W_q, W_k, W_v = sd[h + "attn.c_attn.weight"].split(d, dim=1)
        b_q, b_k, b_v = sd[h + "attn.c_attn.bias"].split(d)
        for name, W, bias in (("Q", W_q, b_q), ("K", W_k, b_k), ("V", W_v, b_v)):
            out[b + f"attn.W_{name}"] = W.reshape(d, H, dh).permute(1, 0, 2)
            out[b + f"attn.b_{name}"] = bias.reshape(H, dh)
        out[b + "attn.W_O"] = sd[h + "attn.c_proj.weight"].reshape(H, dh, d)
        _pairs_to_workbench(_GPT2_PAIRS, sd, h, b, out)
    if not cfg.tie_embeddings:
        out["unembed.W_U"] = sd["lm_head.weight"].T
    return out


def _llama_to_workbench(cfg: GPTConfig, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    H, K, dh, d = cfg.n_heads, cfg.n_kv, cfg.d_head, cfg.d_model
    p = "model." if any(k.startswith("model.") for k in sd) else ""
    out = {"embed.W_E": sd[f"{p}embed_tokens.weight"], "ln_final.w": sd[f"{p}norm.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"{p}layers.{i}.", f"blocks.{i}."
        for name, proj, n in (("Q", "q_proj", H), ("K", "k_proj", K), ("V", "v_proj", K)):
            # nn.Linear weights are [out, in] = [head*d_head, d_model]
            out[b + f"attn.W_{name}"] = sd[h + f"self_attn.{proj}.weight"].reshape(n, dh, d).transpose(1, 2)
            if cfg.use_bias:
                out[b + f"attn.b_{name}"] = sd[h + f"self_attn.{proj}.bias"].reshape(n, dh)
        out[b + "attn.W_O"] = sd[h + "self_attn.o_proj.weight"].reshape(d, H, dh).permute(1, 2, 0)
        _pairs_to_workbench(_LLAMA_PAIRS + (_LLAMA_BIAS_PAIRS if cfg.use_bias else ()), sd, h, b, out)
    if not cfg.tie_embeddings:
        out["unembed.W_U"] = sd["lm_head.weight"].T
    return out


def from_hf_state_dict(hf_config, state_dict: Mapping[str, Tensor], tokenizer: Tokenizer | None = None) -> HookedGPT:
    """Return a HookedGPT holding an HF GPT-2 or Llama state dict (HF parameter names)."""
    cfg = config_from_hf(hf_config)
    family = "gpt2" if cfg.positional == "learned" else "llama"
    convert = _gpt2_to_workbench if family == "gpt2" else _llama_to_workbench
    reads: set[str] = set()
    try:
        weights = convert(cfg, _ReadRecorder(state_dict, reads))
    except KeyError as exc:
        raise CheckpointError(f"HF {family} checkpoint lacks tensor {exc.args[0]!r}; is the file complete?") from None
    except (RuntimeError, ValueError, IndexError) as exc:  # a reshape to the config's head layout failed
        raise CheckpointError(
            f"HF {family} checkpoint does not fit its config ({str(exc).splitlines()[0][:200]}); "
            "check that config.json and the weights come from the same model"
        ) from None
    if cfg.tie_embeddings:
        reads.add("lm_head.weight")  # HF keeps the tied copy under this name too
    model = model_for_weights(cfg, weights, tokenizer, source=f"HF {family} checkpoint")
    known = {k for k in state_dict if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    if known - reads:
        raise CheckpointError(f"HF checkpoint has tensors this config does not use: {sorted(known - reads)[:8]}")
    load_weights(model, {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
                         for k, v in weights.items()}, source=f"HF {family} state dict")
    return model


class _ReadRecorder(dict):
    """A read-only view of a state dict that notes every key a converter reads."""

    def __init__(self, sd: Mapping[str, Tensor], reads: set[str]):
        super().__init__()
        self._sd, self._reads = sd, reads

    def __getitem__(self, key):
        self._reads.add(key)
        return self._sd[key]

    def __iter__(self):
        return iter(self._sd)

    def __contains__(self, key):
        return key in self._sd


def from_hf(model_or_path, tokenizer=None, local_files_only: bool = False) -> HookedGPT:
    """Return a HookedGPT from an HF model object, a local HF directory, or a hub id.

    ``tokenizer`` may be an HF fast tokenizer or a workbench Tokenizer; from a directory the
    tokenizer there (tokenizer.json) is used.
    """
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_hf(tokenizer)
    if hasattr(model_or_path, "state_dict") and hasattr(model_or_path, "config"):
        return from_hf_state_dict(model_or_path.config, model_or_path.state_dict(), tokenizer)
    path = Path(model_or_path)
    if not path.is_dir():
        path = _snapshot(str(model_or_path), local_files_only)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json; an HF model directory holds config.json and *.safetensors")
    hf_config = _read_json_object(config_path)
    state = read_hf_weights(path)
    if tokenizer is None and (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(path)
    return from_hf_state_dict(hf_config, state, tokenizer)


def _read_json_object(path: Path) -> dict:
    """Return the JSON object in ``path``, or raise CheckpointError saying what is wrong with the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc}); restore the model's config.json") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(value).__name__}, not an object of config fields; "
            "restore the model's config.json"
        )
    return value


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """Return the tensors of an HF directory: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    single = directory / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(directory / shard))
        return state
    bin_path = directory / "pytorch_model.bin"
    if bin_path.is_file():
        try:  # weights_only: tensors and plain containers, never arbitrary objects
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
            raise CheckpointError(
                f"{bin_path} could not be read as weights ({exc}); convert it to safetensors"
            ) from None
    raise CheckpointError(f"{directory} has no model.safetensors, sharded safetensors index or pytorch_model.bin")


def _snapshot(repo_id: str, local_files_only: bool) -> Path:
    """Return a local directory for an HF hub id (the local HF cache first, the network second)."""
    try:
        from huggingface_hub import snapshot_download  # optional: only hub ids need it
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and huggingface_hub is not installed to fetch it"
        ) from None
    patterns = [
        "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"
    ]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache: try the network below
        if local_files_only:
            raise _no_network(repo_id) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo...
        raise _no_network(repo_id, exc) from None


def _no_network(repo_id: str, exc: Exception | None = None) -> CheckpointError:
    why = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if exc else ""
    return CheckpointError(
        f"could not get {repo_id!r} from the HF hub{why}. On a machine with network, download its "
        "config.json, model.safetensors and tokenizer.json (e.g. `huggingface-cli download "
        f"{repo_id}`), copy the directory here, and pass its path instead of the hub id"
    )


def to_hf(model: HookedGPT):
    """Return an HF ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` with the same weights."""
    import transformers  # optional dependency (test extra)

    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    # The model's own special tokens, not the HF classes' defaults (GPT-2's 50256 lies outside a
    # smaller vocabulary); None when the model has no tokenizer or the token.
    tok = model.tokenizer
    special = {"bos_token_id": tok.bos_token_id if tok else None, "eos_token_id": tok.eos_token_id if tok else None,
               "pad_token_id": None}
    if cfg.positional == "learned" and cfg.normalization == "layernorm" and not cfg.gated_mlp and cfg.use_bias \
            and not cfg.attn_only and not cfg.unembed_bias and cfg.n_kv == cfg.n_heads \
            and cfg.d_head * cfg.n_heads == cfg.d_model:
        hf_cfg = transformers.GPT2Config(
            n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
            vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, layer_norm_epsilon=cfg.norm_eps,
            activation_function=cfg.act_fn, tie_word_embeddings=cfg.tie_embeddings, **special,
        )
        hf = transformers.GPT2LMHeadModel(hf_cfg)
        out = _workbench_to_gpt2(cfg, sd)
    elif cfg.positional == "rotary" and cfg.normalization == "rmsnorm" and cfg.gated_mlp and not cfg.attn_only \
            and not cfg.unembed_bias:
        hf_cfg = transformers.LlamaConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv, head_dim=cfg.d_head, intermediate_size=cfg.d_mlp,
            vocab_size=cfg.d_vocab, max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.norm_eps,
            hidden_act=cfg.act_fn, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.use_bias,
            mlp_bias=cfg.use_bias, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **special,
        )
        hf = transformers.LlamaForCausalLM(hf_cfg)
        out = _workbench_to_llama(cfg, sd)
    else:
        raise ConfigError(
            "to_hf() needs a GPT-2 shaped config (learned positions, LayerNorm, biases, plain MLP) or a Llama "
            "shaped one (rotary, RMSNorm, gated MLP); this model mixes the two families"
        )
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"to_hf mapping incomplete: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def hf_tokenizer(tokenizer: Tokenizer):
    """Return a ``transformers`` fast tokenizer over the same vocabulary and special tokens."""
    import transformers  # optional dependency (test extra)

    def token(i: int | None) -> str | None:
        return None if i is None else tokenizer.tok.id_to_token(i)

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.tok, bos_token=token(tokenizer.bos_token_id),
        eos_token=token(tokenizer.eos_token_id))
    # transformers' fast tokenizers prepend nothing unless their post-processor says so; record the
    # workbench's BOS convention in tokenizer_config.json (interop.from_transformer_lens reads it back)
    hf.init_kwargs["add_bos_token"] = tokenizer.add_bos
    return hf


def export_hf(model: HookedGPT, directory: str | os.PathLike) -> Path:
    """Write ``model`` as an HF model directory (``config.json``, ``model.safetensors``) with its tokenizer.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` and ``AutoTokenizer`` read it
    offline, and so does :func:`from_hf`, which gives back the same weights and special tokens."""
    directory = Path(directory)
    hf = to_hf(model)
    try:
        hf.save_pretrained(directory)
        if model.tokenizer is not None:
            hf_tokenizer(model.tokenizer).save_pretrained(directory)
            model.tokenizer.save(directory)  # tokenizer_meta.json: BOS convention for the workbench's reader
    except OSError as exc:
        raise CheckpointError(f"cannot write the HF export to {directory}: {exc.strerror or exc}; "
                              "choose a writable directory with free space") from exc
    return directory


def _workbench_to_gpt2(cfg: GPTConfig, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    d = cfg.d_model
    out = {"transformer.wte.weight": sd["embed.W_E"], "transformer.wpe.weight": sd["pos_embed.W_pos"],
           "transformer.ln_f.weight": sd["ln_final.w"], "transformer.ln_f.bias": sd["ln_final.b"]}
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        out[h + "attn.c_attn.weight"] = torch.cat(
            [sd[b + f"attn.W_{n}"].permute(1, 0, 2).reshape(d, -1) for n in "QKV"], dim=1)
        out[h + "attn.c_attn.bias"] = torch.cat([sd[b + f"attn.b_{n}"].reshape(-1) for n in "QKV"])
        out[h + "attn.c_proj.weight"] = sd[b + "attn.W_O"].reshape(-1, d)
        _pairs_to_hf(_GPT2_PAIRS, sd, h, b, out)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["unembed.W_U"].T
    return {k: v.contiguous() for k, v in out.items()}


def _workbench_to_llama(cfg: GPTConfig, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    d = cfg.d_model
    out = {"model.embed_tokens.weight": sd["embed.W_E"], "model.norm.weight": sd["ln_final.w"]}
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        for n, proj in (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj")):
            out[h + f"self_attn.{proj}.weight"] = sd[b + f"attn.W_{n}"].transpose(1, 2).reshape(-1, d)
            if cfg.use_bias:
                out[h + f"self_attn.{proj}.bias"] = sd[b + f"attn.b_{n}"].reshape(-1)
        out[h + "self_attn.o_proj.weight"] = sd[b + "attn.W_O"].permute(2, 0, 1).reshape(d, -1)
        _pairs_to_hf(_LLAMA_PAIRS + (_LLAMA_BIAS_PAIRS if cfg.use_bias else ()), sd, h, b, out)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["unembed.W_U"].T
    return {k: v.contiguous() for k, v in out.items()}
