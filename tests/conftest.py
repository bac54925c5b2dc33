"""Shared fixtures. Expensive things (a loaded SmolLM2, trained toy models) are session-scoped.

Feature areas may add their own fixtures below; keep each one cheap or session-scoped.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A local directory holding a 100-token word-level tokenizer that HF's from_pretrained accepts."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("hf_tok")
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(100)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(d / "tokenizer.json"))
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), bos_token="t1", eos_token="t2", pad_token="t3"
    ).save_pretrained(d)
    return d
