"""Llama-architecture GGUF files -> an HF-named Llama state dict, an HF ``LlamaConfig`` and a tokenizer.

The ``gguf`` package parses the container and dequantizes the blocks (Q4_1, Q8_0, ...); what a
GGUF *means* is done here:

- names: llama.cpp's ``blk.{L}.attn_q.weight`` -> HF's ``model.layers.{L}.self_attn.q_proj.weight``
  (the one place that maps HF names to the workbench's is ``workbench.loading.from_hf_state_dict``);
- shapes: GGUF lists dimensions fastest-first (``ne[0]`` is the row length), so they are reversed;
- RoPE: llama.cpp's converter permutes the rows of ``W_Q``/``W_K`` from HF's "rotate halves" layout to
  GPT-J's "rotate interleaved pairs" layout; :func:`unpermute_qk` undoes it;
- the tokenizer: rebuilt from ``tokenizer.ggml.*`` metadata with the HF ``tokenizers`` library.

    ckpt = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model = workbench.loading.from_hf_state_dict(ckpt.hf_config, ckpt.state_dict)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from workbench.errors import CheckpointError
from workbench.tokenize import Tokenizer

GGUF_MAGIC = b"GGUF"
#: ``general.architecture`` values this reader maps (Mistral files also say "llama").
SUPPORTED_ARCHITECTURES = ("llama",)

#: llama.cpp per-block tensor name -> HF Llama name (``{L}`` is the layer index).
_BLOCK_NAMES = {
    "attn_norm.weight": "model.layers.{L}.input_layernorm.weight",
    "attn_q.weight": "model.layers.{L}.self_attn.q_proj.weight",
    "attn_k.weight": "model.layers.{L}.self_attn.k_proj.weight",
    "attn_v.weight": "model.layers.{L}.self_attn.v_proj.weight",
    "attn_output.weight": "model.layers.{L}.self_attn.o_proj.weight",
    "ffn_norm.weight": "model.layers.{L}.post_attention_layernorm.weight",
    "ffn_gate.weight": "model.layers.{L}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{L}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{L}.mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: Tensors llama.cpp writes that carry no weights (precomputed RoPE tables).
_IGNORED = ("rope_freqs.weight",)


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the file lists it."""

    name: str
    #: Shape in PyTorch order (slowest axis first), i.e. GGUF's ``ne`` reversed.
    shape: tuple[int, ...]
    #: The ggml type name: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_1`` ...
    qtype: str


class GGUFCheckpoint(NamedTuple):
    """What a llama GGUF file holds, in HF's terms."""

    #: A ``transformers.LlamaConfig`` built from the ``llama.*`` metadata.
    hf_config: Any
    #: HF Llama parameter names -> dequantized float32 tensors (``lm_head.weight`` absent when tied).
    state_dict: dict[str, torch.Tensor]
    #: The tokenizer rebuilt from ``tokenizer.ggml.*``.
    tokenizer: Tokenizer
    #: Every scalar/string metadata field (token lists and merges left out: they are large).
    metadata: dict[str, Any]


# --------------------------------------------------------------------------------------------- reading


def _open(path: str | os.PathLike):
    """Return a ``gguf.GGUFReader`` over ``path``, or a CheckpointError saying what is wrong with it."""
    import gguf  # ~60 ms to import, paid only when a GGUF file is read

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r}); "
            "give the path of a .gguf file, or re-download it if it should be one"
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError/IndexError/struct errors alike
        raise CheckpointError(
            f"{path} is a truncated or corrupt GGUF file ({type(exc).__name__}: {exc}); delete it and fetch it again"
        ) from exc
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name!r} needs bytes up to {end:,} but the file has {size:,}; "
                "delete it and fetch it again"
            )
    return reader


