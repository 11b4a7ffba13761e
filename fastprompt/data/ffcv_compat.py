"""Workarounds for FFCV 1.0.2 (and the libraries it brings), in one place.

Nothing here runs at import. Every fastprompt module imports FFCV after `import_ffcv()`
(workaround 0). `apply_ffcv_compat()` changes process-wide state (LLVM's
symbol table, OpenCV's thread pool, two FFCV methods) and is called explicitly, once, when a
loader is built (`fastprompt.data.loaders.BetonLoader`); later calls do nothing. Importing
fastprompt leaves numba, LLVM, OpenCV and FFCV as they were (tests/test_imports.py).

0. `import_ffcv()` imports FFCV with `numba.typed.Dict` briefly replaced by Python's `dict`.
   FFCV 1.0.2 builds one numba typed Dict at import (`IMAGE_MODES` in
   ffcv/fields/rgb_image.py, `{'jpg': 0, 'raw': 1}`), and the first typed Dict of a process
   compiles numba's dictionary implementation, which numba cannot cache: 3-5 s of every
   process that reads or writes a .beton (measured 2026-12-01: `import ffcv` 4.6 s, 1.2 s
   with this). FFCV only reads that table from Python (to pick a mode, and as a constant
   closed over by its decoders), where a `dict` gives the same ints. The attribute is
   restored at once: numba's typed Dict stays what it was for every other caller.
What `apply_ffcv_compat()` does, and why:
1. `OSCacheManager.compile_reader` is replaced. FFCV bug: it builds the reader's signature
   with `t1 = numba.uint8[::1]; t1.mutable = False`, mutating numba's interned
   `Array(uint8, 1, 'C')` type, which corrupts every numba table keyed by that type (the next
   compile of a function taking a uint8 array fails with a KeyError).
2. FFCV's native JPEG decode and resize are registered with LLVM under our own symbol
   names (`IMDECODE_SYMBOL`, `RESIZE_SYMBOL`). Not an FFCV bug but a limit of its binding:
   ffcv/libffcv.py binds them with ctypes, and numba embeds a ctypes pointer's address in the
   machine code and so refuses to cache it; our decode kernels (`fastprompt.data.decoders`,
   `cache=True`) call the symbols by name and link against them in every process. (Since
   issue 12 the kernels resize with PIL's bicubic in numba, `fastprompt.data.resample`, and
   call only imdecode; the resize symbol is still registered, unused, as tests/test_imports.py
   pins it: removing it and 3. is a follow-up.)
3. The system OpenCV that libffcv links against runs each call on the calling thread. FFCV's
   `resize` is cv::resize, which splits its work over OpenCV's own pool; called from FFCV's
   decode threads (one per core) that oversubscribes the cores.
4. `Compiler.compile` leaves a function marked by `mark_host_code` as Python. FFCV
   compiles every decoder's per-batch function with numba for each Loader; ours only unpack
   FFCV's buffers and call a cached kernel, and numba compiling that wrapper links the cached
   kernel's code into a new module and optimises it again: ~0.7 s per Loader (two per training
   run), every process. Called from Python, the cached kernels load from numba's cache and run
   the same code (a dispatch of some microseconds per batch; measured 2026-12-01, one process
   alternating epochs of both kinds of Loader: 0.55 s per epoch each, BENCHMARKS.md).
Two more FFCV workarounds are functions the loader calls per use (no global state):
5. `next_batch`: FFCV's `EpochIterator.__next__` blocks forever if its background thread
   raises (the exception is only printed); this one fails instead.
6. `keep_torch_threads`: FFCV's `Loader` (and each epoch's iterator) set torch's intra-op
   thread count to the loader's worker count; the caller's count is restored.
Writing needs none of these; its FFCV workarounds live with the writer: an exception in an
FFCV writer process hangs FFCV's writer, so `fastprompt.data.beton._WriterInput` records a
failed image instead of raising, and `fastprompt.data.beton._watched_writer` ends the write
when a writer process raises anyway or dies.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)

IMDECODE_SYMBOL = "fastprompt_ffcv_imdecode"  # FFCV's imdecode, for cached numba code
RESIZE_SYMBOL = "fastprompt_ffcv_resize"  # FFCV's resize (cv::resize), for cached numba code

_lock = threading.Lock()
_import_lock = threading.Lock()
_applied = False


def import_ffcv() -> None:
    """0. Import FFCV without compiling numba's typed Dict (module docstring); idempotent.

    Call it before a module's or function's first `from ffcv ... import`: the first import of
    any FFCV module runs `ffcv/__init__.py`, which imports every field. Once FFCV is imported
    (by us or by the caller) this does nothing."""
    import sys

    if "ffcv" in sys.modules:
        return
    import numba.typed

    with _import_lock:
        if "ffcv" in sys.modules:
            return
        had = "Dict" in vars(numba.typed)  # numba.typed provides Dict lazily, through a module __getattr__
        previous = vars(numba.typed).get("Dict")
        numba.typed.Dict = dict
        try:
            import ffcv  # noqa: F401
        finally:
            if had:
                numba.typed.Dict = previous
            else:
                del numba.typed.Dict


def apply_ffcv_compat() -> None:
    """Apply workarounds 1-4 of the module docstring to this process (once; idempotent)."""
    global _applied
    with _lock:
        if _applied:
            return
        import_ffcv()
        _patch_os_cache_reader()
        _register_native_symbols()
        _single_threaded_opencv()
        _keep_host_code()
        _applied = True


def is_applied() -> bool:
    return _applied


def _patch_os_cache_reader() -> None:
    """1. FFCV's `OSCacheManager.compile_reader`, without corrupting numba's type tables."""
    import numpy as np
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline import Compiler

    def compile_reader(self):
        """Same reader as FFCV 1.0.2's, typed on first use instead (fastprompt's kernels do not
        call it; stock FFCV decoders still can). Compiling lazily also saves ~0.5 s per Loader."""

        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address : address + size]

        return Compiler.compile(read)

    compile_reader.fastprompt_patch = True  # marks the patch (tests/test_imports.py checks its absence)
    OSCacheManager.compile_reader = compile_reader


def _register_native_symbols() -> None:
    """2. libffcv's imdecode and resize under names cached numba code links against."""
    import ffcv._libffcv
    import llvmlite.binding as llvm

    lib = ctypes.CDLL(ffcv._libffcv.__file__)
    llvm.add_symbol(IMDECODE_SYMBOL, ctypes.cast(lib.imdecode, ctypes.c_void_p).value)
    llvm.add_symbol(RESIZE_SYMBOL, ctypes.cast(lib.resize, ctypes.c_void_p).value)


