"""Hand-sharded TP maths on plain torch.distributed (no Megatron): spectra of a known matrix from its shards."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import counting_dist  # noqa: E402
from sara_ds.sharding.tensor_parallel import TensorParallelContext  # noqa: E402
from sara_ds.subspace import refresh_generator  # noqa: E402

M, N, RANK = 256, 64, 8


def known_matrix():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(M, N, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64)).Q
    sigma = 10.0 * 0.85 ** torch.arange(N, dtype=torch.float64)  # 10 ... 3.5e-4: a 3e4 condition number
    return u @ torch.diag(sigma) @ v.T, sigma


def main(out):
    dist.init_process_group("gloo")
    counter = counting_dist.install()
    rank, world = dist.get_rank(), dist.get_world_size()
    full, sigma = known_matrix()
    results = {}
    for pd in (0, 1):
        mat = full if pd == 0 else full.T.contiguous()           # pd=1: the N x M matrix, columns sharded
        local = mat.chunk(world, dim=pd)[rank].float()
        left = pd == 1
        for method in ("tsqr", "gram", "sketch"):
            spec = TensorParallelContext(dist.group.WORLD, pd, method, oversample=8, power_iters=2)
            counter.clear()
            s, vecs = spec.spectrum(local, left, refresh_generator(0, 0, 0), RANK)
            basis = spec.synchronize(vecs[:, :RANK].contiguous())
            results[f"{method}-pd{pd}"] = dict(sigma=s.double(), basis=basis.double(), bytes=spec.bytes_sent,
                                              wire=list(counter.records), local_rows=local.shape[0] if pd == 0 else local.shape[1])
    # ZeRO-3's row blocks: the rows split unevenly (one rank holds more), the basis on the whole axis; 'gather'
    # forms the spectrum on the last rank alone
    counts = [M // world - 3] * (world - 1) + [M - (M // world - 3) * (world - 1)]
    start = sum(counts[:rank])
    local = full[start:start + counts[rank]].float()
    for method in ("tsqr", "gram", "sketch", "gather"):
        spec = TensorParallelContext(dist.group.WORLD, 0, method, oversample=8, power_iters=2, counts=counts,
                                     root=world - 1)
        counter.clear()
        spectrum = spec.spectrum(local, False, refresh_generator(0, 0, 0), RANK)
        s, vecs = spectrum if spectrum is not None else (None, torch.empty(N, RANK))
        basis = spec.synchronize(vecs[:, :RANK].contiguous())
        results[f"uneven-{method}"] = dict(sigma=None if s is None else s.double(), basis=basis.double(),
                                           bytes=spec.bytes_sent, full_shape=spec.full_shape(local.shape),
                                           counts=counts)
    counter.enabled = False
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
