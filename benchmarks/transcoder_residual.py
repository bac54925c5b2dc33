"""What a trained transcoder set's weak layers miss: their figure on every held-out window, and the shape of the error.

    python -m benchmarks.transcoder_residual [--set smollm2-135m] [--part heldout residual]
                                             [--layers 1,3,25,26] [--held-out 512] [--layer 26]

``heldout`` evaluates ``--layers`` of the set (``evaluate_transcoders``, position 0 left out as the
recipe does) on the recipe's 32 held-out windows and on the first ``--held-out`` windows after the training
text (kjv gives 512 after SmolLM2's 7,904 training windows), so a layer's CE loss recovered is read on
more than the recipe's 4,032 tokens.

``residual`` takes ``--layer``'s error ``y - x_hat`` on 384 training windows drawn with seed 0 (48,768
rows after position 0) and asks whether it is a dense, low-rank part that a few always-on latents could
carry: the share of its variance in its top principal components; how much of it a dense GELU MLP of 16 /
64 / 256 hidden units fitted to it (from the MLP's input; 3,000 Adam steps of 2,048 rows, scored on the last
eighth of the rows) removes; and the CE loss recovered on the recipe's held-out windows when that MLP's
output is added to the transcoder's, or when the true error's projection on its top 4 / 16 / 64 components
(an oracle) is.

Not part of ``python -m benchmarks``: it measures a trained set, not a speed, and needs one
(``workbench train-transcoders smollm2-135m ...``).

Measured on 2026-12-07 with the documented SmolLM2 set (``--part heldout``, 21 min): layers 1 / 3 / 25 / 26
recover 0.910 / 0.914 / 0.896 / 0.849 on the recipe's 32 windows and 0.903 / 0.934 / 0.868 / 0.845 on 512.
``--part residual`` (layer 26, 5 min): the top 16 / 64 components hold 10% / 32% of the error's variance; the
dense MLPs remove 2% / 4% / 9% of it and, added, lower CE recovered from 0.849 to 0.812 / 0.805 / 0.805; the
oracle's top 4 / 16 / 64 components give 0.817 / 0.847 / 0.898. The error is high-rank, and what the KL
fine-tune left is not the MSE optimum, so a dense add-on fitted on MSE makes the layer worse.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

import torch
import torch.nn.functional as F

from workbench.allocator import retain_freed_memory
from workbench.errors import DataError
from workbench.pipelines import TranscoderRecipe, find_transcoder_set, load_transcoder_set, token_windows
from workbench.sae.transcoders import evaluate_transcoders, input_hook, output_hook
from workbench.zoo import load_model


def _recipe(name_or_dir: str) -> TranscoderRecipe:
    """The recipe the set was trained under (its ``recipe.json``), else the defaults."""
    path = find_transcoder_set(name_or_dir) / "recipe.json"
    if not path.exists():
        print(f"{path} is missing: the recipe's defaults choose the windows")
        return TranscoderRecipe()
    known = {f.name for f in fields(TranscoderRecipe)}
    return TranscoderRecipe(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def _windows(model, recipe: TranscoderRecipe, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's training windows (corpus order) and the ``held_out`` windows after them."""
    n_train = recipe.steps_per_epoch() * recipe.batch_windows
    try:
        windows = token_windows(model, recipe.corpus, recipe.n_ctx, n_train + held_out)
    except DataError as exc:
        raise SystemExit(f"{exc}; lower --held-out") from None
    return windows[:n_train], windows[n_train:]


def heldout(model, tcs: dict, layers: list[int], held: torch.Tensor, recipe: TranscoderRecipe) -> None:
    for label, part in (("the recipe's", held[: recipe.eval_windows]), ("all", held)):
        t0 = time.perf_counter()
        per, _ = evaluate_transcoders(model, {layer: tcs[layer] for layer in layers}, part, first_position=1)
        figures = " / ".join(f"{e.ce_loss_recovered:.3f}" for e in per)
        gaps = " / ".join(f"{e.ce_zero - e.ce_clean:.3f}" for e in per)
        print(f"{label} {part.shape[0]} held-out windows: layers {' / '.join(map(str, layers))} recover {figures} "
              f"(zeroing costs {gaps} nats; {time.perf_counter() - t0:.0f} s)", flush=True)


