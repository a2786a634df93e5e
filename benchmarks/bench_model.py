"""Model/loss cost on this machine: prints figures, it is not a test.

    python benchmarks/bench_model.py [--batch 32] [--repeats 3] [--threads N]

1. Parameter count and latent shape: seed (128 px), quick (64 px), smoke, original, and the
   single-change ablations of the seed model.
2. FLOPs per image (torch.utils.flop_counter.FlopCounterMode: convs, matmuls and attention;
   norms/activations/interpolation are not counted), forward and forward+backward, for the
   model alone and for model + full training loss.
3. Wall time of one training step (forward + loss + backward, no optimizer step) for a batch at
   128 px with the seed config, median of --repeats after one warm-up, with and without the
   perceptual loss. The VGG16 here has RANDOM weights (loss.vgg_weights=random; no download):
   the cost is identical to ImageNet weights, the values are not.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spatialvae.config import get_preset  # noqa: E402
from spatialvae.losses import build_loss  # noqa: E402
from spatialvae.model import build_model, count_parameters  # noqa: E402


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_fn(model, loss_fn, x, beta=1e-3):
    def run():
        recon, mu, logvar = model(x)
        total, _ = loss_fn(recon, x, mu, logvar, beta)
        return total
    return run


def time_step(model, loss_fn, x, repeats: int) -> list:
    run = step_fn(model, loss_fn, x)
    times = []
    for i in range(repeats + 1):  # first one is the warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        run().backward()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # "random VGG" is stated in the labels below; keep the warning out of the table.
    warnings.filterwarnings("ignore", message=".*RANDOM VGG16.*")
    logging.getLogger("spatialvae.losses").setLevel(logging.ERROR)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device cpu (fp32)")

    # ---- 1. sizes ----
    print("\n== parameters and latent ==")
    print(f"{'config':<34} {'image':>5} {'params':>12} {'latent':>12} {'latent values':>13}")
    rows = [(name, get_preset(name)) for name in ("seed", "quick", "smoke", "original")]
    for label, over in [("seed, no attention", ["model.attention_resolutions=[]"]),
                        ("seed, transposed upsampling", ["model.upsample=transposed"])]:
        rows.append((label, get_preset("seed").with_overrides(over)))
    for name, cfg in rows:
        m = build_model(cfg)
        n_lat = 1
        for s in m.latent_shape:
            n_lat *= s
        print(f"{name:<34} {cfg.data.image_size:>5} {count_parameters(m):>12,} {str(m.latent_shape):>12} {n_lat:>13,}")

    # ---- 2. FLOPs ----
    print("\n== FLOPs per image (FlopCounterMode; batch of 2, divided by 2) ==")
    torch.manual_seed(0)
    seed = get_preset("seed")
    seed_random_vgg = seed.with_overrides(["loss.vgg_weights=random"])
    no_perc = seed.with_overrides(["loss.perceptual_weight=0"])
    cases = [
        ("seed model", seed, None),
        ("seed model + loss, no perceptual", seed, build_loss(no_perc)),
        ("seed model + loss with VGG16 perceptual", seed, build_loss(seed_random_vgg)),
        ("original model", get_preset("original"), None),
    ]
    print(f"{'':<42} {'forward':>12} {'fwd+bwd':>12}")
    for label, cfg, loss_fn in cases:
        model = build_model(cfg)
        x = torch.rand(2, 1, cfg.data.image_size, cfg.data.image_size)
        if loss_fn is None:
            fwd = flops(lambda: model(x))
            both = flops(lambda: model(x)[0].mean().backward())
        else:
            run = step_fn(model, loss_fn, x)
            fwd = flops(lambda: run())
            both = flops(lambda: run().backward())
        print(f"{label:<42} {fwd / 2 / 1e9:>9.2f} GF {both / 2 / 1e9:>9.2f} GF")

    # ---- 3. wall time ----
    b = args.batch
    print(f"\n== one training step (forward + loss + backward), batch {b} at 128 px, seed config, "
          f"median of {args.repeats} after a warm-up ==")
    torch.manual_seed(0)
    model = build_model(seed)
    x = torch.rand(b, 1, 128, 128)
    for label, cfg in [("L1 + SSIM + KL (perceptual_weight=0)", no_perc),
                       ("L1 + SSIM + KL + perceptual (RANDOM VGG16 weights)", seed_random_vgg)]:
        loss_fn = build_loss(cfg)
        times = time_step(model, loss_fn, x, args.repeats)
        med = statistics.median(times)
        print(f"{label:<52} {med:7.2f} s/step  ({med / b * 1e3:6.1f} ms/image; runs: "
              f"{', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
