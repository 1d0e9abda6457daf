"""Fault injection for tests/test_faults.py: SIGKILL a rapm stage at the n-th call of one function.

Python imports ``sitecustomize`` at start-up from ``sys.path``, so with this folder on ``PYTHONPATH``
every process a Snakemake job starts reads ``RAPM_FAULT`` = ``"<argv words> <module>:<qualname> <n>"``,
e.g. ``"trajectories,compute rapm.trajectories:run_batch 3"``: in a process whose command line holds
those words, the n-th call of that function kills the process (SIGKILL: no handler, no cleanup, no
flush) before the call runs, after appending one line to ``RAPM_FAULT_LOG`` so the test knows the
fault fired. The function is wrapped right after its module is first imported, so every later
``from module import name`` gets the wrapper. Nothing here is part of rapm.
"""

import importlib.abc
import importlib.machinery
import os
import signal
import sys

_SPEC = os.environ.get("RAPM_FAULT")


def _wrap(fn, words, n, label):
    calls = [0]

    def wrapper(*args, **kwargs):
        if all(w in sys.argv for w in words):
            calls[0] += 1
            if calls[0] == n:
                with open(os.environ["RAPM_FAULT_LOG"], "a") as f:
                    f.write(f"{label} #{n}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapper


class _Patcher(importlib.abc.MetaPathFinder):
    def __init__(self, module, qualname, words, n, label):
        self.module, self.qualname, self.words, self.n, self.label = module, qualname, words, n, label

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            owner = module
            *parents, attr = self.qualname.split(".")
            for p in parents:
                owner = getattr(owner, p)
            setattr(owner, attr, _wrap(getattr(owner, attr), self.words, self.n, self.label))

        spec.loader.exec_module = exec_module
        return spec


if _SPEC:
    _words, _target, _n = _SPEC.split()
    _module, _qualname = _target.split(":")
    sys.meta_path.insert(0, _Patcher(_module, _qualname, _words.split(","), int(_n), _SPEC))
