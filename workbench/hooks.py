"""Hook points: named identity modules through which activations can be read and replaced.

A :class:`HookPoint` returns its input unchanged unless a hook function is attached. Hook
functions take ``(activation, hook)`` and return ``None`` (observe) or a tensor of the same
shape (replace). :class:`HookedModule` gives a model name lookup, a context manager for
temporary hooks that always removes them, ``run_with_hooks`` and ``run_with_cache``.

Backward hooks take ``(gradient, hook)``: the gradient of whatever is differentiated with respect to
the hook point's output, and return ``None`` (observe) or a tensor of the same shape that replaces
the gradient flowing further back. A forward pass registers them on the autograd graph it builds, so
they fire in the backward passes of *that* graph, also after the ``hooks()`` block has exited (call
``backward`` inside or outside it), and never in a later forward pass. Where nothing upstream tracks
gradients (frozen weights), the hooked activation becomes a leaf of the graph so gradients still
reach it.

Hooks belong to the run that attached them. Temporary hooks live in a :class:`contextvars.ContextVar`,
not on the module: a forward pass sees the hooks its own thread (or asyncio task) attached and no
others, so one model can be shared between callers (the app's cached model serves every browser
session, each in its own thread) without one caller's hooks firing in another's pass. Only
:meth:`HookPoint.add` attaches a *permanent* hook that every caller sees; the library never uses it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from workbench.errors import HookError

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None
FwdHooks = Sequence[tuple[str | Callable[[str], bool], HookFn]]
#: ``(name_or_filter, fn)`` with ``fn(gradient, hook)`` returning None or a replacement gradient
BwdHooks = FwdHooks


class _Backward:
    """A backward hook's entry in the run's hook table (beside the forward functions of a hook point).

    The forward pass does not call it; it registers ``fn`` on the gradient of the hook's output."""

    __slots__ = ("fn",)
    #: the fused norm kernel would leave ``hook_scale`` out of the graph, so a gradient there needs the explicit path
    observe_only = False

    def __init__(self, fn: HookFn):
        self.fn = fn

# The temporary hooks of the current run: hook point -> its functions in attach order. Each `hooks()`
# block installs a new mapping (never mutated in place), so a thread sees only what it attached.
# Threads start from the empty default: Python does not copy a context into a new thread.
_EMPTY: MappingProxyType[HookPoint, tuple[HookFn, ...]] = MappingProxyType({})
_RUN_HOOKS: ContextVar[MappingProxyType[HookPoint, tuple[HookFn, ...]]] = ContextVar(
    "workbench_run_hooks", default=_EMPTY
)


def clear_run_hooks() -> None:
    """Drop every temporary hook of the current thread's context (a guard for reused worker threads).

    A ``hooks()`` block always removes its hooks on exit; this is for a thread that runs one job
    after another (Streamlit reruns a session's script on the same thread) and wants to be sure that
    nothing a stopped job left behind, e.g. a generator abandoned mid-``with``, reaches the next one.
    """
    _RUN_HOOKS.set(_EMPTY)


