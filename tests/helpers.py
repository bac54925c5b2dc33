"""Small builders shared by tests (import with `from helpers import ...`)."""

from __future__ import annotations


def tiny_cfg(**overrides):
    """A 2-layer d_model-32 config; GPT-2 shaped unless overridden."""
    from workbench import GPTConfig

    base = dict(d_model=32, n_layers=2, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=24, name="tiny")
    base.update(overrides)
    return GPTConfig(**base)


LLAMA_TINY = dict(positional="rotary", normalization="rmsnorm", act_fn="silu", gated_mlp=True, use_bias=False,
                  n_kv_heads=2)


def hold_output_lock(directory):
    """Return a context manager: another process holds ``output_lock(directory)`` inside it (yields its pid)."""
    import contextlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    script = ("import sys, time\nfrom workbench.locking import output_lock\nwith output_lock(sys.argv[1]):\n"
              "    print('held', flush=True); time.sleep(60)\n")

    @contextlib.contextmanager
    def held():
        holder = subprocess.Popen([sys.executable, "-c", script, str(directory)], stdout=subprocess.PIPE, text=True,
                                  cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
        try:
            assert holder.stdout.readline().strip() == "held"
            yield holder.pid
        finally:
            holder.kill()
            holder.wait()

    return held()