def read_metadata(path: str | os.PathLike, reader=None) -> dict[str, Any]:
    """Return the file's metadata fields (token arrays and merges left out) without reading tensors."""
    reader = reader if reader is not None else _open(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue
        try:
            meta[key] = field.contents()
        except Exception as exc:  # a field the gguf package cannot decode: a corrupt header
            raise CheckpointError(
                f"{path}: metadata field {key!r} cannot be read ({exc}); the file is corrupt"
            ) from exc
    return meta


def list_tensors(path: str | os.PathLike, reader=None) -> list[GGUFTensorInfo]:
    """Return name, PyTorch-order shape and ggml type of every tensor in the file."""
    reader = reader if reader is not None else _open(path)
    return [
        GGUFTensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
        for t in reader.tensors
    ]


def _require(meta: dict[str, Any], key: str, path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing; this GGUF cannot be mapped to a Llama model")
    return meta[key]


def check_architecture(meta: dict[str, Any], path) -> str:
    """Return ``general.architecture`` if this reader supports it; otherwise raise naming what is supported."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; this reader handles {list(SUPPORTED_ARCHITECTURES)} "
            "(Llama-family files such as SmolLM2, TinyLlama, Llama 2/3). "
            "Convert other models from their HF directory instead"
        )
    return arch


def hf_config_from_metadata(meta: dict[str, Any], tensors: list[GGUFTensorInfo], path="GGUF"):
    """Return the ``transformers.LlamaConfig`` that the ``llama.*`` metadata describes."""
    from transformers import LlamaConfig  # optional dependency (test extra)

    check_architecture(meta, path)
    a = "llama"

    def number(key: str, default: Any = None, kind: type = int) -> Any:
        value = _require(meta, key, path) if default is None else meta.get(key, default)
        try:
            if isinstance(value, bool) or (kind is int and float(value) != int(value)):
                raise ValueError
            value = kind(value)
        except (TypeError, ValueError, OverflowError):
            what = "an integer" if kind is int else "a number"
            raise CheckpointError(
                f"{path}: metadata {key}={value!r} is not {what}; the file is corrupt or not a llama.cpp export"
            ) from None
        return value

    n_heads = number(f"{a}.attention.head_count")
    d_model = number(f"{a}.embedding_length")
    names = {t.name: t for t in tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: no token_embd.weight tensor; the file is not a complete Llama checkpoint")
    if n_heads < 1:
        raise CheckpointError(f"{path}: metadata {a}.attention.head_count={n_heads}; a model needs at least one head")
    vocab = number(f"{a}.vocab_size", names["token_embd.weight"].shape[0])
    head_dim = number(f"{a}.attention.key_length", d_model // n_heads)
    rope_dims = number(f"{a}.rope.dimension_count", head_dim)
    if meta.get(f"{a}.rope.scaling.type", "none") not in ("none", None):
        raise CheckpointError(f"{path}: RoPE scaling {meta[f'{a}.rope.scaling.type']!r} is not supported")
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=number(f"{a}.feed_forward_length"),
        num_hidden_layers=number(f"{a}.block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=number(f"{a}.attention.head_count_kv", n_heads),
        head_dim=head_dim,
        max_position_embeddings=number(f"{a}.context_length", 2048),
        rms_norm_eps=number(f"{a}.attention.layer_norm_rms_epsilon", 1e-5, float),
        rope_theta=number(f"{a}.rope.freq_base", 10000.0, float),
        tie_word_embeddings="output.weight" not in names,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    _check_sizes(kwargs, names, path)
    if rope_dims != head_dim:
        raise CheckpointError(
            f"{path}: partial rotary embeddings (rope.dimension_count={rope_dims}, head dim {head_dim}) "
            "are not supported"
        )
    config = LlamaConfig(**kwargs)
    # transformers 5 moved rope_theta into rope_parameters; set both spellings so either version reads it.
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": kwargs["rope_theta"]}
    config.rope_theta = kwargs["rope_theta"]
    return config


def _check_sizes(c: dict[str, Any], tensors: dict[str, GGUFTensorInfo], path) -> None:
    """Raise CheckpointError unless the metadata's sizes agree with the tensors the file holds.

    Runs before anything is dequantized or allocated: a header claiming 1e9 blocks or a zero head
    count is refused here, in one line, instead of exhausting memory or dividing by zero later."""
    a = "llama"
    blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if c["num_hidden_layers"] < 1 or len(blocks) != c["num_hidden_layers"] or max(blocks) != len(blocks) - 1:
        raise CheckpointError(
            f"{path}: metadata {a}.block_count={c['num_hidden_layers']} but the file holds tensors of "
            f"{len(blocks)} blocks; the header and the tensors disagree, so the file is corrupt"
        )
    positive = {"attention.head_count_kv": c["num_key_value_heads"], "attention.key_length": c["head_dim"],
                "feed_forward_length": c["intermediate_size"], "context_length": c["max_position_embeddings"],
                "embedding_length": c["hidden_size"], "vocab_size": c["vocab_size"]}
    for key, value in positive.items():
        if value < 1:
            raise CheckpointError(f"{path}: metadata {a}.{key}={value} must be at least 1; the file is corrupt")
    for key, value in (("attention.layer_norm_rms_epsilon", c["rms_norm_eps"]), ("rope.freq_base", c["rope_theta"])):
        if not (math.isfinite(value) and value > 0):
            raise CheckpointError(
                f"{path}: metadata {a}.{key}={value} must be a positive finite number; the file is corrupt"
            )
    if c["num_attention_heads"] % c["num_key_value_heads"]:
        raise CheckpointError(
            f"{path}: metadata {a}.attention.head_count={c['num_attention_heads']} is not a multiple of "
            f"head_count_kv={c['num_key_value_heads']}; the file is corrupt"
        )
    d, h, kv, dh, ff = (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                        c["intermediate_size"])
    want = {"token_embd.weight": (c["vocab_size"], d), "output_norm.weight": (d,)}
    for layer in sorted(blocks):
        want.update({
            f"blk.{layer}.attn_q.weight": (h * dh, d), f"blk.{layer}.attn_k.weight": (kv * dh, d),
            f"blk.{layer}.attn_v.weight": (kv * dh, d), f"blk.{layer}.attn_output.weight": (d, h * dh),
            f"blk.{layer}.ffn_gate.weight": (ff, d), f"blk.{layer}.ffn_up.weight": (ff, d),
            f"blk.{layer}.ffn_down.weight": (d, ff), f"blk.{layer}.attn_norm.weight": (d,),
            f"blk.{layer}.ffn_norm.weight": (d,),
        })
    if "output.weight" in tensors:
        want["output.weight"] = (c["vocab_size"], d)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors are missing (first: {missing[:3]}); the file is incomplete"
        )
    wrong = [
        f"{n} {tensors[n].shape} (metadata implies {shape})" for n, shape in want.items() if tensors[n].shape != shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: tensor shapes disagree with the metadata: {'; '.join(wrong[:3])}"
            f"{' ...' if len(wrong) > 3 else ''}; the file is corrupt or not a llama.cpp export"
        )


# ------------------------------------------------------------------------------------------- tensors


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row permutation of a Q or K projection ``[n_heads * d_head, d_model]``.

    llama.cpp rotates interleaved pairs (GPT-J style) while HF Llama rotates the two halves of each
    head, so its converter reorders every head's rows from ``(2, d_head/2)`` to ``(d_head/2, 2)``.
    For K, ``n_heads`` is the number of KV heads.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"Q/K weight with {rows} rows cannot be split into {n_heads} heads of pairs")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (the inverse of :func:`unpermute_qk`); used to write test files."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str | None:
    """Return the HF Llama name of a llama.cpp tensor name (None for tensors that carry no weights)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return _BLOCK_NAMES[parts[2]].format(L=int(parts[1]))
    raise CheckpointError(
        f"GGUF tensor {gguf_name!r} has no Llama counterpart; expected names like 'blk.0.attn_q.weight' "
        f"({', '.join(sorted(_BLOCK_NAMES))}) or {sorted(_GLOBAL_NAMES)}"
    )


def _dequantize(t) -> np.ndarray:
    """Return tensor ``t`` as float32 numpy in PyTorch axis order."""
    import gguf  # ~60 ms to import, paid only when a GGUF file is read

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    if qtype == gguf.GGMLQuantizationType.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif qtype == gguf.GGMLQuantizationType.F16:
        arr = np.asarray(t.data).astype(np.float32)
    else:
        try:
            arr = gguf.dequantize(t.data, qtype)
        except NotImplementedError as exc:
            raise CheckpointError(
                f"tensor {t.name!r} uses ggml type {qtype.name}, which gguf cannot dequantize"
            ) from exc
    arr = arr.reshape(shape).astype(np.float32, copy=False)
    # F32 tensors come back as read-only views of the memory-mapped file; torch wants its own memory
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, dtype=np.float32, order="C")


def read_state_dict(
    path: str | os.PathLike,
    reader=None,
    hf_config=None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Return the file's tensors dequantized to float32 under HF Llama names (Q/K rows un-permuted)."""
    reader = reader if reader is not None else _open(path)
    if hf_config is None:
        hf_config = hf_config_from_metadata(read_metadata(path, reader), list_tensors(path, reader), path)
    state: dict[str, torch.Tensor] = {}
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        name = hf_name(t.name)
        if progress is not None:
            progress(i, n, t.name)
        if name is None:
            continue
        w = torch.from_numpy(_dequantize(t))
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, hf_config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, hf_config.num_key_value_heads)
        state[name] = w.contiguous()
    if progress is not None:
        progress(n, n, "")
    _check_complete(state, hf_config, path)
    return state


def _check_complete(state: dict[str, torch.Tensor], cfg, path) -> None:
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for layer in range(cfg.num_hidden_layers):
        expected |= {n.format(L=layer) for n in _BLOCK_NAMES.values()}
    if not cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors are missing (first: {missing[:3]}); the file is incomplete"
        )
    emb = state["model.embed_tokens.weight"]
    if tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(
            f"{path}: token_embd has shape {tuple(emb.shape)}, metadata says ({cfg.vocab_size}, {cfg.hidden_size})"
        )


