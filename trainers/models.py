"""Model construction: a timm ConvNeXtV2 with the finetune head, optionally from pretrained weights."""

from __future__ import annotations

import logging

from torch import nn

from trainers.checkpoints import LoadReport, load_pretrained_weights
from trainers.config import FinetuneConfig

log = logging.getLogger(__name__)


class PretrainedWeightsUnavailable(RuntimeError):
    """timm could not fetch the hub weights (offline, or a tag that does not exist)."""


def build_model(cfg: FinetuneConfig) -> tuple[nn.Module, LoadReport | None]:
    """`cfg.model` from timm (hub weights when `pretrained`), then `cfg.checkpoint` on top when given."""
    import timm

    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=cfg.num_classes,
                                  drop_path_rate=cfg.drop_path, head_init_scale=cfg.head_init_scale)
    except (OSError, RuntimeError) as exc:
        if not cfg.pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"pretrained: could not load hub weights for {cfg.model!r} ({type(exc).__name__}: {exc}). "
            "Fix: run once with network access to fill the Hugging Face cache (HF_HOME), or download the "
            "checkpoint and set `checkpoint: /path/to/file` with `pretrained: false`.") from exc
    report = load_pretrained_weights(model, cfg.checkpoint, model_name=cfg.model) if cfg.checkpoint else None
    return model, report
