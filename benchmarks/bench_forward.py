"""Forward-pass speed against HF transformers and TransformerLens' bridge, as ratios in one run.

    python -m benchmarks.bench_forward [--quick]

On GPT-2 small's configuration and on a Llama configuration (random weights, fp32, batch 4 x 256):
plain forward vs. HF's forward; forward with every hook cached vs. HF's plain forward; the bridge's
forward and run_with_cache vs. HF's forward. Timings are interleaved (A B C A B C ...) and the
median is kept, so a busy machine slows every contender alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers

from benchmarks import interleaved_medians
from workbench.loading import from_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tokenizer_dir(vocab: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tempfile.mkdtemp()
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(f"{d}/tokenizer.json")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{d}/tokenizer.json", bos_token="t1", eos_token="t2")
    hf_tok.save_pretrained(d)
    return d


def compare(label: str, hf, batch: int, pos: int, repeats: int, with_bridge: bool) -> dict[str, float]:
    model = from_hf(hf).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos))
    fns = {
        "hf_forward": lambda: hf(tokens),
        "wb_forward": lambda: model(tokens),
        "wb_cache_all": lambda: model.run_with_cache(tokens),
    }
    if with_bridge:
        from transformer_lens.model_bridge import TransformerBridge

        directory = tempfile.mkdtemp()
        hf.save_pretrained(directory)
        tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(model.cfg.d_vocab))
        bridge_hf = type(hf)(hf.config).eval()
        bridge_hf.load_state_dict(hf.state_dict())
        bridge = TransformerBridge.boot_transformers(directory, hf_model=bridge_hf, tokenizer=tok)
        fns["tl_forward"] = lambda: bridge(tokens)
        fns["tl_cache_all"] = lambda: bridge.run_with_cache(tokens)
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats)
    base = med["hf_forward"]
    print(f"\n{label}: batch {batch} x {pos}, fp32, {torch.get_num_threads()} threads, median of {repeats}")
    for name, seconds in med.items():
        print(f"  {name:14s} {seconds * 1000:8.1f} ms   {seconds / base:5.2f}x HF forward")
    return {name: seconds / base for name, seconds in med.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (a smoke run)")
    parser.add_argument("--no-bridge", action="store_true", help="skip TransformerLens")
    args = parser.parse_args(argv)
    batch, pos, repeats = (2, 64, 3) if args.quick else (4, 256, 7)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=576, num_hidden_layers=12, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)).eval()
    return {
        "gpt2-small": compare("GPT-2 small config", gpt2, batch, pos, repeats, not args.no_bridge),
        "llama": compare("Llama config (SmolLM2 shape, 12 layers)", llama, batch, pos, repeats, not args.no_bridge),
    }


if __name__ == "__main__":
    main()