# ----------------------------------------------------------------------------------------- tokenizer

#: llama.cpp ``tokenizer.ggml.pre`` -> the pre-tokenizer split regex of the original HF tokenizer.
#: "smollm" (SmolLM/SmolLM2, StarCoder) splits every digit on its own before GPT-2's byte-level regex.
_DIGIT_SPLITTERS = ("smollm", "starcoder", "refact", "codeshell")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_LIKE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _string_array(reader, key: str) -> list[str] | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _int_array(reader, key: str) -> list[int] | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return [int(field.parts[i][0]) for i in field.data]


def read_tokenizer(path: str | os.PathLike, reader=None) -> Tokenizer:
    """Return the byte-level BPE tokenizer described by ``tokenizer.ggml.*`` (BOS as the file says).

    Only ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, used by SmolLM2, Llama 3, Qwen ...) is
    rebuilt; sentencepiece vocabularies ("llama") are refused with a clear error.
    """

    reader = reader if reader is not None else _open(path)
    meta = read_metadata(path, reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') vocabularies can be rebuilt. "
            "Load the model from its HF directory (with tokenizer.json) instead"
        )
    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    merges = _string_array(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens/merges are missing; the tokenizer cannot be rebuilt")
    types = _int_array(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    except Exception as exc:  # tokenizers raises a bare Exception for a merge of tokens not in the vocabulary
        raise CheckpointError(
            f"{path}: the tokenizer's merges and tokens disagree ({exc}); the file is corrupt"
        ) from None
    tok = HFTokenizer(bpe)
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    if pre in _DIGIT_SPLITTERS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3_LIKE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # "default"/"gpt2": GPT-2's own regex inside ByteLevel
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) must match whole in text, never be cut into byte pieces.
    special = [
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(
            f"{path}: rebuilt tokenizer has {tok.get_vocab_size()} tokens, the file lists {len(tokens)}"
        )
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    return Tokenizer(tok, None if bos is None else int(bos), None if eos is None else int(eos), add_bos)


# --------------------------------------------------------------------------------------------- all


def read_gguf(
    path: str | os.PathLike, progress: Callable[[int, int, str], None] | None = None
) -> GGUFCheckpoint:
    """Return config, dequantized HF-named state dict, tokenizer and metadata of a llama GGUF file."""
    reader = _open(path)
    meta = read_metadata(path, reader)
    check_architecture(meta, path)
    tensors = list_tensors(path, reader)
    hf_config = hf_config_from_metadata(meta, tensors, path)
    tokenizer = read_tokenizer(path, reader)
    state = read_state_dict(path, reader, hf_config, progress)
    return GGUFCheckpoint(hf_config, state, tokenizer, meta)
