"""Reports what a share_torch worker sees of itself: its paths, interpreter, numpy, descriptors.

Loaded forked (from the fork server) and spawned, the host compares the two.
"""

import os
import signal
import subprocess
import sys
import sysconfig
import threading

import numpy
import torch

from pyisolate import ExtensionBase


class ZygoteProbe(ExtensionBase):
    def where(self):
        """How this process sees its interpreter and paths."""
        return {
            "path": list(sys.path), "prefix": sys.prefix, "exec_prefix": sys.exec_prefix,
            "executable": sys.executable, "virtual_env": os.environ.get("VIRTUAL_ENV"),
            "purelib": sysconfig.get_paths()["purelib"], "pid": os.getpid(), "ppid": os.getppid(),
            "sid": os.getsid(0), "pgid": os.getpgid(0), "flags_isolated": sys.flags.isolated,
            "sigint": repr(signal.getsignal(signal.SIGINT)), "sigpipe": repr(signal.getsignal(signal.SIGPIPE)),
            "env": sorted(os.environ),
        }

    def torch_numpy_flags(self):
        """What torch's modules noted of numpy at import (a forked worker's are set when numpy is imported)."""
        flags = {name: module.HAS_NUMPY for name, module in sorted(sys.modules.items())
                 if name.startswith("torch") and isinstance(getattr(module, "HAS_NUMPY", None), bool)}
        flags["torch.nn.functional.np"] = torch.nn.functional.np is numpy
        return flags

    def subprocess_view(self):
        """What a `python` started by this worker (by name, through PATH) is and sees."""
        out = subprocess.run(
            ["python", "-c", "import sys, numpy; print(sys.prefix); print(numpy.__version__)"],
            capture_output=True, text=True, check=True, timeout=60)
        prefix, version = out.stdout.split()
        return {"prefix": prefix, "numpy": version}

    def numpy_roundtrip(self, n):
        """numpy's version and file, and torch.from_numpy / tensor.numpy on this numpy."""
        array = numpy.arange(n, dtype=numpy.float32)
        tensor = torch.from_numpy(array) * 2
        return {"version": numpy.__version__, "file": numpy.__file__, "doubled": tensor.numpy().tolist(),
                "tensor": tensor}

    def descriptors(self):
        """This process's open descriptors: number -> what it points at."""
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        return fds

    def threads(self):
        return threading.active_count()

    def cuda_initialized(self):
        return torch.cuda.is_initialized()

    def add(self, tensor, value):
        return tensor + value

    def crash(self, sig):
        os.kill(os.getpid(), sig)

    def exit_with(self, code):
        os._exit(code)

    def read_file(self, path):
        with open(path) as f:
            return f.read()
