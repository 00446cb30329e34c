# SPDX-License-Identifier: LGPL-2.1-or-later
"""kvmotion's engine API for Python inference engines (cooperative mode).

A ctypes binding of libkvmotion-engine.so.1 (include/kvmotion/engine.h):
no compiler, nothing but the standard library.

    import mmap, kvmotion_engine as kme

    with kme.Weights("index:llama-8b") as w:          # read-only mapping, by path
        tensors = w.buffer                             # zero-copy memoryview
        kv = mmap.mmap(-1, 1024 * 65536)               # the KV block pool
        def quiesce(deadline_ms): ...                  # finish the step, stop
        def resume(restored): ...                      # start again
        with kme.Engine(quiesce=quiesce, resume=resume) as e:
            e.add_weights(w)
            pool = e.kv_pool_register(kv, 65536, 1024)
            e.block_set_free(pool, 7)                  # on every free/alloc
            ...

The callbacks run on the library's control thread. quiesce(deadline_ms)
returns None or 0 to accept; to refuse it returns a negative errno or
raises OSError(errno, ...); any other exception is printed and refuses
with EIO. resume(restored) likewise. The library is found through
$KVMOTION_ENGINE_LIB, then the dynamic linker's search (ctypes.util), then
the directory it was installed to.
"""

import ctypes
import ctypes.util
import errno
import os
import sys
import traceback

__all__ = ["Weights", "Engine", "EngineError", "library"]

_SONAME = "libkvmotion-engine.so.1"
# Replaced by meson when the module is installed.
_INSTALL_LIBDIR = "@KVMOTION_ENGINE_LIBDIR@"

KV_HOST = 0
KV_DEVICE = 1


class EngineError(OSError):
    """A failure of the engine API: .errno is the (positive) errno."""


class _Callbacks(ctypes.Structure):
    _fields_ = [
        ("quiesce", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)),
        ("resume", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_bool)),
        ("userdata", ctypes.c_void_p),
    ]


class _Opts(ctypes.Structure):
    _fields_ = [("resume_timeout_ms", ctypes.c_uint32), ("flags", ctypes.c_uint)]


class _Stats(ctypes.Structure):
    _fields_ = [
        ("quiesces", ctypes.c_uint64),
        ("resumes", ctypes.c_uint64),
        ("cancelled", ctypes.c_uint64),
        ("last_released_bytes", ctypes.c_uint64),
        ("last_free_blocks", ctypes.c_uint32),
        ("quiesced", ctypes.c_bool),
        ("restored", ctypes.c_bool),
        ("refused", ctypes.c_uint64),
        ("self_resumes", ctypes.c_uint64),
    ]


def _candidates():
    found = ctypes.util.find_library("kvmotion-engine")
    if found:
        yield found
    if not _INSTALL_LIBDIR.startswith("@"):
        yield os.path.join(_INSTALL_LIBDIR, _SONAME)
    yield _SONAME  # whatever the dynamic linker finds (LD_LIBRARY_PATH)


def _setup(lib):
    P, I, U32, U64, SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
    S = ctypes.c_char_p
    protos = {
        "kme_weights_open_ex": (I, [S, S, ctypes.POINTER(P), ctypes.c_char_p, SZ]),
        "kme_weights_close": (None, [P]),
        "kme_weights_data": (P, [P]),
        "kme_weights_size": (U64, [P]),
        "kme_weights_path": (S, [P]),
        "kme_weights_id": (S, [P]),
        "kme_weights_n_files": (SZ, [P]),
        "kme_weights_file": (I, [P, SZ, ctypes.POINTER(S), ctypes.POINTER(U64), ctypes.POINTER(U64)]),
        "kme_engine_start": (I, [ctypes.POINTER(_Callbacks), ctypes.POINTER(_Opts), ctypes.POINTER(P)]),
        "kme_engine_stop": (None, [P]),
        "kme_engine_add_weights": (I, [P, P]),
        "kme_kv_pool_register": (I, [P, P, SZ, U32, ctypes.c_uint, ctypes.POINTER(U32)]),
        "kme_kv_block_set_free": (I, [P, U32, U32, ctypes.c_bool]),
        "kme_engine_stats": (I, [P, ctypes.POINTER(_Stats)]),
        "kme_strerror": (S, [I]),
    }
    for name, (res, args) in protos.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args
    return lib


_lib = None


def library():
    """The loaded libkvmotion-engine (loaded on first use)."""
    global _lib
    if _lib is None:
        explicit = os.environ.get("KVMOTION_ENGINE_LIB")
        if explicit:
            _lib = _setup(ctypes.CDLL(explicit))
        else:
            tried = []
            for c in _candidates():
                try:
                    _lib = _setup(ctypes.CDLL(c))
                    break
                except OSError as ex:
                    tried.append("%s (%s)" % (c, ex))
            else:
                raise EngineError(errno.ENOENT, "%s not found; set KVMOTION_ENGINE_LIB. Tried: %s"
                                  % (_SONAME, "; ".join(tried)))
    return _lib


