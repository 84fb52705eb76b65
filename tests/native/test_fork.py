"""The engine keeps working in a process forked after it ran (DataLoader workers, multiprocessing)."""

from __future__ import annotations

import os

import torch

from kt_trl._native import configure
from kt_trl.engine import ExpertEngine


def test_forked_child_runs_the_engine():
    configure(threads=2)   # a running pool whose worker threads do not exist in the child
    engine = ExpertEngine(torch.randn(4, 64, 32), torch.randn(4, 32, 32))
    x, ids, w = torch.randn(7, 32).bfloat16(), torch.randint(0, 4, (7, 1)), torch.rand(7, 1)
    y_parent, _ = engine.forward(x, ids, w)
    pid = os.fork()
    if pid == 0:   # child: same result, then leave without running pytest's teardown
        try:
            y_child, _ = engine.forward(x, ids, w)
            os._exit(0 if torch.equal(y_child, y_parent) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    y_again, _ = engine.forward(x, ids, w)   # and the parent's pool still works
    assert torch.equal(y_again, y_parent)
