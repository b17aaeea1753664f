"""DDP gradient sync in the real worker loop: 2 processes in a gloo group (torch.multiprocessing, no Ray)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testkit import free_port
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import trainers.loop as loop
from trainers.config import FinetuneConfig


def _worker(rank: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    synced, models = [], []  # synced: one entry per backward that all-reduces (bucket 0 is in each of them)
    real_wrap = loop.wrap_for_ddp

    def wrap_and_count(model, env):
        ddp = real_wrap(model, env)
        models.append(model)

        def counting_hook(state, bucket):
            if bucket.index() == 0:
                synced.append(1)
            return allreduce_hook(state, bucket)  # the all-reduce DDP would do anyway

        ddp.register_comm_hook(None, counting_hook)
        return ddp

    loop.wrap_for_ddp = wrap_and_count
    reporter = loop.LocalReporter()
    try:
        loop.train_loop_per_worker({"finetune": cfg, "cpus_per_worker": 1}, reporter=reporter)
        torch.save({"synced": len(synced), "history": reporter.history, "params": models[0].state_dict()},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gradients_are_all_reduced_once_per_accumulation_window(tmp_path):
    # 2 ranks x accum_steps 4 x 2 updates = 8 micro-batches per rank: 2 synchronised backwards, not 8
    cfg = FinetuneConfig(dataset="synthetic", synthetic_samples=64, num_classes=10, input_size=32, batch_size=4,
                         accum_steps=4, steps_per_epoch_limit=2, epochs=1, warmup_epochs=0)
    mp.spawn(_worker, args=(free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["synced"] for r in results] == [2, 2]
    assert [r["history"][0]["step"] for r in results] == [2, 2]
    # the reported loss is the mean over both ranks' micro-batches, identical on both
    assert results[0]["history"][0]["train_loss"] == results[1]["history"][0]["train_loss"]
    for key, value in results[0]["params"].items():  # the windows' gradients did reach both ranks
        assert torch.allclose(value, results[1]["params"][key], atol=1e-6), key