HOST_CODE = "fastprompt_host_code"  # the attribute `mark_host_code` sets


def mark_host_code(function):
    """Mark an operation's generated function to run as Python in FFCV's pipeline (workaround 4)."""
    setattr(function, HOST_CODE, True)
    return function


def _keep_host_code() -> None:
    """4. FFCV's `Compiler.compile`, returning functions marked by `mark_host_code` unchanged."""
    from ffcv.pipeline.compiler import Compiler

    compile_with_numba = Compiler.compile.__func__

    def compile(cls, code, signature=None):
        if getattr(code, HOST_CODE, False):
            return code
        return compile_with_numba(cls, code, signature)

    compile.fastprompt_patch = True  # marks the patch (tests/test_imports.py checks its absence)
    Compiler.compile = classmethod(compile)


def opencv_core_libraries() -> list[str]:
    """Paths of the libopencv_core loaded in this process (pip's cv2 is a separate copy)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return sorted({line.split()[-1] for line in maps if "libopencv_core.so" in line})
    except OSError:
        return []


def _single_threaded_opencv() -> None:
    """3. OpenCV's thread pool set to 1 thread in the system OpenCV libffcv links against.

    The decode threads are the parallelism (the standard advice for OpenCV in data
    loaders); the library is found by its path in /proc/self/maps."""
    import ffcv._libffcv  # noqa: F401  (loads libffcv and with it the system OpenCV)

    done = False
    for path in opencv_core_libraries():
        setter = getattr(ctypes.CDLL(path), "_ZN2cv13setNumThreadsEi", None)  # cv::setNumThreads(int)
        if setter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], None
            setter(1)
            done = True
    if not done:
        logger.warning("could not limit OpenCV's thread pool (no libopencv_core in this process's maps); "
                       "FFCV's resize may oversubscribe the cores")


def next_batch(epoch_iter, poll_s: float = 1.0):
    """5. FFCV's `EpochIterator.__next__`, but failing instead of hanging when its thread dies.

    Waits on the output queue in slices and checks that the thread is alive; the rest is
    what `__next__` does (end marker, CUDA stream wait).
    """
    while True:
        try:
            item = epoch_iter.output_queue.get(timeout=poll_s)
            break
        except queue.Empty:
            if not epoch_iter.is_alive() and epoch_iter.output_queue.empty():
                raise RuntimeError("FFCV's loader thread failed (its traceback is printed above)") from None
    if item is None:
        epoch_iter.close()
        raise StopIteration
    slot, result = item
    if epoch_iter.cuda_streams[slot] is not None:
        epoch_iter.current_stream.wait_stream(epoch_iter.cuda_streams[slot])  # the batch's copies are done
    return result


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """6. Restore torch's intra-op thread count after FFCV code that sets it."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
