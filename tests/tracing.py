"""Allocation sequences, traced from torch and replayed by vitcost, for tests that hold the
replay against torch allocation by allocation (the peak alone would miss a wrong step that
happens not to be the highest)."""

from __future__ import annotations

import weakref

from vitcost import measure, memory
from vitcost.replay import Replay


def storages_mode():
    """A TorchDispatchMode recording every new storage an operator returns and when it dies,
    as (operator or "free", live total); ``ignore(tensors)`` marks storages that exist already
    (parameters, optimizer states) so that views of them count nothing."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Storages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.total, self.events, self.op, self.keep = {}, 0, [], "", []

        def ignore(self, tensors) -> None:
            for t in tensors:
                st = t.untyped_storage()
                self.live[(st.data_ptr(), st.nbytes())] = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.op = func.__name__
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = (st.data_ptr(), st.nbytes())
                    if key not in self.live and st.nbytes():
                        self.live[key] = st.nbytes()
                        self.total += st.nbytes()
                        self.events.append((self.op, self.total))

                        def gone(_, key=key):
                            self.total -= self.live.pop(key)
                            self.events.append(("free", self.total))
                        self.keep.append(weakref.ref(st, gone))
            return out

    return Storages()


class Log(Replay):
    """A replay of every block (none lumped) that writes down (name or "free", live total) at
    every allocation and free."""

    FULL = True

    def __init__(self):
        super().__init__(1)
        self.log = []

    def alloc(self, name, nbytes, cat):
        super().alloc(name, nbytes, cat)
        if nbytes > 0:
            self.log.append((name, self.total))

    def free(self, *names):
        for name in names:
            known = name in self.live
            super().free(name)
            if known:
                self.log.append(("free", self.total))


def traced_step(spec, workload):
    """Torch's events over a steady step (the third) of ``spec`` on the CPU, with the model's
    parameters, buffers and optimizer states ignored."""
    import torch

    torch.manual_seed(0)
    runner = measure.build_runner(spec, workload, "cpu")
    runner.step()
    runner.step()
    tracer = storages_mode()
    states = [v for st in runner.optimizer.state.values() for v in st.values() if torch.is_tensor(v)] \
        if runner.optimizer else []
    tracer.ignore([*runner.model.parameters(), *runner.model.buffers(), *states])
    with tracer:
        runner.step()
    return tracer.events


def replayed_step(spec, workload) -> list:
    replay = Log()
    memory.replay_step(replay, spec, workload, memory.shapes_of(spec, workload))
    return replay.log


def allocation_rises(events, start: str, stop: str) -> list[int]:
    """The live total after each allocation from the one named (or made by) ``start`` up to,
    not including, ``stop``, less the total before ``start``."""
    def named(name: str, key: str) -> bool:  # (torch's operators are named "randn.default")
        return name == key or name.startswith(key + ".")

    first = next(i for i, (name, _) in enumerate(events) if named(name, start))
    last = next((i for i, (name, _) in enumerate(events) if named(name, stop) and i > first), len(events))
    base = events[first - 1][1] if first else 0
    return [total - base for name, total in events[first:last] if name != "free"]