class HookPoint(nn.Module):
    """An identity module that calls its hook functions on what passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self._fns: list[HookFn] = []  # permanent hooks (add): seen by every caller

    def add(self, fn: HookFn) -> None:
        """Attach a *permanent* hook, seen by every caller until :meth:`clear`.

        Prefer ``model.hooks(...)``: its hooks belong to the run that attached them. A permanent hook
        on a model that several callers share fires in all of their forward passes."""
        _check_callable(fn, self.name)
        self._fns.append(fn)

    def clear(self) -> None:
        """Remove the permanent hooks and the current run's temporary hooks on this point."""
        self._fns.clear()
        run = _RUN_HOOKS.get()
        if self in run:
            _RUN_HOOKS.set(MappingProxyType({hp: fns for hp, fns in run.items() if hp is not self}))

    @property
    def fns(self) -> tuple[HookFn, ...]:
        """The hook functions a forward pass of the current run calls here, in order."""
        run = _RUN_HOOKS.get().get(self, ())
        return (*self._fns, *run) if self._fns else run

    @property
    def active(self) -> bool:
        return bool(self._fns) or self in _RUN_HOOKS.get()

    @property
    def observe_only(self) -> bool:
        """Whether every attached hook only reads the activation (caching hooks are marked so)."""
        return all(getattr(fn, "observe_only", False) for fn in self.fns)

    def __call__(self, x: Tensor) -> Tensor:
        # The common case must cost nothing: with no hook attached (and no torch module hook registered
        # on this module or globally), skip nn.Module's call machinery, a few µs per call, ~600 calls per
        # SmolLM2 decode step. One ContextVar read and a dict lookup stay well under that.
        if (not self._fns and self not in _RUN_HOOKS.get()
                and not (self._forward_hooks or self._forward_pre_hooks or _global_module_hooks())):
            return x
        return super().__call__(x)

    def forward(self, x: Tensor) -> Tensor:
        fns = self.fns
        if not fns:
            return x
        backward = [fn for fn in fns if isinstance(fn, _Backward)]
        if backward:
            fns = tuple(fn for fn in fns if not isinstance(fn, _Backward))
            if torch.is_grad_enabled():
                # A view gives this hook point its own node in the graph: consecutive hook points that pass
                # the same tensor along (resid_post, the next resid_pre) then see their gradients in
                # backward order. With nothing upstream tracking gradients, the activation becomes a leaf.
                x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            else:
                backward = []
        for fn in fns:
            out = fn(x, self)
            if out is None:
                continue
            if not isinstance(out, Tensor):
                raise HookError(
                    f"hook on {self.name!r} returned {type(out).__name__}; "
                    "a hook returns None (to observe) or a tensor of the same shape (to replace)"
                )
            if out.shape != x.shape:
                raise HookError(
                    f"hook on {self.name!r} returned shape {tuple(out.shape)}, "
                    f"expected {tuple(x.shape)} (the activation's shape)"
                )
            if out.dtype != x.dtype or out.device != x.device:
                raise HookError(
                    f"hook on {self.name!r} returned a {out.dtype} tensor on {out.device}, expected "
                    f"{x.dtype} on {x.device} (the activation's); convert it with .to(x.dtype) / .to(x.device)"
                )
            x = out
        for entry in backward:
            x.register_hook(lambda grad, fn=entry.fn: self._backward(fn, grad))
        return x

    def _backward(self, fn: HookFn, grad: Tensor) -> Tensor | None:
        out = fn(grad, self)
        if out is not None and (not isinstance(out, Tensor) or out.shape != grad.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise HookError(f"backward hook on {self.name!r} returned {got}; a backward hook returns None (to "
                            f"observe) or a tensor of the gradient's shape {tuple(grad.shape)} (to replace it)")
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _check_callable(fn: object, where: str) -> None:
    if not callable(fn):
        raise HookError(
            f"the hook for {where!r} is a {type(fn).__name__}, not a function; a hook is fn(activation, hook) "
            "returning None or a tensor of the same shape"
        )


def _global_module_hooks() -> bool:
    """Whether torch-level forward hooks are registered for every module (``nn.modules.module``'s globals)."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def name_matcher(names_filter: NameFilter) -> Callable[[str], bool]:
    """Return a predicate for a names filter: None (all), one name, a list of names, or a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = set(names_filter)
    return lambda name: name in wanted


class HookedModule(nn.Module):
    """A module whose :class:`HookPoint` children are addressable by their dotted names.

    Subclasses call :meth:`setup_hooks` at the end of ``__init__``.
    """

    hook_dict: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    # -- lookup -----------------------------------------------------------------------------

    def hook_point(self, name: str) -> HookPoint:
        """Return the hook point called ``name``; an unknown name lists the nearest ones."""
        try:
            return self.hook_dict[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.hook_dict, n=5, cutoff=0.5)
            hint = f"nearest: {', '.join(close)}" if close else "see model.hook_names() for the full list"
            raise HookError(f"no hook point named {name!r}; {hint}") from None

    def resolve(self, name_or_filter: str | Callable[[str], bool]) -> list[HookPoint]:
        """Return the hook points a name or a predicate selects (a name must exist)."""
        if isinstance(name_or_filter, str):
            return [self.hook_point(name_or_filter)]
        if callable(name_or_filter):
            return [hp for name, hp in self.hook_dict.items() if name_or_filter(name)]
        raise HookError(f"a hook target is a name or a predicate on names, got {type(name_or_filter).__name__}")

    # -- temporary hooks ---------------------------------------------------------------------

    @contextmanager
    def hooks(self, fwd_hooks: FwdHooks = (), bwd_hooks: BwdHooks = ()) -> Iterator[HookedModule]:
        """Attach ``(name_or_filter, fn)`` forward and backward hooks for the duration of a ``with`` block.

        Exactly the hooks added here are removed on exit, also when the block raises; hooks
        attached by an enclosing ``with`` stay until that one exits. The hooks belong to this run:
        a forward pass in another thread does not see them (see the module docstring). Backward
        hooks fire in the backward passes of graphs built inside the block (see the module docstring).
        """
        added: list[tuple[HookPoint, HookFn]] = []
        for hooks, backward in ((fwd_hooks, False), (bwd_hooks, True)):
            for target, fn in hooks:  # resolve and check everything before attaching anything
                for hp in self.resolve(target):
                    _check_callable(fn, hp.name)
                    added.append((hp, _Backward(fn) if backward else fn))
        run = dict(_RUN_HOOKS.get())
        for hp, fn in added:
            run[hp] = (*run.get(hp, ()), fn)
        _RUN_HOOKS.set(MappingProxyType(run))
        try:
            yield self
        finally:
            # Remove exactly ours (by identity, the last occurrence: the same function may be attached
            # twice) from whatever is current, rather than restoring a snapshot: blocks opened in
            # generators may close out of order, and an inner block's hooks must survive that.
            run = dict(_RUN_HOOKS.get())
            for hp, fn in reversed(added):
                fns = list(run.get(hp, ()))
                for i in range(len(fns) - 1, -1, -1):
                    if fns[i] is fn:
                        del fns[i]
                        break
                if fns:
                    run[hp] = tuple(fns)
                else:
                    run.pop(hp, None)
            _RUN_HOOKS.set(MappingProxyType(run) if run else _EMPTY)

    def reset_hooks(self) -> None:
        """Remove the permanent hooks and the current run's temporary hooks from every hook point.

        Other threads' temporary hooks are theirs: they are neither seen nor removed."""
        for hp in self.hook_dict.values():
            hp._fns.clear()
        run = _RUN_HOOKS.get()
        mine = set(self.hook_dict.values())
        if any(hp in mine for hp in run):
            kept = {hp: fns for hp, fns in run.items() if hp not in mine}
            _RUN_HOOKS.set(MappingProxyType(kept) if kept else _EMPTY)

    def run_with_hooks(self, *args, fwd_hooks: FwdHooks = (), bwd_hooks: BwdHooks = (), **kwargs):
        """Run ``forward`` with temporary hooks; they are removed afterwards, even on error.

        Backward hooks stay on the graph of this run's output: they fire when it is differentiated."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)

    def caching_hooks(
        self,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        incl_grad: bool = False,
    ) -> tuple[dict[str, Tensor], list[tuple[str, HookFn]]]:
        """Return an empty store and the hooks that fill it with the activations ``names_filter`` selects."""
        if isinstance(names_filter, str):
            self.hook_point(names_filter)
        elif isinstance(names_filter, Iterable) and not callable(names_filter):
            for name in names_filter:
                self.hook_point(name)  # unknown names are errors, not silently empty caches
        match = name_matcher(names_filter)
        store: dict[str, Tensor] = {}

        def save(x: Tensor, hook: HookPoint) -> None:
            y = x if incl_grad else x.detach()
            if device is not None or dtype is not None:
                y = y.to(device=device, dtype=dtype)
            store[hook.name] = y

        save.observe_only = True  # type: ignore[attr-defined]  # lets fused kernels run under caching
        return store, [(name, save) for name in self.hook_dict if match(name)]

    def grad_caching_hooks(
        self,
        store: dict[str, Tensor],
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[tuple[str, HookFn]]:
        """Return backward hooks that put the gradient at each selected hook into ``store[name + "_grad"]``
        (TransformerLens' key), overwritten by each backward pass through the graph."""
        match = name_matcher(names_filter)

        def save_grad(grad: Tensor, hook: HookPoint) -> None:
            g = grad.detach()
            if device is not None or dtype is not None:
                g = g.to(device=device, dtype=dtype)
            store[hook.name + "_grad"] = g

        return [(name, save_grad) for name in self.hook_dict if match(name)]
