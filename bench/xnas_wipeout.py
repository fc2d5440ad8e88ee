"""XNAS wipeout: ops remaining and step time over one search, and the speed-up wipeout buys.

    python bench/xnas_wipeout.py [--data digits] [--root PATH] [--subset N] [--epochs 6]
        [--C 4] [--layers 3] [--batch-size 32] [--L 0.05] [--seed 0] [--repeats 5] [--threads 1]

``--data imagefolder --root /path/to/tree`` (``train/<class>/*``, ``test/<class>/*``) or
``--data cifar10 --root ...`` search on images instead of sklearn's digits.

Part 1 runs one XNAS search (``nestune.baselines.xnas.xnas_search``) and prints, per epoch,
the ops still active (of 2 × 14 edges × 8 ops, ``none`` included), the ops the supernet
computes (``none`` never is), how many were wiped out in the epoch, and the mean step time
as the search logged it, with its ratio to epoch 1. On a shared machine those step times are
noisy, so part 2 replays the search's own architecture states: a supernet of the same size
times one XNAS step (the expert update's forward/backward on an architecture batch plus the
ω step) at the op weights reached after each epoch, all states interleaved in every round,
median over ``--repeats`` rounds, and prints each state's speed-up over the full supernet.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from nestune.baselines.darts import make_weight_optimizer, weight_step
from nestune.baselines.xnas import xnas_search
from nestune.platform.data import load_data
from nestune.platform.distributed import Replicas
from nestune.search_spaces.darts import DartsSpace


def step_seconds(model, optimizer, batches, weights, repeats: int) -> list[float]:
    """Median seconds of one XNAS step at each architecture state, states interleaved."""
    (xw, yw), (xa, ya) = batches
    times = [[] for _ in weights]
    for _ in range(repeats + 1):  # the first round warms up
        for k, w in enumerate(weights):
            start = time.perf_counter()
            leaf = tuple(t.clone().requires_grad_(True) for t in w)
            loss = F.cross_entropy(model(xa, leaf), ya)
            torch.autograd.grad(loss, leaf, allow_unused=True)
            weight_step(model, optimizer, xw, yw, w, 5.0, Replicas())
            times[k].append(time.perf_counter() - start)
    return [float(np.median(t[1:])) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--root", default=None)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--C", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--L", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_data(args.data, root=args.root, subset=args.subset)
    print(f"data {args.data}: train {len(data.train)} (halved: weights / experts), "
          f"{data.in_channels}x{data.train.x.shape[-1]}px; supernet C={args.C} "
          f"layers={args.layers}; batch {args.batch_size}; L={args.L}; {args.threads} thread(s)")

    # -- part 1: the search and its own log
    start = time.perf_counter()
    result = xnas_search(data, epochs=args.epochs, C=args.C, layers=args.layers,
                         batch_size=args.batch_size, seed=args.seed, L=args.L)
    wall = time.perf_counter() - start
    extra = result.extra
    T, eta = extra["T"], extra["eta"]
    first = extra["first_wipeout_step"]
    space = DartsSpace(ops=tuple(extra["settings"]["ops"]))
    total = space.num_edges * space.num_ops
    print(f"\nsearch: {wall:.1f} s wall, T = {T} rounds ({extra['steps_per_epoch']} per epoch), "
          f"eta = {eta:.3f}, 2*eta*L*T = {2 * eta * args.L * T:.2f} (log-space margin at t = 0)")
    print("first op wiped out at round", first if first is None else f"{first} = {first / T:.2f} T")
    print(f"\n{'epoch':>5} {'rounds':>7} {'remaining n/r':>14} {'computed':>9} {'wiped':>6} "
          f"{'step s':>8} {'vs ep 1':>8}")
    s0 = extra["wipeout"][0]["step_seconds"]
    for e in extra["wipeout"]:
        rem, comp = e["ops_remaining"], e["ops_computed"]
        print(f"{e['epoch']:>5} {e['step']:>7} {rem['normal']:>6}/{rem['reduce']:<3}/{total:<3} "
              f"{comp['normal'] + comp['reduce']:>9} {len(e['removed']):>6} "
              f"{e['step_seconds']:>8.3f} {e['step_seconds'] / s0:>8.2f}")
    none = space.ops.index("none") if "none" in space.ops else None
    if none is not None:
        led = sum(int(((torch.isfinite(a).sum(1) == 1) & torch.isfinite(a[:, none])).sum())
                  for a in result.alphas)
        print(f"edges won by none (derived from the real op wiped out last): {led} of "
              f"{2 * space.num_edges}")
    print("genotype:", result.genotype)

    # -- part 2: the same states, timed back to back
    torch.manual_seed(args.seed)
    model = space.supernet(C=args.C, layers=args.layers, num_classes=data.num_classes,
                           in_channels=data.in_channels)
    model.train()
    optimizer = make_weight_optimizer(model, 0.025, 0.9, 3e-4)
    n = min(args.batch_size, len(data.train) // 2)
    batches = ((data.train.x[:n], data.train.y[:n]), (data.train.x[n:2 * n], data.train.y[n:2 * n]))
    states = [tuple(torch.tensor(snap[cell]) for cell in ("normal", "reduce"))
              for snap in extra["history"]["weights"]]
    seconds = step_seconds(model, optimizer, batches, states, args.repeats)
    print(f"\nreplayed states (median of {args.repeats} interleaved rounds, batch {n}):")
    print(f"{'after epoch':>11} {'computed':>9} {'step s':>8} {'speed-up':>9}")
    real = torch.tensor([op != "none" for op in space.ops])
    computed = []
    for k, (w, sec) in enumerate(zip(states, seconds, strict=True)):
        computed.append(sum(int(((t != 0) & real).sum()) for t in w))
        print(f"{k:>11} {computed[-1]:>9} {sec:>8.3f} {seconds[0] / sec:>8.2f}x")
    print(f"\nlogged speed-up, epoch 1 -> epoch {len(extra['wipeout'])}: {extra['speedup']:.2f}x; "
          f"replayed, full supernet -> final state: {seconds[0] / seconds[-1]:.2f}x")
    if len(set(computed)) > 1:
        # Step time against ops computed is close to a line (a fixed part: stem, preprocessing,
        # classifier; plus a part per op): fit it on the replayed states, then price every
        # round of the search at the ops it computed.
        b, a = np.polyfit(computed, seconds, 1)
        per_round = a + b * result.arrays["computed_ops"]
        full = T * (a + b * computed[0])
        print(f"step s ~= {a:.4f} + {b:.5f} x ops computed; the whole search at those prices: "
              f"{per_round.sum():.1f} s against {full:.1f} s without wipeout "
              f"({full / per_round.sum():.2f}x)")
    else:
        print("no op was wiped out: no speed-up")

if __name__ == "__main__":
    main()
