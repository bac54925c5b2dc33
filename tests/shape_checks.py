"""Runtime checks of every annotation in ``workbench/`` while the tests run (issue 14).

:func:`install` puts jaxtyping's import hook in front of ``workbench``: each function and dataclass
of the package is wrapped in ``jaxtyping.jaxtyped(typechecker=beartype)``, so every call checks its
arguments and return value against the annotations, shapes included (``Float[Tensor, "batch pos
d_model"]`` binds ``batch``, ``pos`` and ``d_model`` across the arguments and the result). beartype
follows PEP 484's numeric tower (an ``int`` is a valid ``float``), as every static checker does.

One refinement, for the tests of the library's own validation: a test that hands a function a value
its annotations exclude (a float token tensor, a ``precision="fp8"``) is checking the error the
*function* gives, a :class:`~workbench.errors.WorkbenchError` naming the value and the way out. So a
call whose arguments fail the check is made again, unchecked:

- if it raises, that exception stands: the function refuses the value in its own words, and the
  test (or the caller that catches it) sees what it sees without the checks;
- if it returns, the violation is held by the workbench call that made it: when that call, or one
  further out, ends in a WorkbenchError, some caller validated the value and refused it (a manifest
  built from JSON, then checked), and the violation is dropped; when the outermost workbench call
  returns, the violation is raised (the annotation is narrower than what the code accepts).

Return values are always checked.

Loaded by ``tests/conftest.py`` before anything imports ``workbench``; ``WORKBENCH_TYPECHECK=0``
runs the tests unchecked (to time the difference). Subprocesses the tests start import ``workbench``
without the hook, unchecked.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading

import jaxtyping
from jaxtyping import TypeCheckError

PACKAGE = "workbench"
TYPECHECKER = "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"

_jaxtyped = jaxtyping.jaxtyped
_MISSING = object()


def enabled() -> bool:
    return os.environ.get("WORKBENCH_TYPECHECK", "1") != "0"


def install() -> None:
    """Check every annotation of ``workbench`` at run time from now on (a no-op with WORKBENCH_TYPECHECK=0)."""
    if not enabled() or jaxtyping.jaxtyped is _checked_with_fallback:
        return
    if PACKAGE in sys.modules:
        raise RuntimeError(f"{PACKAGE} was imported before the shape checks were installed; "
                           "tests/conftest.py must install them before anything imports it")
    # the hook's decorator reads `jaxtyping.jaxtyped` when each module is executed, so it gets this wrapper
    jaxtyping.jaxtyped = _checked_with_fallback
    jaxtyping.install_import_hook([PACKAGE], TYPECHECKER)


def _checked_with_fallback(fn=_MISSING, *, typechecker=_MISSING):
    """``jaxtyping.jaxtyped``, whose argument check falls back to the function's own validation (module doc)."""
    if fn is _MISSING:
        return functools.partial(_checked_with_fallback, typechecker=typechecker)
    if inspect.isclass(fn):  # a dataclass: jaxtyped wraps its __init__ in place
        init = fn.__dict__.get("__init__")
        out = _jaxtyped(fn, typechecker=typechecker)
        if init is not None and fn.__dict__.get("__init__") is not init:
            fn.__init__ = _fallback(fn.__init__, init)
        return out
    checked = _jaxtyped(fn, typechecker=typechecker)
    return _fallback(checked, fn) if inspect.isfunction(fn) and checked is not fn else checked


#: per thread, one list per active checked call: the violations its callees accepted, not yet judged
_calls = threading.local()


def _stack() -> list[list[TypeCheckError]]:
    stack = getattr(_calls, "stack", None)
    if stack is None:
        stack = _calls.stack = []
    return stack


def _fallback(checked, fn):
    own_arguments = f"Type-check error whilst checking the parameters of {fn.__module__}.{fn.__qualname__}."

    @functools.wraps(fn)
    def call(*args, **kwargs):
        __tracebackhide__ = True
        from workbench.errors import WorkbenchError  # here: this wrapper is made while workbench's modules load

        stack = _stack()
        held: list[TypeCheckError] = []
        stack.append(held)
        try:
            try:
                result = checked(*args, **kwargs)
            except TypeCheckError as error:
                if getattr(error, "judged", False) or not str(error).startswith(own_arguments):
                    raise
                error.judged = True
                result = fn(*args, **kwargs)  # an exception here is the function's own refusal: it stands
                if inspect.isgenerator(result):  # it validates when first resumed (a @contextmanager's enter)
                    try:
                        next(result, None)
                    finally:
                        result.close()
                    result = fn(*args, **kwargs)
                held.append(error)
        except WorkbenchError:
            held.clear()  # a caller validated what its callee accepted, and refused it
            raise
        finally:
            stack.pop()
        if held:
            if not stack:
                raise held[0]
            stack[-1].extend(held)
        return result

    return call
