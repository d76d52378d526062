"""Compiled CPU kernels with an eager twin: compiled once per key, trusted once they have run,
turned off (with one warning) where compiling or running them fails.

The fused quantizer (:mod:`qerror._fused`) and the instrument's channel sums
(:mod:`qerror.nn._moments`) each keep one :class:`Kernels`. A caller asks for a kernel's result
with :meth:`Kernels.call`; ``None`` means "compute it yourself": the caller's eager code gives
the same result (bit for bit for the quantizer, up to float summation order for the sums).

Guards, for every kernel:

* ``QERROR_FUSED=0`` in the environment, a forked child (compiled kernels run OpenMP regions,
  which can hang there), or inductor told to use unsafe floating-point optimisations: no
  compiled code at all (:func:`allowed`);
* compiled code is cached per instruction set: the vector width inductor picked is stated in
  the options (:func:`compile_options`), and the thread count is part of every key (it is
  fixed in the compiled code);
* loading compiled code must not switch the thread to flushing subnormals (some compilers'
  fast-math start-up code does): if it did, the flushing is undone and the kernels turned off;
* the compiler's limit of variants per function (8) is not met in a long process: each key
  holds, beside the caller's part, what the compiled code's guards read of the arguments
  (:func:`layout_key`) and of torch's global and thread-local state (:func:`torch_state`:
  grad and inference mode, autocast, deterministic algorithms, the default dtype, the
  thread count), so that one key is one compiled variant; the arguments are passed as
  tensors of their own (:func:`own`), not as views whose base the guards would read too.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable, Hashable

import torch

try:  # the compiler's own record of the global state its guards check (torch 2.14)
    from torch._C._dynamo.guards import GlobalStateGuard
except ImportError:  # another torch: torch_state reads the parts it knows through the API
    GlobalStateGuard = None

from qerror.cpu import flushing_denormals, in_forked_child
from qerror.interrupts import interrupt_reraised

#: The switch of every compiled kernel: ``0`` turns them off, ``1`` (or unset) on.
FUSED_ENV = "QERROR_FUSED"


def fused_switch() -> bool:
    """Whether ``QERROR_FUSED`` leaves the compiled kernels on: unset, empty or ``1``; off
    for ``0``.

    Raises
    ------
    ValueError
        Any other value (``false``, ``off``: read as "on" before, so that a run asked to
        take the block engine took the compiled path while its manifest said otherwise).
    """
    value = os.environ.get(FUSED_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{FUSED_ENV}={value!r}: expected 0 (compiled kernels off) or 1 "
                         "(on; also when unset)")
    return value != "0"


def allowed() -> bool:
    """Whether compiled kernels may run at all: not turned off by ``QERROR_FUSED=0``
    (:func:`fused_switch`, which refuses other values), not a forked child, and inductor
    present and not told to use unsafe floating-point optimisations (which could rewrite
    the exact quantizer's ``x - n s``)."""
    if not fused_switch() or in_forked_child():
        return False
    try:
        from torch._inductor import config
    except ImportError:  # a torch without inductor
        return False
    return not config.cpp.enable_unsafe_math_opt_flag


def compile_options() -> dict:
    """The vector width of the instruction set inductor picked here, stated: the compiled-code
    cache keys on the options but (torch 2.14) not on the picked instruction set, so code
    compiled under ``ATEN_CPU_CAPABILITY=avx2`` came back, wrong, to an AVX-512 process."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return {"cpp.simdlen": isa.bit_width()} if isa else {}


def own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own: the same memory, sizes and strides, detached, and no
    view of another. The compiler guards on a view's base as well (its rank, sizes and
    strides), so a view of each caller's tensor would be compiled again for each rank and
    shape those tensors have; mark dimensions static on this tensor, not before."""
    return t.detach()


def layout_key(args: tuple) -> tuple:
    """What the guards of compiled code read of ``args`` beyond their symbolic sizes: each
    tensor's sizes and storage offset as a pattern, 0 and 1 by value (the compiler
    specialises them) and the others by which earlier one, in any of the tensors, they
    equal (the compiler gives equal values one symbol, duck sizing, and a later call where
    they differ fails that guard), and whether it is an inference tensor (another dispatch
    key set); any other argument (None, a number) by its type and value, which the guards
    may read. Strides are not in it: the tensors compiled here are dense, their strides
    products of their sizes."""
    classes: dict[int, int] = {}
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes = tuple(d if d < 2 else 2 + classes.setdefault(d, len(classes))
                          for d in (*a.shape, a.storage_offset()))
            key.append((sizes, a.is_inference()))
        else:
            key.append((type(a).__name__, a))
    return tuple(key)


def autocast_enabled() -> tuple[bool, bool]:
    """Whether autocast is on for the CPU and for CUDA, in this thread (torch before 2.4
    takes no device in ``torch.is_autocast_enabled`` and has a function of its own for the
    CPU's)."""
    try:
        return torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
    except TypeError:  # torch before 2.4
        return torch.is_autocast_cpu_enabled(), torch.is_autocast_enabled()


#: The last global state :func:`torch_state` read, beside the guard that read it (checking a
#: guard costs a tenth of reading the state anew); a list, replaced whole.
_LAST_STATE: list[tuple] = []


def reduced_precision() -> tuple:
    """The reduced-precision flags the compiler's guard holds, read through the API: TF32
    matrix products and float16/bfloat16 reduced-precision reductions (the last absent from
    an older torch: None there)."""
    matmul = torch.backends.cuda.matmul
    return (matmul.allow_tf32, getattr(matmul, "allow_fp16_reduced_precision_reduction", None),
            getattr(matmul, "allow_bf16_reduced_precision_reduction", None))


def torch_state() -> tuple:
    """What the guards of compiled code read of torch's state, hashable: the global state
    that the compiler checks before every call (grad mode, autocast of every device,
    deterministic algorithms, the default dtype, the thread count, reduced-precision flags,
    torch function), as the compiler's own guard of it states it, and the thread's dispatch
    keys that every tensor guard adds to or takes from its tensor's (inference mode takes
    autograd's away: a tensor of the caller's given to a kernel inside and outside
    ``torch.inference_mode()`` is compiled twice). Where torch has no such guard, or one
    that cannot state what it holds (an older torch's, 2.1's for one, has no
    ``__getstate__`` of its own, and the one every object inherits answers None for it in
    every state), the parts it is known to hold, read one by one."""
    if GlobalStateGuard is None or "__getstate__" not in vars(GlobalStateGuard):
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_default_dtype(), torch.get_num_threads(), autocast_enabled(),
                reduced_precision(), torch._C._is_torch_function_enabled())
    last = _LAST_STATE[0] if _LAST_STATE else None
    if last is None or not last[0].check():  # check() reads the calling thread's state
        guard = GlobalStateGuard()
        last = (guard, guard.__getstate__())
        _LAST_STATE[:] = [last]
    return (last[1], torch._C._dispatch_tls_local_include_set().raw_repr(),
            torch._C._dispatch_tls_local_exclude_set().raw_repr())


