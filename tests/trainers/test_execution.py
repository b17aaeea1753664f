"""How a worker runs on its device: autocast dtype, loss scaling, CUDA backends, memory format.

No GPU runs in CI: these call the same functions the loop calls, with a CUDA `torch.device` (creating one
needs no GPU) and, where torch must ask the GPU, its answer patched in.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainers.config import FinetuneConfig
from trainers.loop import WorkerEnv, autocast_dtype, configure_cuda, grad_scaler, memory_format_for

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.fixture
def bf16_support(monkeypatch):
    """torch.cuda.is_bf16_supported as on a GPU: native bf16 (Ampere+) or only emulated (Turing, V100)."""
    asked = []

    def answer(native: bool):
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            asked.append(including_emulation)
            return native or including_emulation

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        return asked

    return answer


def test_amp_auto_uses_native_bf16_on_ampere_and_later(bf16_support):
    asked = bf16_support(native=True)
    assert autocast_dtype("auto", CUDA) == torch.bfloat16
    assert asked == [False]
    assert grad_scaler(torch.bfloat16, CUDA) is None


def test_amp_auto_never_picks_emulated_bf16(bf16_support):
    bf16_support(native=False)
    dtype = autocast_dtype("auto", CUDA)
    assert dtype == torch.float16
    assert isinstance(grad_scaler(dtype, CPU), torch.amp.GradScaler)  # fp16 always comes with loss scaling


def test_amp_auto_is_off_on_cpu_and_explicit_choices_are_kept():
    assert autocast_dtype("auto", CPU) is None and grad_scaler(None, CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16
    assert autocast_dtype("fp16", CUDA) == torch.float16 and autocast_dtype("off", CUDA) is None


@pytest.fixture
def restore_backends():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_gets_cudnn_benchmark_and_tf32(restore_backends):
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    configure_cuda(CPU)
    assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32)
    configure_cuda(CUDA)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_channels_last_auto_is_on_for_gpu_only():
    auto = FinetuneConfig()
    assert memory_format_for(auto, CUDA) == torch.channels_last
    assert memory_format_for(auto, CPU) == torch.contiguous_format
    assert memory_format_for(FinetuneConfig(channels_last=True), CPU) == torch.channels_last
    assert memory_format_for(FinetuneConfig(channels_last=False), CUDA) == torch.contiguous_format


def test_a_plain_torch_distributed_worker_takes_its_rank_s_gpu(monkeypatch):
    # outside Ray (torchrun-style group): rank r of a node with n GPUs trains on cuda:(r % n); no GPU: the CPU
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env = WorkerEnv.detect()
    assert (env.rank, env.world_size, env.device, env.in_ray) == (3, 4, torch.device("cuda", 1), False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert WorkerEnv.detect().device == CPU
