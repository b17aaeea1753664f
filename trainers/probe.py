"""A short measured probe of training speed: a few real steps of a finetune's model on this machine."""

from __future__ import annotations

import time

import torch

from trainers.config import FinetuneConfig


def images_per_second(cfg: FinetuneConfig, *, threads: int = 1, steps: int = 5, warmup: int = 2) -> float:
    """Training images per second of one worker (forward, backward, AdamW step) at ``cfg``'s model, input
    size and batch, on the GPU when there is one, else on ``threads`` CPU threads."""
    from trainers.models import build_model

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = build_model(cfg.model_copy(update={"pretrained": False, "checkpoint": None}))
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size, device=device)
        y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
        for i in range(warmup + steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * cfg.batch_size / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
