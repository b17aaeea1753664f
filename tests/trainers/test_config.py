"""FinetuneConfig: defaults, serialisation, overrides, field-named errors, epoch -> update conversion."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainers.config import (
    FinetuneConfig,
    check_field_names,
    check_resume_config,
    format_validation_error,
    parse_override,
)
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
    # settings the worker used to refuse after set-up (issue 12.21) and one mixup could not run (12.18)
    ({"warmup_mode": "exp"}, "warmup_mode: Input should be 'linear' or 'constant'"),
    ({"schedule": "step"}, "step_size: schedule 'step' needs step_size"),
    ({"schedule": "multistep"}, "milestones: schedule 'multistep' needs milestones"),
    ({"lr": 1e-7}, "min_lr: 1e-06 is above lr 1e-07; set min_lr below lr"),
    ({"blr": 1e-6, "batch_size": 8}, "min_lr: 1e-06 is above the lr that blr gives on one worker"),
    ({"mixup": 0.8, "batch_size": 15}, "batch_size: mixup/cutmix mixes pairs of images, so the batch must be even; "
                                       "got 15: set batch_size=16"),
    ({"cutmix": 1.0, "batch_size": 7}, "batch_size: mixup/cutmix mixes pairs"),
    ({"warmup_steps": 10**6, "steps_per_epoch_limit": 5, "epochs": 1},
     "warmup_steps: 1000000 updates asked, but the run has at most 5"),
    # the default warmup (1 epoch) with epochs=1: the message says exactly what to set
    ({"epochs": 1}, "warmup_epochs: must be below epochs (1), got 1.0; set warmup_epochs=0.2"),
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


def test_even_batch_with_mixup_and_odd_batch_without_are_fine():
    assert FinetuneConfig(mixup=0.8, batch_size=16).batch_size == 16
    assert FinetuneConfig(batch_size=15).batch_size == 15


@pytest.mark.parametrize(("updates_per_epoch", "rounded"), [(1, "[0, 0]"), (2, "[0, 1]")])
def test_milestones_that_round_together_name_the_field(updates_per_epoch, rounded):
    cfg = FinetuneConfig(schedule="multistep", milestones=[0.2, 0.4])
    with pytest.raises(ValueError, match=rf"milestones: \[0.2, 0.4\] epochs are updates \{rounded}\ at "
                                         rf"{updates_per_epoch} updates per epoch"):
        build_lr_schedule(**cfg.schedule_kwargs(updates_per_epoch=updates_per_epoch, world_size=1))
    kw = cfg.schedule_kwargs(updates_per_epoch=10, world_size=1)  # enough updates: 2 and 4
    assert kw["milestones"] == (2, 4)


def test_a_warmup_longer_than_the_run_reports_what_was_asked():
    cfg = FinetuneConfig(epochs=1, warmup_steps=10**6)
    with pytest.raises(ValueError, match=r"warmup_steps: 1000000 updates is not shorter than the run "
                                         r"\(1 epochs x 5 updates per epoch = 5 updates\); set warmup_steps below 5"):
        build_lr_schedule(**cfg.schedule_kwargs(updates_per_epoch=5, world_size=1))
    short = FinetuneConfig(epochs=2, warmup_epochs=1.9)  # rounds to the whole run at one update per epoch
    with pytest.raises(ValueError, match=r"warmup_epochs: 1.9 epochs \(2 updates\) is not shorter than the run"):
        short.schedule_kwargs(updates_per_epoch=1, world_size=1)


def test_resume_refuses_changed_settings_and_lists_every_difference():
    saved = FinetuneConfig(batch_size=32, epochs=5).to_dict()
    check_resume_config(saved, FinetuneConfig(batch_size=32, epochs=5, loader_workers=3))  # execution only: fine
    check_resume_config({k: v for k, v in saved.items() if k != "epochs"}, FinetuneConfig(batch_size=32, epochs=5))
    with pytest.raises(ValueError, match="cannot resume") as info:
        check_resume_config(saved, FinetuneConfig(batch_size=64, epochs=8, milestones=[]))
    message = str(info.value)
    assert "batch_size: 32 in the checkpoint, 64 now" in message and "epochs: 5 in the checkpoint, 8 now" in message
    assert "milestones" not in message and "another run name" in message


def test_resuming_a_run_with_another_batch_size_is_refused_by_the_loop(tmp_path):
    """A reused run name restores the last checkpoint; with another batch size the schedule would silently change."""
    from trainers.loop import LocalReporter, train_loop_per_worker

    cfg = FinetuneConfig(input_size=32, batch_size=16, steps_per_epoch_limit=1, epochs=2, warmup_epochs=0.5)
    first = LocalReporter(tmp_path / "first")
    train_loop_per_worker({"finetune": cfg.to_dict(), "cpus_per_worker": 2}, reporter=first)
    changed = cfg.with_overrides({"batch_size": 8, "epochs": 3})
    with pytest.raises(ValueError, match=r"epochs: 2 in the checkpoint, 3 now\n  batch_size: 16 in the checkpoint, 8 now"):
        train_loop_per_worker({"finetune": changed.to_dict(), "cpus_per_worker": 2,
                               "resume_from": str(first.checkpoints[0])}, reporter=LocalReporter())


def test_a_ray_train_trials_driver_validates_without_importing_timm():
    """The trial driver validates every setting but the timm-parsed auto-augment string; workers check that."""
    import subprocess
    import sys

    code = ("import sys; from trainers.config import FinetuneConfig; "
            "FinetuneConfig.validate_torch_free({'aa': 'rand-m9-mstd0.5-inc1'}); "
            "assert 'timm' not in sys.modules and 'torch' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    with pytest.raises(ValidationError, match="batch_size"):  # the other checks still apply
        FinetuneConfig.validate_torch_free({"batch_size": 0})
    with pytest.raises(ValidationError, match="auto-augment"):  # the full validation parses it with timm
        FinetuneConfig.model_validate({"aa": "rand-nonsense-x9"})
