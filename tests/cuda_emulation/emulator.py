"""Run the launchers of ``csrc/cuda/*.cu`` on the CPU through the stand-in CUDA runtime (``cuda_runtime.h``).

Each ``.cu`` is rewritten (:func:`rewrite`: ``<<<...>>>`` launches, ``__shared__`` declarations), compiled with
g++ (C++20, ``<barrier>``) together with its entry points from ``shims.cpp``, and linked with ``driver.cpp``
into one program per sanitizer ("plain", "address": ASan + UBSan, "thread": TSan); objects are built once per
test session. :meth:`Emulator.call` writes the tensors' bytes to a file, runs the program on it in a
subprocess (a sanitizer needs its own process, and a deadlocked barrier then times out instead of hanging the
suite) and returns the buffers as they are after the call::

    emu = Emulator(folder)
    _, _, _, y, y1, y2 = emu.call("gelu_jet2", [x, x1, x2, y, y1, y2], [4, M, N, 0])
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.join(HERE, "..", "..", "csrc", "cuda")

# entry point (shims.cpp) -> the .cu that defines its launcher
ENTRIES = {
    "gelu_jet2": "gelu_jet2",
    "layer_norm_jet2": "layer_norm_jet2",
    "cross_entropy_jet2_rows": "cross_entropy_jet2",
    "hutchinson_update": "hutchinson_update",
    "hutchinson_update_seeded": "hutchinson_update",
    "onehot_weight_tangent": "onehot_weight_tangent",
    "attention_jet2": "attention_jet2",
    "attention_hvp": "attention_hvp",
}
FLAGS = {  # -O0 / -g1 for the sanitizers: a third of the compile time of -O1 -g, runs on tiny cases only
    "plain": ["-O1"],
    "address": ["-O0", "-g1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "thread": ["-O1", "-g1", "-fsanitize=thread"],
}
ENV = {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1", "TSAN_OPTIONS": "halt_on_error=1"}

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYNAMIC = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")


def rewrite(source: str) -> str:
    """The .cu source as C++ for the stand-in runtime: launches and shared-memory declarations replaced."""
    out = _LAUNCH.sub(r"fasthess_emu::launch(\1, \2)(", source)
    out = _DYNAMIC.sub(r"\1* \2 = reinterpret_cast<\1*>(fasthess_emu::shared);", out)
    out = _STATIC.sub(r"static char \2_tag; auto& \2 = *fasthess_emu::static_shared<\1\3>(&\2_tag);", out)
    for left in ("<<<", "__shared__"):
        assert left not in out, f"emulator.rewrite: a {left} it cannot handle is left"
    return out


def unavailable() -> str | None:
    """Why the emulation cannot run here (no g++, or no C++20 ``<barrier>``), else None."""
    if shutil.which("g++") is None:
        return "the CUDA emulation needs g++"
    res = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-x", "c++", "-"], input="#include <barrier>\n",
                         capture_output=True, text=True)
    return None if res.returncode == 0 else "the CUDA emulation needs g++ with C++20 <barrier>"


class Emulator:
    """Builds (once, lazily) and runs the emulated launchers; ``folder`` holds the build."""

    def __init__(self, folder) -> None:
        self.folder = str(folder)
        self._lock = threading.Lock()
        self._jobs: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)

    def _object(self, stem: str, tool: str):
        """A future of the object file of ``stem`` (a .cu stem, or "driver") built for ``tool``."""
        with self._lock:
            if (stem, tool) not in self._jobs:
                self._jobs[stem, tool] = self._pool.submit(self._compile, stem, tool)
            return self._jobs[stem, tool]

    def _compile(self, stem: str, tool: str) -> str:
        obj = os.path.join(self.folder, f"{stem}.{tool}.o")
        cmd = ["g++", "-std=c++20", "-pthread", "-w", *FLAGS[tool], f"-I{HERE}", "-iquote", CUDA_DIR, "-c"]
        if stem == "driver":
            cmd += [os.path.join(HERE, "driver.cpp")]
        else:
            with open(os.path.join(CUDA_DIR, f"{stem}.cu")) as f:
                src = os.path.join(self.folder, f"{stem}.emu.cpp")
                with open(src, "w") as g:
                    g.write(rewrite(f.read()))
            cmd += ["-include", src, f"-DFASTHESS_EMU_{stem}", os.path.join(HERE, "shims.cpp")]
        res = subprocess.run([*cmd, "-o", obj], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
        return obj

    def program(self, stems, tool: str = "plain") -> str:
        """The driver linked with the kernels of ``stems`` (all compiled in parallel) for ``tool``."""
        stems = sorted(set(stems))
        exe = os.path.join(self.folder, f"driver.{tool}.{'-'.join(stems)}")
        with self._lock:
            job = self._jobs.get(exe)
        if job is None:
            objs = [self._object(s, tool) for s in ["driver", *stems]]
            paths = [o.result() for o in objs]
            res = subprocess.run(["g++", "-pthread", *FLAGS[tool], *paths, "-o", exe], capture_output=True,
                                 text=True, timeout=600)
            assert res.returncode == 0, res.stderr[-4000:]
            with self._lock:
                self._jobs[exe] = exe
        return exe

    def prebuild(self, builds) -> None:
        """Starts compiling, in the background, the objects of ``builds``: (entries, tool) pairs."""
        for entries, tool in builds:
            stems = sorted(set(ENTRIES.values())) if tool == "plain" else [ENTRIES[e] for e in entries]
            for stem in ["driver", *stems]:
                self._object(stem, tool)

    def call(self, entry: str, buffers, ints, floats=(), *, tool: str = "plain", env=None, timeout: float = 600):
        """Runs ``entry`` (shims.cpp) on CPU tensors (None: nullptr); returns the buffers after the call.

        ``tool="plain"`` runs the build of every kernel; a sanitizer build holds only the kernel of ``entry``.
        ``env``: extra environment variables (FASTHESS_EMU_SMS, FASTHESS_CUDA_ATTENTION_ROWWISE).
        """
        stems = sorted(set(ENTRIES.values())) if tool == "plain" else [ENTRIES[entry]]
        exe = self.program(stems, tool)
        blob = bytearray()

        def i64(*vals):
            blob.extend(torch.tensor(vals, dtype=torch.int64).numpy().tobytes())

        i64(len(entry))
        blob.extend(entry.encode())
        i64(len(buffers))
        for t in buffers:
            if t is None:
                i64(-1)
            else:
                raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
                i64(raw.numel())
                blob.extend(raw.numpy().tobytes())
        i64(len(ints), *ints)
        i64(len(floats))
        blob.extend(torch.tensor(list(floats), dtype=torch.float64).numpy().tobytes())
        tag = f"{os.getpid()}-{threading.get_ident()}-{id(blob)}"
        src, dst = os.path.join(self.folder, f"in-{tag}"), os.path.join(self.folder, f"out-{tag}")
        with open(src, "wb") as f:
            f.write(blob)
        try:
            res = subprocess.run([exe, src, dst], env={**os.environ, **ENV, **(env or {})}, capture_output=True,
                                 text=True, timeout=timeout)
            assert res.returncode == 0, f"{entry} ({tool}) exited {res.returncode}:\n{res.stderr[-6000:]}"
            with open(dst, "rb") as f:
                raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        finally:
            for p in (src, dst):
                if os.path.exists(p):
                    os.remove(p)
        outs, at = [], 0
        for t in buffers:
            if t is None:
                outs.append(None)
                continue
            n = t.numel() * t.element_size()
            outs.append(raw[at:at + n].clone().view(t.dtype).view(t.shape))
            at += n
        return outs
