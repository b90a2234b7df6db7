"""Backend selection for every op, in one place.

Order of precedence: the ``backend=`` argument, then the ``UE_FAST_BACKEND``
environment variable (only for ops that offer the backend it names), then
capability checks:

- ``"triton"``: Triton is importable and the tensor is on CUDA, or
  ``TRITON_INTERPRET=1`` was set before ``ue_fast`` was imported (then CPU
  tensors run through Triton's interpreter; slow, for testing).
- ``"cuda"``: the extension ``ue_fast._C`` was built with CUDA and the tensor is
  on CUDA.
- ``"cpp"``: the extension ``ue_fast._C`` is importable and the tensor is on the CPU.
- ``"torch"``: always; the pure-PyTorch reference.

``"auto"`` picks the first available backend the op offers, in the order above,
except that it never picks Triton's CPU interpreter: that runs kernels hundreds of
times slower than the torch path and is for tests, so it takes an explicit
``backend="triton"`` or ``UE_FAST_BACKEND=triton``.
When it has to settle for ``"torch"`` although the op has a faster backend for
that device, it warns once per op and device type. An explicitly requested
backend that is unavailable raises :class:`BackendUnavailableError` saying how
to get it.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
ENV_VAR = "UE_FAST_BACKEND"
_PREFERENCE = ("triton", "cuda", "cpp", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` fell back to the PyTorch reference."""


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import(name: str):
    """Import a module once; return (module or None, error text)."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a broken binary (OSError, RuntimeError)
        return None, f"{type(exc).__name__}: {exc}"


def triton_kernels():
    """The ``ue_fast.kernels`` package; imported lazily (``import triton`` is slow)."""
    mod, err = _import("ue_fast.kernels")
    if mod is None:
        raise BackendUnavailableError(f"Triton kernels cannot be imported ({err}). {_HOW['triton']}")
    return mod


def extension():
    """The compiled extension ``ue_fast._C``, or raise saying how to build it."""
    mod, err = _import("ue_fast._C")
    if mod is None:
        raise BackendUnavailableError(f"the C++ extension ue_fast._C cannot be imported ({err}). {_HOW['cpp']}")
    return mod


_HOW = {
    "triton": "Install it with `pip install triton` (Linux x86-64); on a machine without a GPU, "
    "set TRITON_INTERPRET=1 before importing ue_fast to run the kernels in Triton's interpreter.",
    "cpp": "Build it: install a C++ compiler, then reinstall with "
    "`pip install -e . --no-build-isolation` (without UE_FAST_NO_EXT=1).",
    "cuda": "Rebuild ue_fast._C with CUDA: on a machine with nvcc and a CUDA build of torch, "
    "reinstall with `pip install -e . --no-build-isolation` (UE_FAST_FORCE_CUDA=1 forces it).",
}


def availability(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``, and if not, why."""
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if device.type != "cuda" and not interpret_mode():
            return False, f"Triton needs a CUDA tensor (got a {device.type} tensor) or TRITON_INTERPRET=1"
        if _import("triton")[0] is None:
            return False, f"triton is not installed ({_import('triton')[1]})"
        return True, ""
    mod, err = _import("ue_fast._C")
    if mod is None:
        return False, f"ue_fast._C cannot be imported ({err})"
    if backend == "cpp":
        if device.type != "cpu":
            return False, f"the C++ backend runs on CPU tensors (got a {device.type} tensor)"
        return True, ""
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the CUDA backend runs on CUDA tensors (got a {device.type} tensor)"
        if not mod.has_cuda():
            return False, "ue_fast._C was built without CUDA"
        return True, ""
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


_warned: set[tuple[str, str]] = set()


# Host-side Python (environment, imports, warnings): torch.compile calls it once while
# tracing and keeps the answer as a constant instead of breaking the graph. The answer is
# not guarded: after changing UE_FAST_BACKEND, call torch._dynamo.reset() to retrace.
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device, offered: tuple[str, ...]) -> str:
    """Pick the backend that runs ``op`` for a tensor on ``device``.

    ``offered`` lists the backends the op implements, always including "torch".
    """
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    backend = backend.lower()
    source = "backend="
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not one of {BACKENDS}")
        if env != "auto" and env in offered:
            backend, source = env, f"{ENV_VAR}="
    if backend != "auto":
        if backend not in offered:
            raise ValueError(f"{op} has no {backend!r} backend; it offers {offered}")
        ok, why = availability(backend, device)
        if not ok:
            raise BackendUnavailableError(f"{op}: {source}{backend!r} is unavailable: {why}. {_HOW.get(backend, '')}")
        return backend
    missed = []
    for cand in _PREFERENCE:
        if cand not in offered or (cand == "triton" and device.type != "cuda"):
            continue
        ok, why = availability(cand, device)
        if ok:
            if cand == "torch" and missed:
                key = (op, device.type)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"{op}: falling back to the PyTorch reference on {device.type} ({'; '.join(missed)})",
                        BackendFallbackWarning,
                        stacklevel=3,
                    )
            return cand
        # A backend that never runs on this device type is no loss; one that could is.
        if not ((cand == "cuda" and device.type != "cuda") or (cand == "cpp" and device.type != "cpu")):
            missed.append(f"{cand}: {why}")
    raise AssertionError("unreachable: 'torch' is always available")  # pragma: no cover


def available_backends(device: str | torch.device = "cpu") -> dict[str, str]:
    """Each concrete backend and whether it can run on ``device`` ("ok" or the reason)."""
    device = torch.device(device)
    out = {}
    for b in _PREFERENCE:
        ok, why = availability(b, device)
        out[b] = "ok" if ok else why
    return out
