"""Tokenizers: one thin wrapper over the HF ``tokenizers`` library that every model carries.

BOS handling: ``Tokenizer.add_bos`` says whether ``encode`` puts the BOS token in front by default
(``model.to_tokens(text)`` follows it; pass ``prepend_bos=`` to override). SmolLM2 was trained
without a BOS token in front of plain text, so its tokenizer has ``add_bos=False``; the built-in
models trained here use a BOS token as a stable first position (an attention sink) and set it True.

Padding (``model.to_batch(texts)``): ``pad_token_id`` when the tokenizer names one; otherwise
:meth:`Tokenizer.padding_id` stands in EOS (or BOS) and says so once. The choice never changes a
result: padded positions are masked out of attention, positions and means.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from workbench.errors import CheckpointError, InputError

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


@dataclass
class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token facts a model needs."""

    tok: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False
    #: the token padded batches are filled with (None: see :meth:`padding_id`)
    pad_token_id: int | None = None

    def padding_id(self) -> int:
        """Return the id that pads batches: the pad token, else EOS, else BOS (saying which is used)."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        for name, i in (("EOS", self.eos_token_id), ("BOS", self.bos_token_id)):
            if i is not None:
                warnings.warn(
                    f"this tokenizer has no pad token; padding with its {name} token {self.tok.id_to_token(i)!r} "
                    f"(id {i}), which is masked out, so results do not depend on it "
                    "(set tokenizer.pad_token_id to choose another)",
                    stacklevel=3,
                )
                return i
        raise InputError(
            "this tokenizer has no pad, EOS or BOS token to pad batches with; set model.tokenizer.pad_token_id "
            "to any token id (padded positions are masked out, so which one does not matter)"
        )

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Return the token ids of ``text`` (BOS in front when ``add_bos``, default ``self.add_bos``)."""
        if not isinstance(text, str):
            raise InputError(f"expected a string to tokenize, got {type(text).__name__}")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        use_bos = self.add_bos if add_bos is None else add_bos
        if use_bos:
            if self.bos_token_id is None:
                raise InputError("this tokenizer has no BOS token; call with add_bos=False")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Return the text of ``ids`` (special tokens kept, so nothing is silently dropped)."""
        return self.tok.decode(self._checked(ids), skip_special_tokens=False)

    def str_tokens(self, ids: list[int]) -> list[str]:
        """Return each token decoded on its own (so the pieces concatenate to the text)."""
        return [self.tok.decode([i], skip_special_tokens=False) for i in self._checked(ids)]

    def _checked(self, ids) -> list[int]:
        """Return ``ids`` as ints after checking each names a token (the library decodes an unknown id to '')."""
        ids = [int(i) for i in ids]
        n = self.tok.get_vocab_size(with_added_tokens=True)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InputError(
                f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {n}); pass ids from 0 to {n - 1}"
            )
        return ids

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / TOKENIZER_FILE))
        meta = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "add_bos": self.add_bos}
        if self.pad_token_id is not None:
            meta["pad_token_id"] = self.pad_token_id
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a tokenizer saved by :meth:`save`, or an HF directory's ``tokenizer.json``."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"no {TOKENIZER_FILE} in {directory}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises bare Exceptions
            raise CheckpointError(f"{path} is not a valid tokenizer file ({exc}); delete it and re-create it") from exc
        meta_path = directory / META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return cls(tok, meta.get("bos_token_id"), meta.get("eos_token_id"), bool(meta.get("add_bos", False)),
                       meta.get("pad_token_id"))
        return cls(tok, *_special_ids_from_hf_config(directory, tok))

    @classmethod
    def from_hf(cls, hf_tokenizer) -> Tokenizer:
        """Wrap a ``transformers`` fast tokenizer (its backend is a ``tokenizers.Tokenizer``)."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InputError("only fast (Rust-backed) HF tokenizers can be wrapped; load it with use_fast=True")
        tok = tokenizers.Tokenizer.from_str(backend.to_str())
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, False, hf_tokenizer.pad_token_id)


def _special_ids_from_hf_config(directory: Path, tok: tokenizers.Tokenizer
                                ) -> tuple[int | None, int | None, bool, int | None]:
    """Read BOS/EOS/pad from an HF ``tokenizer_config.json`` when present (no BOS prepended by default)."""
    cfg_path = directory / "tokenizer_config.json"
    bos = eos = pad = None
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())

        def token_id(entry):
            if isinstance(entry, dict):
                entry = entry.get("content")
            return tok.token_to_id(entry) if isinstance(entry, str) else None

        bos, eos, pad = token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token")), token_id(cfg.get("pad_token"))
    return bos, eos, False, pad
