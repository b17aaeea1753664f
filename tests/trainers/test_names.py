"""The torch-free name lists the service validates specs with agree with the installed timm."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import timm.optim

from trainers.names import (
    CONVNEXTV2_MODELS,
    CONVNEXTV2_PRETRAINED,
    OPTIMIZER_NAMES,
    check_model_name,
    check_optimizer_name,
)


def test_lists_match_installed_timm():
    assert set(CONVNEXTV2_MODELS) == set(timm.list_models("convnextv2_*"))
    assert set(CONVNEXTV2_PRETRAINED) == set(timm.list_pretrained("convnextv2_*"))
    assert set(OPTIMIZER_NAMES) == set(timm.optim.list_optimizers())


def test_checks():
    assert check_model_name("convnextv2_tiny.fcmae_ft_in1k") == "convnextv2_tiny.fcmae_ft_in1k"
    with pytest.raises(ValueError, match="Did you mean convnextv2_tiny"):
        check_model_name("convnextv2_tinny")
    with pytest.raises(ValueError, match="unknown pretrained tag 'in21k' for convnextv2_tiny; available: fcmae"):
        check_model_name("convnextv2_tiny.in21k")
    assert check_optimizer_name("Lookahead_AdamW") == "lookahead_adamw"
    with pytest.raises(ValueError, match="unknown optimizer 'adamw_lookahead'"):
        check_optimizer_name("adamw_lookahead")


def test_spec_validation_needs_neither_torch_nor_timm():
    """What the torch-free service image does: validate a finetune config with names checked."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"
        "from trainers.config import FinetuneConfig\n"
        "FinetuneConfig(model='convnextv2_base', optimizer='lamb', schedule='half_cosine')\n"
        "try:\n    FinetuneConfig(model='resnet50')\nexcept Exception as e:\n    print('REJECTED', e)\n"
        "try:\n    FinetuneConfig(optimizer='adamww')\nexcept Exception as e:\n    print('REJECTED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("REJECTED") == 2
    assert "must be a timm convnextv2_* model, got 'resnet50'" in out.stdout and "unknown optimizer 'adamww'" in out.stdout