class Kernels:
    """One family of compiled kernels and its state.

    Parameters
    ----------
    what : str
        The family's name in the warning ("the fused quantizer").
    instead : str
        What the caller does instead, in the warning ("quantizing with the block engine
        instead (same codes, slower)").
    stacklevel : int or str
        The warning's stack level from :meth:`call`, so that it points at the user's line;
        or a folder: the warning points at the first frame outside the modules directly in
        it, whatever route a call took through them (the quantizer's calls reach its kernels
        through more or fewer of its own functions by the input's layout).
    """

    def __init__(self, what: str, instead: str, stacklevel: int | str):
        self.what, self.instead, self.stacklevel = what, instead, stacklevel
        self.lock = threading.Lock()
        self.compiled: dict = {}
        self.ready: set = set()    # keys whose compiled code has run
        self.failed: set = set()   # keys turned off by a failed call
        self.broken: list[str] = []  # why the whole family is off, if it is
        self.warned: list[str] = []

    def enabled(self) -> bool:
        """Whether this family's kernels may run: :func:`allowed`, and no failure that
        turned the whole family off. :func:`allowed` is asked first, so that a bad
        ``QERROR_FUSED`` is refused whatever has failed before."""
        return allowed() and not self.broken

    def call(self, key: Hashable, make: Callable[[], Callable], args: tuple, *,
             breaks_all: bool = False):
        """The compiled kernel of ``key`` (``make()`` compiled on first use, with dynamic
        sizes and the whole graph) on ``args``; None where it cannot be compiled or run,
        after one warning. The key should hold everything the compiled code depends on
        beyond the symbolic sizes, :func:`layout_key` and :func:`torch_state` (those two are
        added here); ``args`` should be tensors of their own (:func:`own`).

        A call that fails turns off its key; where the key's kernel had never run and
        ``breaks_all`` (a failure that says the compiler cannot serve this family: not the
        compiler's limit of variants), the whole family. Memory errors are the caller's.
        Where the key itself cannot be made (a torch whose state :func:`torch_state` cannot
        read, an argument that cannot be hashed), the whole family, after the warning.
        """
        try:
            key = (key, layout_key(args), torch_state())
            hash(key)
        except Exception as err:  # noqa: BLE001 - the caller's eager code gives the result
            with self.lock:
                self.broken.append(f"{type(err).__name__}: {err}")
            self._warn_once(f"its key could not be made: {type(err).__name__}: {err}")
            return None
        # compiled code is loaded on a key's first call: only then can it switch on flushing
        flushing = None if key in self.ready else flushing_denormals()
        try:
            # a Ctrl-C that torch turned into another error while compiling is the user's,
            # not the compiler's failure
            with interrupt_reraised():
                with self.lock:
                    if key in self.failed or self.broken:
                        return None
                    fn = self.compiled.get(key)
                if fn is None:
                    options = compile_options()  # may build a probe: outside the lock
                    with self.lock:
                        fn = self.compiled.setdefault(key, torch.compile(
                            make(), dynamic=True, fullgraph=True, options=options))
                res = fn(*args)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - the caller's eager code gives the result
            from torch._dynamo.exc import FailOnRecompileLimitHit

            with self.lock:
                self.failed.add(key)
                if breaks_all and key not in self.ready and \
                        not isinstance(err, FailOnRecompileLimitHit):
                    self.broken.append(f"{type(err).__name__}: {err}")
            self._warn_once(f"{type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}")
            return None
        if flushing is False and flushing_denormals():
            torch.set_flush_denormal(False)
            with self.lock:
                self.broken.append("compiled code switched on flushing of subnormals")
            self._warn_once("loading compiled code switched the CPU to flushing subnormal "
                            "numbers; that was undone")
            return None
        with self.lock:
            self.ready.add(key)
        return res

    def _warn_once(self, why: str) -> None:
        with self.lock:
            if self.warned:
                return
            self.warned.append(why)
        level = self.stacklevel
        if isinstance(level, str):
            frame, level = sys._getframe(1), 2  # level 2: the frame that called this method
            while frame is not None and \
                    os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == self.stacklevel:
                frame, level = frame.f_back, level + 1
        warnings.warn(f"qerror: {self.what} is not used ({why}); {self.instead}. Set "
                      "QERROR_FUSED=0 to skip the attempt.", RuntimeWarning, stacklevel=level)


def named(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own named ``name``: compiled code is cached per code
    object, with a limit on its variants, so each specialisation gets its own."""
    fn.__code__ = fn.__code__.replace(co_name=name)
    return fn
