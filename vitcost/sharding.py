"""FSDP2's ``fully_shard`` in the memory replay: which buffers a rank holds, and when.

The model is ``fully_shard`` on every block, then on the root (the patch embedding, the
tokens and position embedding, the final norm and the head): one parameter group per block
and one for the root. What a rank holds, from ``torch/distributed/fsdp/_fully_shard``:

* **Sharded parameters.** Each parameter is split along its first dimension into
  ``world`` chunks of ``ceil(rows / world)`` rows; every rank stores its chunk padded to that
  size (``padded``). A one-row parameter (the class token, the position embedding) is
  stored whole on every rank. The optimizer sees the unpadded chunk (``local``): the last
  ranks may hold fewer rows, or none.
* **Unsharding a group** (``unshard`` then ``wait_for_unshard``): one flat all-gather
  output of ``world`` x the group's padded shards, then each parameter's own unsharded
  buffer of the same total (the copy-out). In forward the flat output lives until the next
  group's copy-out is done (``all_gather_state``), the last one until the root's forward returns; in
  backward it goes right after the copy-out, and the group then prefetches the all-gather
  of the group before it. A block reshards (frees its unsharded buffers) after its forward
  unless ``reshard_after_forward=False`` (``zero2``); the root never reshards after forward.
* **Reducing a group's gradients** (``post_backward``): the unsharded buffers go, then the
  reduce-scatter input kept from the previous group; a reduce-scatter input of ``world`` x
  the group's padded shards is filled from the unsharded gradients, which then go, and its
  output (the group's padded shards) becomes the sharded gradients, or, when they exist
  (gradient accumulation, ``zero_grad(set_to_none=False)``), is added into them and goes.
  The root's reduction runs when backward ends, and the last input goes with it.

HSDP shards each parameter within a replica group and all-reduces the reduce-scatter's
output in place across the groups: a rank holds what FSDP over its group holds.
Pure integer functions and replay calls; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vitcost.formulas import param_rows, param_tensors
from vitcost.replay import B, G, Replay, W, _round_up
from vitcost.specs import Device, Strategy, ViTSpec, Workload


def chunk_rows(rows: int, world: int) -> int:
    """Rows of each rank's chunk: ``torch.chunk`` along dimension 0."""
    return -(-rows // world)


def padded_elements(elements: int, rows: int, world: int) -> int:
    """Elements a rank stores for one parameter: its chunk padded to ``ceil(rows / world)`` rows."""
    return chunk_rows(rows, world) * (elements // rows)


def local_elements(elements: int, rows: int, world: int, rank: int) -> int:
    """Elements of ``rank``'s unpadded chunk (what the optimizer steps): fewer rows, or none,
    on the last ranks when the rows do not divide."""
    chunk = chunk_rows(rows, world)
    return max(0, min(chunk, rows - rank * chunk)) * (elements // rows)


@lru_cache(maxsize=256)
def groups(spec: ViTSpec) -> tuple[tuple[tuple[str, int, int], ...], tuple[tuple[str, int, int], ...]]:
    """(path, elements, rows) of the root group's parameters and of one block's, in
    ``parameters()`` order."""
    root, block = [], []
    for (name, n), rows in zip(param_tensors(spec), param_rows(spec)):
        if name.startswith("blocks."):
            if name.startswith("blocks.0/"):
                block.append((name, n, rows))
        else:
            root.append((name, n, rows))
    return tuple(root), tuple(block)


def shards(spec: ViTSpec, world: int, rank: int) -> tuple[int, ...]:
    """Elements of each parameter's unpadded chunk on ``rank``, in ``parameters()`` order."""
    return tuple(local_elements(n, rows, world, rank) for (_, n), rows in zip(param_tensors(spec), param_rows(spec)))


def padded_shards(spec: ViTSpec, world: int) -> tuple[int, ...]:
    """Elements each rank stores for each parameter, in ``parameters()`` order."""
    return tuple(padded_elements(n, rows, world) for (_, n), rows in zip(param_tensors(spec), param_rows(spec)))


@dataclass(frozen=True)
class Buffers:
    """Bytes of one group's collective buffers on a rank (the allocator's rounding applied)."""

    flat: int  # the flat all-gather output: world x the group's padded shards
    unsharded: int  # each parameter's unsharded buffer, summed
    reduce_in: int  # the reduce-scatter input: world x the padded shards of those with gradients
    reduce_out: int  # its output, the group's sharded gradients
    last_grad: int  # the unsharded gradient of the group's last parameter (``foreach_reduce``'s loop holds it)
    copy_in: int  # mixed precision: this rank's padded shards cast to the compute dtype, the all-gather's input


def _buffers(params: tuple[tuple[str, int, int], ...], world: int, e: int, round_to: int,
             unused: frozenset, reduce_bytes: int, mixed: bool) -> Buffers:
    """``e``: the bytes of the parameters as gathered and computed on (and of their unsharded
    gradients); ``reduce_bytes``: of the reduce-scatter and the sharded gradients."""
    padded = [padded_elements(n, rows, world) for _, n, rows in params]
    used = [(p, n) for p, (name, n, _) in zip(padded, params) if name not in unused]
    return Buffers(flat=_round_up(world * sum(padded) * e, round_to),
                   unsharded=sum(_round_up(world * p * e, round_to) for p in padded),
                   reduce_in=_round_up(world * sum(p for p, _ in used) * reduce_bytes, round_to),
                   reduce_out=_round_up(sum(p for p, _ in used) * reduce_bytes, round_to),
                   last_grad=_round_up(used[-1][1] * e, round_to),
                   copy_in=_round_up(sum(padded) * e, round_to) if mixed else 0)


class Fsdp:
    """FSDP2's unshard, reshard and reduce-scatter calls on a replay, at the points the
    memory model (``vitcost.memory``) reaches: the root's forward, each block's, the root's
    return, each block's backward and the end of backward."""

    def __init__(self, spec: ViTSpec, wl: Workload, round_to: int, unused: frozenset) -> None:
        """``round_to``: the allocator's rounding of each buffer (1: sizes as requested);
        ``unused``: parameters the forward never reads (no gradient)."""
        world = wl.shard_ranks
        self.copies_input = wl.device != Device.cuda  # gloo's reduce-scatter works on a copy of its input
        self.accumulates = wl.accumulates  # sharded gradients exist: the output is added into them
        root, block = groups(spec)
        # gathered and computed in the step's parameter dtype, reduced in the optimizer's
        e, reduce_bytes = wl.param_bytes, wl.master_bytes
        self.root = _buffers(root, world, e, round_to, unused, reduce_bytes, wl.mixed_precision)
        self.block = _buffers(block, world, e, round_to, unused, reduce_bytes, wl.mixed_precision)
        self.reshards = wl.strategy != Strategy.zero2  # blocks free their unsharded buffers after forward
        self.depth = spec.depth
        self.gathered = ""  # the flat all-gather output forward keeps (``all_gather_state``)
        self.reducing = ""  # the reduce-scatter input kept until the next group reduces

    @property
    def sharded_grad_bytes(self) -> int:
        """The sharded gradients after backward: every group's reduce-scatter output."""
        return self.root.reduce_out + self.depth * self.block.reduce_out

    def _buffers(self, group: str) -> Buffers:
        return self.root if group == "root" else self.block

    @staticmethod
    def _where(r: Replay, phase: str, group: str, what: str) -> None:
        r.where = f"{phase}: {'root' if group == 'root' else 'blocks.' + group[1:]} ({what})"

    def _gather(self, r: Replay, group: str) -> None:
        """The all-gather: under mixed precision the shards are first cast into one flat
        input, which lives until the collective's call returns."""
        buffers = self._buffers(group)
        r.alloc("fsdp.in", buffers.copy_in, B)
        r.alloc("fsdp.ag." + group, buffers.flat, B)
        r.free("fsdp.in")

    def _copy_out(self, r: Replay, group: str) -> None:
        r.alloc("fsdp.un." + group, self._buffers(group).unsharded, W)

    def pre_forward(self, r: Replay, group: str) -> None:
        """A group's forward starts: its all-gather, the copy-out, then the previous group's
        flat output goes (``wait_for_unshard`` holds it in a local until it returns)."""
        self._where(r, "forward", group, "all-gather")
        self._gather(r, group)
        self._copy_out(r, group)
        r.free("fsdp.ag." + self.gathered)
        self.gathered = group

    def post_forward(self, r: Replay, group: str) -> None:
        if self.reshards:
            r.free("fsdp.un." + group)

    def root_returns(self, r: Replay) -> None:
        """The root's forward returns: the last flat all-gather output goes."""
        r.free("fsdp.ag." + self.gathered)
        self.gathered = ""

    def root_pre_backward(self, r: Replay) -> None:
        """The gradient of the root's output is ready: it prefetches the last block's all-gather."""
        if self.reshards:
            self._gather(r, f"b{self.depth - 1}")

    def pre_backward(self, r: Replay, i: int) -> None:
        """Block ``i``'s backward starts: copy-out, its flat output freed, the previous block prefetched."""
        if not self.reshards:
            return
        self._where(r, "backward", f"b{i}", "all-gather")
        self._copy_out(r, f"b{i}")
        r.free(f"fsdp.ag.b{i}")
        if i > 0:
            self._gather(r, f"b{i - 1}")

    def post_backward(self, r: Replay, group: str) -> None:
        """A group's gradients are reduced: its unsharded buffers go, then the previous
        reduce-scatter input; the new input is filled from the unsharded gradients, which
        go (but the last parameter's, which ``foreach_reduce``'s loop variable holds until
        it returns), and its output stays as the sharded gradients. On the CPU, gloo's
        reduce-scatter copies its input while it runs."""
        buffers = self._buffers(group)
        self._where(r, "backward", group, "reduce-scatter")
        r.free("fsdp.un." + group)
        r.free("fsdp.rs." + self.reducing)
        r.alloc("fsdp.rs." + group, buffers.reduce_in, B)
        prefix = f"g:{group}." if group != "root" else "g:"
        r.free(*[name for name in r.live if name.startswith(prefix) and not _in_block(name, group)])
        r.alloc("fsdp.last", buffers.last_grad, G)  # (freed with the rest, then held again: the same totals)
        out = "fsdp.grads." + group
        r.alloc(out, buffers.reduce_out, B if self.accumulates else G)
        if self.copies_input:
            r.alloc("fsdp.rs.copy", buffers.reduce_in, B)
            r.free("fsdp.rs.copy")
        r.free("fsdp.last")
        if self.accumulates:  # added into the sharded gradients; it goes when ``foreach_reduce`` returns
            r.free(out)
        self.reducing = group

    def end_backward(self, r: Replay) -> None:
        """The root's reduction runs when backward ends, and every reduce-scatter input goes."""
        self.post_backward(r, "root")
        r.free("fsdp.rs." + self.reducing)
        self.reducing = ""


def _in_block(name: str, group: str) -> bool:
    """A block's gradient (``g:b3.qkv.w``) when the root's are being collected."""
    return group == "root" and len(name) > 3 and name[2] == "b" and name[3].isdigit()
