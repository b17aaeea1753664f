"""The estimate's FLOP table matches timm, and the measured probe runs the spec's model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from search_spaces.estimate import MODEL_GFLOPS_224, forward_gflops


def test_the_flop_table_is_timms_count_for_every_convnextv2():
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    assert set(MODEL_GFLOPS_224) == set(timm.list_models("convnextv2_*"))
    for name, gflops in MODEL_GFLOPS_224.items():
        with torch.device("meta"):  # shapes only: no weights, no arithmetic
            model = timm.create_model(name, num_classes=1000)
            x = torch.empty(1, 3, 224, 224)
        with FlopCounterMode(display=False) as counter:
            model(x)
        assert counter.get_total_flops() / 1e9 == pytest.approx(gflops, abs=5e-4), name
    assert forward_gflops("convnextv2_tiny.fcmae_ft_in22k_in1k_384", 448) == pytest.approx(8.911 * 4)


def test_dry_run_probe_measures_this_machine(tmp_path):
    out = subprocess.run([sys.executable, "-m", "service.cli", "sweep", "quickstart", "--dry-run", "--probe"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "images/s per worker" in out.stderr
    assert "estimate:" in out.stdout and "time: unknown" not in out.stdout
