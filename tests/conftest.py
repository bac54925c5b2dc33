"""Shared fixtures. Expensive things (a loaded SmolLM2, trained toy models) are session-scoped.

Feature areas may add their own fixtures below; keep each one cheap or session-scoped.
"""

from __future__ import annotations

import os

import pytest
import shape_checks
import torch

# before any test module imports workbench: check every annotation in workbench/ at run time
shape_checks.install()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core machine: each worker, and every process a test
    # starts (the CLI, torchrun, the app's server), computes on one thread. Two 2-thread workers would
    # oversubscribe the cores, and then every parallel region of an op waits for a descheduled thread.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


#: test files that take minutes, in the order they start: `make test` runs one file per xdist worker at a time
#: (--dist loadfile --no-loadscope-reorder), so the longest must not be the last to start (the browser tests
#: started 6 minutes in and then ran alone for 9). Every other file keeps its place after these.
SLOW_FILES_FIRST = ("test_app_browser.py", "test_readme.py", "test_app_teaching_browser.py", "test_graph.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: with several agents sharing two cores, every parallel
    region of a tiny op waits for a descheduled thread (a 300-step toy SAE run went from 3 s to 28 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# -- activation store / SAE evaluation (tests/test_store.py, tests/test_sae_evaluate.py, tests/test_sae_features.py)

from typing import NamedTuple  # noqa: E402


class BigramLM(NamedTuple):
    model: object
    windows: torch.Tensor


@pytest.fixture(scope="session")
def bigram_lm() -> BigramLM:
    """A 1-layer d_model-32 model trained (~1 s) on a random bigram language: each token has two
    equally likely successors, so the best loss is log 2 and zero-ablating the residual stream
    costs several nats, which makes "CE loss recovered" a sharp test. Gives 512 windows of 16."""
    import torch.nn.functional as F

    from workbench.model import GPTConfig, HookedGPT

    vocab, n_ctx, n = 64, 16, 512
    gen = torch.Generator().manual_seed(0)
    successors = torch.randint(0, vocab, (vocab, 2), generator=gen)
    windows = torch.empty(n, n_ctx, dtype=torch.long)
    windows[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for p in range(1, n_ctx):
        windows[:, p] = successors[windows[:, p - 1], torch.randint(0, 2, (n,), generator=gen)]
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=32, n_layers=1, n_heads=4, d_head=8, d_mlp=64, d_vocab=vocab, n_ctx=n_ctx)
    model = HookedGPT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CI machine
    try:
        for step in range(80):
            x = windows[(step * 32) % n :][:32]
            loss = F.cross_entropy(model(x)[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return BigramLM(model.eval().requires_grad_(False), windows)


# --- the app's tests (issue 7) ----------------------------------------------------------------


@pytest.fixture(scope="session")
def app_home(tmp_path_factory):
    """A workbench home whose model directory holds ``tiny-lm``: a random 2-layer GPT with a small BPE
    tokenizer (the app's pages run on it in a second or two)."""
    from helpers import tiny_cfg

    from workbench import HookedGPT
    from workbench.corpora import train_bpe

    home = tmp_path_factory.mktemp("wb_home")
    text = ("When Mary and John went to the store, John gave a drink to Mary. The cat sat on the mat. "
            "The capital of France is Paris. One two three four five six seven eight nine ten. ") * 4
    tok = train_bpe(text.split(". "), vocab_size=320)
    cfg = tiny_cfg(d_vocab=tok.vocab_size, n_ctx=64, name="tiny-lm")
    torch.manual_seed(0)
    HookedGPT(cfg, tokenizer=tok).save(home / "models" / "tiny-lm")
    return home


# --- SmolLM2 (workbench.zoo) ------------------------------------------------------------------


def _smollm2_missing_reason():
    from workbench import zoo

    if zoo.cache_status(zoo.SMOLLM2.name).state == "ready" or zoo.source_path(zoo.SMOLLM2).is_file():
        return None
    return (f"SmolLM2 is not fetched (looked in {zoo.cache_dir(zoo.SMOLLM2.name)} and "
            f"{zoo.source_path(zoo.SMOLLM2)}); run `workbench fetch smollm2-135m` (`make test` does)")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a HookedGPT, via load_model (skips if the checkpoint is not fetched)."""
    reason = _smollm2_missing_reason()
    if reason:
        pytest.skip(reason)
    from workbench import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the verified SmolLM2 GGUF file (the oracle input for HF's GGUF loader)."""
    from workbench import zoo

    path = zoo.source_path(zoo.SMOLLM2)
    if not path.is_file():
        pytest.skip(f"{path} is missing; run `workbench fetch smollm2-135m` (`make test` does)")
    return path
