"""FinetuneConfig: defaults, serialisation, overrides, field-named errors, epoch -> update conversion."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainers.config import FinetuneConfig, check_field_names, format_validation_error, parse_override
from trainers.schedules import build_lr_schedule


def errors_of(**values) -> str:
    with pytest.raises((ValidationError, ValueError)) as info:
        FinetuneConfig.from_dict(values)
    return format_validation_error(info.value)


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = FinetuneConfig()
    path = tmp_path / "ft.yaml"
    path.write_text(cfg.to_yaml())
    assert FinetuneConfig.from_file(path) == cfg
    assert FinetuneConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_architecture_field_names_exist():
    # sweeps validate parameter names against these (docs/architecture.md)
    for name in ("model", "num_classes", "input_size", "dataset", "data_root", "epochs", "batch_size", "accum_steps",
                 "blr", "lr", "min_lr", "warmup_epochs", "warmup_steps", "schedule", "milestones", "gamma",
                 "cycles", "power", "optimizer", "weight_decay", "weight_decay_end", "layer_decay",
                 "layer_decay_type", "drop_path", "smoothing", "mixup", "cutmix", "model_ema", "seed",
                 "steps_per_epoch_limit"):
        assert name in FinetuneConfig.model_fields, name


def test_with_overrides_validates_the_whole_config():
    cfg = FinetuneConfig().with_overrides({"layer_decay": 0.75, "schedule": "multistep", "milestones": [2, 4]})
    assert cfg.layer_decay == 0.75 and cfg.milestones == [2, 4]
    with pytest.raises(ValidationError):
        cfg.with_overrides({"milestones": [2, 9]})  # beyond epochs=5
    with pytest.raises(ValueError, match="did you mean layer_decay"):
        cfg.with_overrides({"layer_decy": 0.8})


@pytest.mark.parametrize(("values", "expected"), [
    ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
    ({"layer_decay": 1.5}, "layer_decay: Input should be less than or equal to 1"),
    ({"layer_decay": 0}, "layer_decay: Input should be greater than 0"),
    ({"drop_path": 1.0}, "drop_path: Input should be less than 1"),
    ({"smoothing": -0.1}, "smoothing: Input should be greater than or equal to 0"),
    ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
    ({"model": "resnet50"}, "model: must be a timm convnextv2_* model"),
    ({"model": "convnextv2_gigantic"}, "model: unknown model 'convnextv2_gigantic'; choose one of"),
    ({"optimizer": "adamx"}, "optimizer: unknown optimizer 'adamx'. Did you mean adamax"),
    ({"schedule": "cosin"}, "schedule: unknown schedule 'cosin'; choose one of cosine"),
    ({"dataset": "cifar"}, "dataset: Input should be 'digits', 'imagefolder' or 'synthetic'"),
    ({"num_classes": 100}, "num_classes: the digits dataset has 10 classes"),
    ({"dataset": "imagefolder", "num_classes": 5}, "data_root: required when dataset is imagefolder"),
    ({"warmup_epochs": 5}, "warmup_epochs: must be below epochs (5)"),
    ({"milestones": [3, 2]}, "milestones: Value error, must be increasing"),
    ({"amp": "fp8"}, "amp: Input should be 'auto', 'bf16', 'fp16' or 'off'"),
    ({"aa": "randaugment9"}, "aa: not a timm auto-augment string"),
])
def test_bad_values_name_the_field_and_the_range(values, expected):
    message = errors_of(**values)
    assert expected.replace("Value error, ", "") in message, message


def test_unknown_fields_are_rejected_with_a_hint():
    with pytest.raises(ValueError, match=r"warmup_epoch \(did you mean warmup_epochs\?\)"):
        check_field_names({"warmup_epoch": 3})


def test_parse_override_reads_yaml_values():
    assert parse_override("lr=1e-3") == ("lr", 1e-3)
    assert parse_override("milestones=[3, 4]") == ("milestones", [3, 4])
    assert parse_override("checkpoint=null") == ("checkpoint", None)
    with pytest.raises(ValueError, match="field=value"):
        parse_override("lr")


def test_schedule_kwargs_convert_epochs_to_updates():
    cfg = FinetuneConfig(epochs=10, warmup_epochs=1.5, schedule="multistep", milestones=[4, 8], batch_size=32,
                         accum_steps=2, blr=1e-3)
    kw = cfg.schedule_kwargs(updates_per_epoch=20, world_size=4)
    assert kw["total_steps"] == 200 and kw["warmup_steps"] == 30
    assert kw["milestones"] == (80, 160)
    assert kw["base_lr"] == pytest.approx(1e-3 * 32 * 2 * 4 / 256)
    schedule = build_lr_schedule(**kw)
    assert schedule.lr_at(0) == 0.0 and schedule.lr_at(30) == pytest.approx(kw["base_lr"])
    assert schedule.lr_at(80) == pytest.approx(kw["base_lr"] * 0.1)

    steps = cfg.with_overrides({"warmup_steps": 7, "schedule": "step", "step_size": 2.5})
    kw = steps.schedule_kwargs(updates_per_epoch=20, world_size=1)
    assert kw["warmup_steps"] == 7 and kw["step_size"] == 50
    assert FinetuneConfig(lr=0.01).resolved_lr(world_size=8) == 0.01
