"""FSDP2 (``fully_shard``) around a block with the fused PolyNorm: same gradients as unsharded.

A one-process gloo group on CPU: it checks that the custom ops run on the unsharded parameters
FSDP2 hands to the module and that the coefficient gradients flow back into the sharded DTensors.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from polycom import PolyNorm, PolyReLU
from polycom.ops import cpu

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason="fused CPU kernels could not be built"),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


@pytest.fixture
def one_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("act", [PolyNorm, PolyReLU])
def test_fully_shard_matches_unsharded(act, one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def block():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 40), act(impl="cpu"), nn.Linear(40, 16))

    plain, sharded = block(), block()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
    x = torch.randn(3, 5, 16)
    plain(x).square().mean().backward()
    sharded(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters(), strict=True):
        assert type(b).__name__ == "DTensor"
        torch.testing.assert_close(b.grad.full_tensor(), a.grad, msg=name)
