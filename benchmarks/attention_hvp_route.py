"""fwd_rev Hutchinson on a causal-SDPA block: attention routed through the attention HVP kernel vs the plain path.

``fasthess.diag(method="hutchinson", engine="fwd_rev")`` on one block (embedding, qkv projection,
``F.scaled_dot_product_attention(is_causal=True)``, residual, output layer; d=64, 4 heads, batch 2),
16 probes in one chunk, medians of ``--repeats`` runs, with the route off ("plain": the math-path
decomposition), on with the ``torch`` backend and on with the ``cpp`` backend, in the same process.
Prints the time ratio against "plain" and the largest difference of the estimates (same probes).

    OMP_NUM_THREADS=1 python benchmarks/attention_hvp_route.py --T 64,256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fasthess  # noqa: E402
from fasthess.kernels.attention_hvp import family  # noqa: E402
from fasthess.kernels.attention_hvp import forward_over_reverse as route_module  # noqa: E402
from fasthess.kernels.registry import use_backend  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return self.out(x + a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="64,256")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model = Block().eval()
    routed = route_module.routed
    for t in (int(x) for x in a.T.split(",")):
        ids = torch.randint(0, 50, (2, t + 1))

        def loss() -> torch.Tensor:
            return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

        res = {}
        for name in ["plain"] + [b for b in ("torch", "cpp") if b in family.available()]:
            route_module.routed = (lambda: False) if name == "plain" else routed
            with use_backend("torch" if name == "plain" else name):
                times = []
                for _ in range(a.repeats + 1):  # the first run warms up
                    t0 = time.perf_counter()
                    r = fasthess.diag(model, loss, ["qkv.weight"], method="hutchinson", num_probes=16,
                                      engine="fwd_rev", seed=0, chunk_size=16)
                    times.append(time.perf_counter() - t0)
            route_module.routed = routed
            res[name] = (statistics.median(times[1:]), r.layers["qkv.weight"].values)
        base_t, base_v = res["plain"]
        for name, (sec, val) in res.items():
            print(f"T={t:4d} {name:6s} {sec * 1e3:9.1f} ms  x{base_t / sec:.2f} vs plain  "
                  f"max|diff| {float((val - base_v).abs().max()):.1e} (max|value| {float(base_v.abs().max()):.1e})",
                  flush=True)


if __name__ == "__main__":
    main()