def _check(r, what):
    if r < 0:
        raise EngineError(-r, "%s: %s" % (what, library().kme_strerror(r).decode()))
    return r


class Weights:
    """Weights mapped read-only from a weights file of the store.

    ref: "index:NAME" or the path of a model file; store: the store's path
    (None: $KVMOTION_STORE, then the kvmotion config's). .buffer is a
    read-only memoryview of the whole mapping, valid until close().
    """

    def __init__(self, ref, store=None):
        lib = library()
        h = ctypes.c_void_p()
        msg = ctypes.create_string_buffer(512)
        r = lib.kme_weights_open_ex(store.encode() if store else None, ref.encode(),
                                    ctypes.byref(h), msg, len(msg))
        if r < 0:
            raise EngineError(-r, "weights %s: %s" % (ref, msg.value.decode(errors="replace")
                                                      or lib.kme_strerror(r).decode()))
        self._h = h
        self.path = lib.kme_weights_path(h).decode()
        self.id = lib.kme_weights_id(h).decode()
        self.size = lib.kme_weights_size(h)
        self.files = []
        for i in range(lib.kme_weights_n_files(h)):
            name, off, size = ctypes.c_char_p(), ctypes.c_uint64(), ctypes.c_uint64()
            _check(lib.kme_weights_file(h, i, ctypes.byref(name), ctypes.byref(off),
                                        ctypes.byref(size)), "weights file %d" % i)
            self.files.append((name.value.decode(), off.value, size.value))
        if self.size:
            arr = (ctypes.c_char * self.size).from_address(lib.kme_weights_data(h))
            self.buffer = memoryview(arr).cast("B").toreadonly()
        else:
            self.buffer = memoryview(b"")

    def file_view(self, name):
        """The bytes of one model file of the weights, zero-copy."""
        for n, off, size in self.files:
            if n == name:
                return self.buffer[off:off + size]
        raise KeyError(name)

    def close(self):
        """Unmaps the weights: views taken from .buffer must not be used after."""
        if self._h:
            self.buffer.release()
            library().kme_weights_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_h", None):
            self.close()


class Engine:
    """The engine's control thread: answers kvmotion's quiesce and resume."""

    def __init__(self, quiesce, resume, resume_timeout_ms=0):
        lib = library()

        def call(fn, arg):
            try:
                r = fn(arg)
                return int(r) if r else 0
            except OSError as ex:  # a deliberate refusal, errno says why
                if ex.errno:
                    return -ex.errno
                traceback.print_exc(file=sys.stderr)
                return -errno.EIO
            except BaseException:  # noqa: B036 (never unwind into C)
                traceback.print_exc(file=sys.stderr)
                return -errno.EIO

        def on_quiesce(_ud, deadline_ms):
            return call(quiesce, deadline_ms)

        def on_resume(_ud, restored):
            return call(resume, bool(restored))

        # The C side keeps pointers to these: they live as long as the engine.
        self._cb = _Callbacks(_Callbacks._fields_[0][1](on_quiesce),
                              _Callbacks._fields_[1][1](on_resume), None)
        self._opts = _Opts(resume_timeout_ms, 0)
        self._pools = []
        self._weights = []
        h = ctypes.c_void_p()
        _check(lib.kme_engine_start(ctypes.byref(self._cb), ctypes.byref(self._opts),
                                    ctypes.byref(h)), "engine start")
        self._h = h

    def add_weights(self, weights):
        _check(library().kme_engine_add_weights(self._h, weights._h), "add weights")
        self._weights.append(weights)

    def kv_pool_register(self, address_or_buffer, block_size, n_blocks, device=False):
        """Registers a KV pool (an address, or a writable buffer such as an
        mmap); every block starts in use. Returns the pool's number."""
        if isinstance(address_or_buffer, int):
            addr, keep = address_or_buffer, None
        else:
            need = block_size * n_blocks
            if memoryview(address_or_buffer).nbytes < need:
                raise ValueError("buffer smaller than %d blocks of %d bytes" % (n_blocks, block_size))
            # holds an export: the buffer cannot be closed while registered
            keep = (ctypes.c_char * need).from_buffer(address_or_buffer)
            addr = ctypes.addressof(keep)
        pool = ctypes.c_uint32()
        _check(library().kme_kv_pool_register(self._h, addr, block_size, n_blocks,
                                              KV_DEVICE if device else KV_HOST,
                                              ctypes.byref(pool)), "KV pool register")
        self._pools.append(keep)
        return pool.value

    def block_set_free(self, pool, block, free=True):
        _check(library().kme_kv_block_set_free(self._h, pool, block, free), "KV block")

    def stats(self):
        st = _Stats()
        _check(library().kme_engine_stats(self._h, ctypes.byref(st)), "stats")
        return {name: getattr(st, name) for name, _ in _Stats._fields_}

    def stop(self):
        """Stops the control thread (a quiesced engine is not resumed)."""
        if self._h:
            library().kme_engine_stop(self._h)
            self._h = None
            self._pools = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __del__(self):
        # the control thread must not call into callbacks that are gone
        if getattr(self, "_h", None):
            self.stop()