def _rows(model, tc, layer: int, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's inputs and the transcoder's errors at positions 1: of ``windows``."""
    xs, errs = [], []
    for b in range(0, windows.shape[0], 16):
        _, cache = model.run_with_cache(windows[b: b + 16], names_filter=[input_hook(layer), output_hook(layer)])
        x = cache[input_hook(layer)][:, 1:].reshape(-1, model.cfg.d_model).float()
        y = cache[output_hook(layer)][:, 1:].reshape(-1, model.cfg.d_model).float()
        xs.append(x)
        errs.append(y - tc(x).x_hat)
    return torch.cat(xs), torch.cat(errs)


def _fit_dense(x: torch.Tensor, err: torch.Tensor, hidden: int, n_fit: int) -> torch.nn.Module:
    torch.manual_seed(0)
    d = x.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    with torch.enable_grad():
        for _ in range(3000):
            i = torch.randint(0, n_fit, (2048,))
            loss = (net(x[i]) - err[i]).pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def _ce(model, layer: int, windows: torch.Tensor, replace) -> float:
    """Mean next-token loss at positions 1: when the layer's MLP writes ``replace(mlp_in, mlp_out)``."""
    total = count = 0.0
    for b in range(0, windows.shape[0], 8):
        tokens = windows[b: b + 8]
        seen = {}

        def keep(x, hook):
            seen["x"] = x

        def swap(y, hook):
            return replace(seen["x"].float(), y.float()).to(y.dtype)

        logits = model.run_with_hooks(tokens, fwd_hooks=[(input_hook(layer), keep), (output_hook(layer), swap)])
        logp = F.log_softmax(logits[:, 1:-1].float(), -1)
        total += float(-logp.gather(-1, tokens[:, 2:, None]).sum())
        count += tokens[:, 2:].numel()
    return total / count


def residual(model, tc, layer: int, train: torch.Tensor, held: torch.Tensor) -> None:
    t0 = time.perf_counter()
    drawn = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[:384]]
    x, err = _rows(model, tc, layer, drawn)
    centred = err - err.mean(0)
    shares = torch.linalg.eigvalsh(centred.T @ centred).flip(0).cumsum(0)
    shares /= shares[-1].clone()
    print(f"layer {layer}: {x.shape[0]} training rows; share of the error's variance in its top 1 / 4 / 16 / 64 / "
          f"128 / 256 components: {' / '.join(f'{float(shares[k - 1]):.3f}' for k in (1, 4, 16, 64, 128, 256))}",
          flush=True)
    components = torch.linalg.svd(centred, full_matrices=False).Vh
    mean = err.mean(0)
    n_fit = x.shape[0] * 7 // 8
    test_var = (err[n_fit:] - err[n_fit:].mean(0)).pow(2).sum()
    nets = {}
    for hidden in (16, 64, 256):
        nets[hidden] = _fit_dense(x, err, hidden, n_fit)
        left = float((nets[hidden](x[n_fit:]) - err[n_fit:]).pow(2).sum() / test_var)
        print(f"  dense MLP, {hidden} hidden: {left:.3f} of the error left on rows it was not fitted on", flush=True)
    clean = _ce(model, layer, held, lambda x, y: y)
    zero = _ce(model, layer, held, lambda x, y: torch.zeros_like(y))

    def recovered(replace) -> str:
        return f"{(zero - _ce(model, layer, held, replace)) / (zero - clean):.3f}"

    print(f"  CE loss recovered on {held.shape[0]} held-out windows (clean {clean:.3f}, zeroed {zero:.3f}): "
          f"the transcoder {recovered(lambda x, y: tc(x).x_hat)}", flush=True)
    for hidden, net in nets.items():
        print(f"  plus the dense MLP of {hidden}: {recovered(lambda x, y, net=net: tc(x).x_hat + net(x))}", flush=True)
    for k in (4, 16, 64):
        top = components[:k]

        def oracle(x, y, top=top):
            x_hat = tc(x).x_hat
            return x_hat + mean + ((y - x_hat - mean) @ top.T) @ top
        print(f"  plus the true error on its top {k} components (oracle): {recovered(oracle)}", flush=True)
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="smollm2-135m", help="a transcoder set's name or directory (trained on the model)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--part", nargs="+", choices=("heldout", "residual"), default=["heldout", "residual"])
    p.add_argument("--layers", default="1,3,25,26", help="heldout: the layers to evaluate")
    p.add_argument("--held-out", type=int, default=512, help="heldout: windows after the training text")
    p.add_argument("--layer", type=int, default=26, help="residual: the layer whose error is taken apart")
    args = p.parse_args()
    retain_freed_memory()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    tcs = load_transcoder_set(args.set, model)
    recipe = _recipe(args.set)
    train, held = _windows(model, recipe, args.held_out if "heldout" in args.part else recipe.eval_windows)
    if "heldout" in args.part:
        heldout(model, tcs, [int(v) for v in args.layers.split(",")], held, recipe)
    if "residual" in args.part:
        residual(model, tcs[args.layer], args.layer, train, held[: recipe.eval_windows])


if __name__ == "__main__":
    main()
