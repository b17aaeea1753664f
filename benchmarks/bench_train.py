"""Finetune throughput: Ray Train (1 worker) vs a bare PyTorch loop, Ray start-up cost, data loading.

    flock /tmp/convtune-ray-tests.lock .venv/bin/python benchmarks/bench_train.py [--threads 2] [--size 32]

Prints images/s of
  * a bare loop (model, AdamW, CE, forward/backward/step) over the synthetic and the digits loaders,
  * `convtune`'s worker loop inside Ray Train with 1 worker on the same model, data and batch
    (its own per-epoch `images_per_s`, which excludes evaluation),
and their ratio (issue target >= 0.95), plus the start-up cost of a Ray Train run (`fit()` to the first
step, estimated as first report time minus the epoch's own duration). Bare-loop numbers are measured
before and after the Ray run and averaged, because other work on a small machine drifts.
With `--gpu` (on a CUDA machine) it measures --model at --size on the GPU instead: the bare loop and
convtune's worker loop in this process (`train_loop_per_worker`, no Ray), both with the autocast dtype
amp=auto picks (bf16 where native, else fp16), channels_last and cudnn.benchmark/TF32: images/s, their
ratio, and the bare loop's peak memory. `--skip-ray` on CPU prints the same in-process ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_loop(cfg, *, threads: int, warmup: int, steps: int, device: str = "cpu", amp=None,
              channels_last=False) -> dict:
    import timm
    import torch

    from trainers.data import build_loaders
    from trainers.loop import configure_cuda

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    configure_cuda(torch.device(device))
    loaders = build_loaders(cfg, cpus_per_worker=threads, pin_memory=device == "cuda")
    model = timm.create_model(cfg.model, num_classes=cfg.num_classes).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device) if amp == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def batches():
        while True:
            yield from loaders.train

    it = batches()
    seen, start = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = next(it)
        x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        seen += x.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    out = {"images_per_s": seen / (time.perf_counter() - start)}
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def convtune_loop(cfg, *, threads: int) -> dict:
    """`train_loop_per_worker` in this process (no Ray): median images/s of the epochs after the first."""
    from trainers.loop import LocalReporter, train_loop_per_worker

    reporter = LocalReporter()
    train_loop_per_worker({"finetune": cfg.to_dict(), "cpus_per_worker": threads}, reporter=reporter)
    later = [m["images_per_s"] for m in reporter.history[1:]]
    return {"images_per_s": statistics.median(later), "per_epoch": [round(m["images_per_s"], 1)
                                                                    for m in reporter.history]}


def ray_train(cfg, *, threads: int) -> dict:
    import ray

    from trainers.ray_run import run_finetune

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    first_report = {}
    t0 = time.monotonic()

    def on_progress(item):
        if item.get("kind") == "epoch" and "t" not in first_report:
            first_report.update(t=time.monotonic() - t0, epoch_s=item["epoch_s"])

    from trainers.ray_run import ensure_ray

    ensure_ray(None, num_cpus=threads)
    try:
        t0 = time.monotonic()
        result = run_finetune(cfg, num_workers=1, cpus_per_worker=threads, mlflow=None,
                              storage_path="/tmp/convtune-bench", name=f"bench-{int(time.time())}",
                              on_progress=on_progress)
    finally:
        ray.shutdown()
    later = [m["images_per_s"] for m in result.history[1:]]  # epoch 1 includes warm-up
    return {"images_per_s": statistics.median(later), "startup_s": first_report["t"] - first_report["epoch_s"],
            "per_epoch": [round(m["images_per_s"], 1) for m in result.history]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--epochs", type=int, default=4, help="Ray run epochs (the first is warm-up)")
    parser.add_argument("--skip-ray", action="store_true", help="time the convtune loop in this process instead")
    parser.add_argument("--gpu", action="store_true", help="CUDA: bare loop vs convtune loop, amp=auto + "
                        "channels_last")
    args = parser.parse_args()

    from trainers.config import FinetuneConfig

    base = dict(model=args.model, input_size=args.size, batch_size=args.batch)
    synthetic = FinetuneConfig(**base, dataset="synthetic", num_classes=10, synthetic_samples=args.batch * 64)
    digits = FinetuneConfig(**base)
    print(f"model {args.model}, {args.size} px, batch {args.batch}, {args.threads} thread(s)")

    loop_cfg = synthetic.with_overrides({"epochs": args.epochs, "steps_per_epoch_limit": args.steps,
                                         "warmup_epochs": 0.5, "smoothing": 0.0, "checkpoint_every": args.epochs})
    if args.gpu:
        import torch

        from trainers.loop import autocast_dtype

        gpu_cfg = loop_cfg.with_overrides({"loader_workers": 4})
        amp = autocast_dtype("auto", torch.device("cuda"))
        gpu = bare_loop(gpu_cfg, threads=args.threads, warmup=10, steps=args.steps, device="cuda", amp=amp,
                        channels_last=True)
        ours = convtune_loop(gpu_cfg, threads=args.threads)
        print(f"GPU {torch.cuda.get_device_name()}, autocast {amp}, channels_last")
        print(f"bare loop                 : {gpu['images_per_s']:8.1f} img/s, peak memory "
              f"{gpu['peak_mem_gib']:.2f} GiB")
        print(f"convtune loop, in process : {ours['images_per_s']:8.1f} img/s  per epoch {ours['per_epoch']}")
        print(f"ratio convtune / bare     : {ours['images_per_s'] / gpu['images_per_s']:.3f}  (target >= 0.95)")
        return 0

    bare_before = bare_loop(synthetic, threads=args.threads, warmup=5, steps=args.steps)["images_per_s"]
    bare_digits = bare_loop(digits, threads=args.threads, warmup=5, steps=args.steps)["images_per_s"]
    print(f"bare loop, synthetic data : {bare_before:8.1f} img/s")
    print(f"bare loop, digits data    : {bare_digits:8.1f} img/s  (digits/synthetic {bare_digits / bare_before:.2f})")
    if args.skip_ray:
        ours = convtune_loop(loop_cfg, threads=args.threads)
        print(f"convtune loop, in process : {ours['images_per_s']:8.1f} img/s  per epoch {ours['per_epoch']}")
        print(f"ratio convtune / bare     : {ours['images_per_s'] / bare_before:.3f}")
        return 0
    ray_result = ray_train(loop_cfg, threads=args.threads)
    bare_after = bare_loop(synthetic, threads=args.threads, warmup=5, steps=args.steps)["images_per_s"]
    bare = (bare_before + bare_after) / 2
    print(f"bare loop, synthetic again: {bare_after:8.1f} img/s  (mean {bare:.1f})")
    print(f"Ray Train, 1 worker       : {ray_result['images_per_s']:8.1f} img/s  per epoch {ray_result['per_epoch']}")
    print(f"ratio Ray Train / bare    : {ray_result['images_per_s'] / bare:.3f}  (target >= 0.95)")
    print(f"Ray Train start-up        : {ray_result['startup_s']:.1f} s from fit() to the first step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
