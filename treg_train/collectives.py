"""FSDP2's all-gather and reduce-scatter over gloo, as exchanges between pairs of processes.

Gloo's own all-gather and reduce-scatter are slow: on 2 processes, for a buffer of 12 M fp32 values, they take 53 ms
and 63 ms, longer than gloo's all-reduce of the whole buffer (30 ms), which moves twice the data. Each process
sending every other its chunk with isend/irecv moves the least data: 17 ms and 20 ms (the reduce-scatter's sum
included); on 4 processes 38 ms and 52 ms against gloo's 97 ms and 132 ms (pipelines/bench/gloo_collectives.py,
docs/BENCHMARKS.md). In round i of w - 1, process r sends to r + i and receives from r - i (mod w), so that every
receive has its send in the same round.

The values are FSDP2's own (on 2 processes to the bit: a sum of two terms does not depend on their order). No
memory is added on 2 processes; on more, a reduce-scatter holds one chunk more. NCCL keeps FSDP2's own."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

try:  # FSDP2's interfaces for custom collectives and its plain buffer allocation, in recent torch only
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin
except ImportError:
    AllGather = ReduceScatter = None
    DefaultAllocMixin = object


def _peers(group, round_: int) -> tuple[int, int]:
    """Whom this process sends to and receives from in `round_` (1 to w - 1), as ranks in `group`."""
    rank, size = group.rank(), group.size()
    return (rank + round_) % size, (rank - round_) % size


def _exchange(group, send: torch.Tensor, to: int, receive: torch.Tensor, sender: int) -> list:
    return [dist.isend(send, group=group, group_dst=to), dist.irecv(receive, group=group, group_src=sender)]


class PairwiseAllGather(DefaultAllocMixin, AllGather or object):
    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        chunks = output_tensor.view(group.size(), -1)
        mine = chunks[group.rank()]
        if mine.data_ptr() != input_tensor.data_ptr():  # FSDP2 copies the shard in place; in case it did not
            mine.copy_(input_tensor)
        works = []
        for round_ in range(1, group.size()):  # distinct buffers: every round at once
            to, sender = _peers(group, round_)
            works += _exchange(group, mine, to, chunks[sender], sender)
        for work in works:
            work.wait()


class PairwiseReduceScatter(DefaultAllocMixin, ReduceScatter or object):
    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):  # what FSDP2 asks of gloo; anything else, gloo's own
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        chunks = input_tensor.view(group.size(), -1)
        spare = torch.empty_like(output_tensor) if group.size() > 2 else None
        for round_ in range(1, group.size()):  # one round at a time: one buffer receives them all
            to, sender = _peers(group, round_)
            into = output_tensor if round_ == 1 else spare
            for work in _exchange(group, chunks[to], to, into, sender):
                work.wait()
            if into is spare:
                output_tensor.add_(spare)
        output_tensor.add_(chunks[group.rank()])
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(group.size())


def use_pairwise_collectives(model: nn.Module) -> bool:
    """Give every FSDP2 unit of `model` the collectives above; False where this torch cannot take them."""
    from torch.distributed.fsdp import FSDPModule

    if AllGather is None or not hasattr(FSDPModule, "set_custom_reduce_scatter"):
        return False
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(PairwiseAllGather())
            module.set_custom_reduce_scatter(PairwiseReduceScatter())
    return True
