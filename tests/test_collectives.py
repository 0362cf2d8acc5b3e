"""treg_train.collectives: over gloo, FSDP2 with the pairwise collectives computes what it computes with its own (on
2 processes to the bit; on 3 the sums of three terms may round otherwise), under both shardings that gather
(full_shard, shard_grad_op), computing in fp32 or bf16, with gradients accumulated over two micro-batches; and the
pairwise collectives are the ones called."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# (reshard_after_forward, param_dtype): full_shard and shard_grad_op in fp32, and full_shard computing in bf16.
SETTINGS = [(True, None), (False, None), (True, torch.bfloat16)]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # odd sizes, so that FSDP2 pads the shards
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 13), nn.Tanh(), nn.Linear(13, 3))


def _train_step(pairwise: bool, reshard_after_forward: bool, param_dtype) -> tuple[list[float], dict, int]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from treg_train.collectives import use_pairwise_collectives

    model = _model(seed=0)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model[::2]:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if pairwise:
        assert use_pairwise_collectives(model)
    sends, isend = 0, dist.isend

    def counted(*args, **kwargs):
        nonlocal sends
        sends += 1
        return isend(*args, **kwargs)

    dist.isend = counted  # in this spawned process only
    torch.manual_seed(1 + dist.get_rank())  # each rank its own data
    losses = []
    try:
        for micro in range(2):
            model.set_requires_gradient_sync(micro == 1)
            loss = model(torch.randn(5, 7)).float().square().mean()
            loss.backward()
            losses.append(loss.item())
    finally:
        dist.isend = isend
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    return losses, grads, sends


def _worker(rank: int, world_size: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        out = {setting: {"own": _train_step(False, *setting), "pairwise": _train_step(True, *setting)}
               for setting in SETTINGS}
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_pairwise_collectives_compute_fsdp2s_own_values(tmp_path, world_size):
    results = tmp_path / "results"
    mp.spawn(_worker, args=(world_size, str(tmp_path / "store"), str(results)), nprocs=world_size)
    exact = world_size == 2
    for rank in range(world_size):
        out = torch.load(f"{results}.{rank}")
        assert out.keys() == set(SETTINGS)
        for setting, runs in out.items():
            own_losses, own_grads, own_sends = runs["own"]
            losses, grads, sends = runs["pairwise"]
            assert losses == pytest.approx(own_losses, rel=0 if exact else 1e-6), (rank, setting)
            assert grads.keys() == own_grads.keys()
            for name in grads:
                if exact:
                    assert torch.equal(grads[name], own_grads[name]), (rank, setting, name)
                else:
                    torch.testing.assert_close(grads[name], own_grads[name], rtol=1e-6, atol=1e-7)
            # Each of the 3 units gathers once at least and reduce-scatters once, sending to every other process.
            assert own_sends == 0 and sends >= 2 * 3 * (world_size - 1), (rank, setting, own_sends, sends)
