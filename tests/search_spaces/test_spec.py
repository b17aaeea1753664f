"""The sweep spec: loading, every error naming its field, grids, conditionals, the dry run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from search_spaces.estimate import TRIAL_OVERHEAD_S
from search_spaces.spec import (
    SpecError,
    check_resources,
    cluster_capacity,
    count_trials,
    dry_run,
    expected_epochs_per_trial,
    grid_points,
    list_presets,
    load_preset,
    load_spec,
    max_concurrent_trials,
    resolve_spec_source,
    sample_params,
    spec_json_schema,
    trial_finetune,
)

BASE = {"model": "convnextv2_atto", "dataset": "digits", "epochs": 4, "steps_per_epoch_limit": 2}


def spec(**overrides):
    data = {
        "name": "t",
        "base": dict(BASE),
        "space": {
            "layer_decay": {"type": "uniform", "low": 0.6, "high": 0.95},
            "blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "schedule": {"type": "choice", "values": ["cosine", "multistep", "cosine_restarts"]},
            "milestones": {"type": "choice", "values": [[1], [2, 3]], "when": {"schedule": "multistep"}},
            "cycles": {"type": "randint", "low": 2, "high": 3, "when": {"schedule": "cosine_restarts"}},
        },
    }
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def errors_of(data) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        load_spec(data)
    return {e["field"]: e["message"] for e in info.value.errors}


def test_presets_load_and_validate():
    assert {"convnextv2_layer_decay", "quickstart"} <= set(list_presets())
    main = load_preset("convnextv2_layer_decay")
    assert set(main.space) >= {"layer_decay", "blr", "warmup_epochs", "schedule"}
    assert set(main.space["schedule"].values) == {"cosine", "multistep", "half_cosine", "cosine_restarts", "linear"}
    quick = load_preset("quickstart")
    assert trial_finetune(quick, {}).dataset == "digits" and quick.resources.gpus_per_worker == 0


def test_yaml_and_json_strings_load_the_same(tmp_path):
    data = spec()
    from_json = load_spec(json.dumps(data))
    path = tmp_path / "s.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    assert load_spec(path) == from_json == load_spec(str(path))


def test_json_schema_exports_every_section():
    schema = spec_json_schema()
    assert {"name", "base", "space", "search", "scheduler", "resources", "metric", "mode"} <= set(schema["properties"])
    text = json.dumps(schema)
    for kind in ("loguniform", "uniform", "quniform", "randint", "choice", "grid"):
        assert f'"{kind}"' in text


@pytest.mark.parametrize(("data", "field", "needle"), [
    (spec(colour="red"), "colour", "unknown key"),
    (spec(search={"algorithm": "random", "sed": 1}), "search.sed", "unknown key"),
    (spec(space={"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2, "scale": 2}}), "space.blr.scale",
     "unknown key"),
    (spec(space={"learning_rate": {"type": "uniform", "low": 0.1, "high": 0.2}}), "space.learning_rate",
     "not a finetune setting"),
    (spec(base={**BASE, "epochz": 3}), "base.epochz", "not a finetune setting"),
    (spec(space={"blr": {"type": "uniform", "low": 0.2, "high": 0.1}}), "space.blr", "must be < high"),
    (spec(space={"blr": {"type": "loguniform", "low": 0, "high": 0.1}}), "space.blr", "must be > 0"),
    (spec(space={"layer_decay": {"type": "uniform", "low": 0.5, "high": 1.2}}), "space.layer_decay.high",
     "(0, 1]"),
    (spec(space={"layer_decay": {"type": "choice", "values": [0.0, 0.8]}}), "space.layer_decay.values[0]",
     "(0, 1]"),
    (spec(space={"schedule": {"type": "choice", "values": []}}), "space.schedule.values", "at least one"),
    (spec(space={"schedule": {"type": "grid", "values": ["cosine", "linear"]},
                 "warmup_epochs": {"type": "grid", "values": [0, 1, 2]}},
          search={"algorithm": "grid", "max_grid_trials": 4}), "search.max_grid_trials", "above the cap"),
    (spec(space={"schedule": {"type": "choice", "values": ["cosine", "cosine_typo"]}}),
     "space.schedule.values[1]", "unknown schedule"),
    (spec(space={"blr": {"type": "normal", "low": 1, "high": 2}}), "space.blr", "expected one of"),
    (spec(search={"algorithm": "grid"}), "space.layer_decay.type", "grid search needs finite domains"),
    (spec(space={"schedule": {"type": "grid", "values": ["cosine"]}}, search={"algorithm": "tpe"}),
     "space.schedule.type", "use choice with tpe"),
    (spec(space={"schedule": {"type": "choice", "values": ["cosine"]},
                 "cycles": {"type": "randint", "low": 2, "high": 3, "when": {"schedule": "cosine_restart"}}}),
     "space.cycles.when.schedule", "not one of"),
    (spec(space={"cycles": {"type": "randint", "low": 2, "high": 3, "when": {"shedule": "x"}}}),
     "space.cycles.when.shedule", "neither"),
    (spec(search={"algorithm": "random", "points_to_evaluate": [{"blr": 1e-3, "lr_x": 1}]}),
     "search.points_to_evaluate[0].lr_x", "not a searched parameter"),
    (spec(search={"algorithm": "tpe", "points_to_evaluate": [{"blr": 1e-3}], "evaluated_rewards": [0.5, 0.6]}),
     "search.evaluated_rewards", "one value per point"),
    (spec(search={"algorithm": "random", "points_to_evaluate": [{"blr": 1e-3}], "evaluated_rewards": [0.5]}),
     "search.evaluated_rewards", "tpe"),
    (spec(num_samples=0), "num_samples", ">= 1"),
    (spec(num_samples=-1), "num_samples", "time_budget_s"),
    (spec(mode="maximize"), "mode", "'max' or 'min'"),
    (spec(scheduler={"type": "asha", "grace_period": 9}), "scheduler.grace_period", "beyond max_epochs"),
    (spec(scheduler={"type": "hyperband"}), "scheduler", "tag"),
    (spec(resources={"workers_per_trial": 0}), "resources.workers_per_trial", "greater than or equal to 1"),
    (spec(base={**BASE, "epochs": 0}), "base.epochs", "greater than or equal to 1"),
    (spec(space={"warmup_epochs": {"type": "choice", "values": [0, 9]}}), "space.warmup_epochs.values[1]",
     "below epochs"),
    (spec(space={"blr": {"type": "uniform", "low": 0.001, "high": 0.01}}, base={**BASE, "blr": 0.1}),
     "space.blr", "also set in base"),
    (spec(space={}), "space", "at least one"),
    (spec(name="has space"), "name", "pattern"),
])
def test_every_spec_error_names_its_field(data, field, needle):
    errors = errors_of(data)
    assert field in errors, errors
    assert needle in errors[field], errors[field]


def test_unreadable_documents_are_errors(tmp_path):
    assert "no such spec file" in errors_of_source(tmp_path / "missing.yaml")["<file>"]
    assert "mapping" in errors_of_source("- just\n- a list\n")["<document>"]
    assert "not valid YAML" in errors_of_source("name: [unclosed\n")["<document>"]


def errors_of_source(source):
    with pytest.raises(SpecError) as info:
        load_spec(source)
    return {e["field"]: e["message"] for e in info.value.errors}


def test_resources_the_cluster_can_never_satisfy():
    s = load_spec(spec(resources={"workers_per_trial": 2, "cpus_per_worker": 1, "gpus_per_worker": 1}))
    with pytest.raises(SpecError) as info:
        check_resources(s, cluster_capacity({"CPU": 8, "GPU": 0}))
    assert info.value.errors[0]["field"] == "resources.gpus_per_worker"
    with pytest.raises(SpecError) as info:
        check_resources(s, cluster_capacity({"CPU": 8, "GPU": 1}))
    assert info.value.errors[0]["field"] == "resources.workers_per_trial"
    big = load_spec(spec(resources={"cpus_per_worker": 4}))
    nodes = [{"CPU": 2}, {"CPU": 2}]
    with pytest.raises(SpecError) as info:
        check_resources(big, cluster_capacity({"CPU": 4}, nodes))
    assert info.value.errors[0]["field"] == "resources.cpus_per_worker"
    check_resources(s, cluster_capacity({"CPU": 8, "GPU": 2}))  # fits: no error


def test_concurrency_comes_from_the_cluster_unless_given():
    gpu = load_spec(spec(resources={"workers_per_trial": 2, "gpus_per_worker": 1}, num_samples=20))
    assert max_concurrent_trials(gpu, cluster_capacity({"CPU": 64, "GPU": 8})) == 4
    cpu = load_spec(spec(resources={"cpus_per_worker": 1}, num_samples=20))
    assert max_concurrent_trials(cpu, cluster_capacity({"CPU": 2})) == 2
    fixed = load_spec(spec(resources={"max_concurrent_trials": 3}))
    assert max_concurrent_trials(fixed, cluster_capacity({"CPU": 64, "GPU": 8})) == 3
    few = load_spec(spec(num_samples=1))
    assert max_concurrent_trials(few, cluster_capacity({"CPU": 64})) == 1


def test_grid_crosses_only_active_conditionals():
    s = load_spec(spec(space={
        "schedule": {"type": "grid", "values": ["cosine", "multistep"]},
        "warmup_epochs": {"type": "grid", "values": [0, 1]},
        "milestones": {"type": "grid", "values": [[1], [2]], "when": {"schedule": "multistep"}},
    }, search={"algorithm": "grid"}))
    points = grid_points(s)
    # cosine x 2 warmups + multistep x 2 warmups x 2 milestone sets, each point once (nothing is sampled)
    assert len(points) == 6 and count_trials(s) == 6
    assert all(("milestones" in p) == (p["schedule"] == "multistep") for p in points)


def test_sampling_respects_conditions_and_bounds():
    s = load_spec(spec(space={
        **spec()["space"],
        "drop_path": {"type": "quniform", "low": 0.0, "high": 0.3, "q": 0.1},
    }))
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = sample_params(s, rng)
        assert 0.6 <= p["layer_decay"] <= 0.95 and 1e-4 <= p["blr"] <= 1e-2
        assert ("milestones" in p) == (p["schedule"] == "multistep")
        assert ("cycles" in p) == (p["schedule"] == "cosine_restarts")
        assert p.get("cycles", 2) in (2, 3)
        assert abs(p["drop_path"] * 10 - round(p["drop_path"] * 10)) < 1e-9
        trial_finetune(s, p)  # every sample is a valid finetune


def test_conditions_on_base_values_are_static():
    s = load_spec(spec(space={"cycles": {"type": "randint", "low": 2, "high": 4,
                                         "when": {"schedule": "cosine_restarts"}}},
                       base={**BASE, "schedule": "cosine"}))
    assert sample_params(s, np.random.default_rng(0)) == {}


def test_asha_expected_epochs():
    s = load_spec(spec(scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_epochs": 4}))
    # rungs 1, 2, 4: everyone trains 1 epoch, half go on to 2, a quarter to 4
    assert expected_epochs_per_trial(s) == pytest.approx(1 + 0.5 * 1 + 0.25 * 2)
    fifo = load_spec(spec(scheduler={"type": "fifo"}))
    assert expected_epochs_per_trial(fifo) == 4


def test_dry_run_reports_trials_samples_and_cost():
    s = load_spec(spec(num_samples=10, scheduler={"type": "fifo"}))
    report = dry_run(s, {"CPU": 2.0})
    assert report["trials"] == 10 and len(report["samples"]) == 5
    assert report["max_concurrent_trials"] == 2 and report["problems"] == []
    # work is known from FLOPs; time is not, without a measured speed of this hardware
    cfg = trial_finetune(s, {})
    images = 2 * cfg.batch_size  # steps_per_epoch_limit 2
    assert report["images_per_epoch"] == images
    assert report["train_pflops"] == pytest.approx(3 * 1.095 * (32 / 224) ** 2 * images * 4 * 10 / 1e6, rel=1e-3)
    assert report["estimate_hours"] is None and "--probe" in report["note"]
    json.dumps(report)  # what the service returns
    measured = dry_run(s, {"CPU": 2.0}, images_per_second=images / 30)  # 30 s per epoch
    assert measured["seconds_per_epoch"] == pytest.approx(30)
    overhead = TRIAL_OVERHEAD_S["train" if s.resources.uses_train else "in_process"]
    assert measured["estimate_hours"] == pytest.approx(10 * 1 * (4 * 30 + overhead) / 3600, rel=1e-3)
    gpu = load_spec(spec(resources={"gpus_per_worker": 1, "workers_per_trial": 2},
                         estimate={"seconds_per_epoch": 360}, scheduler={"type": "fifo"}))
    r = dry_run(gpu, {"CPU": 16, "GPU": 4})
    assert r["estimate_unit"] == "GPU-hours"
    # 8 trials x (4 epochs x 0.1 h + a Ray Train trial's overhead) x 2 GPUs
    assert r["estimate_hours"] == pytest.approx(8 * 2 * (4 * 0.1 + TRIAL_OVERHEAD_S["train"] / 3600), rel=1e-3)
    bad = dry_run(gpu, {"CPU": 16})
    assert bad["problems"][0]["field"] == "resources.gpus_per_worker"
    asha = load_spec(spec(estimate={"seconds_per_epoch": 360}, num_samples=9,
                          scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 3}))
    a = dry_run(asha, {"CPU": 16})
    # without early stopping every trial trains all 4 epochs; the overhead is once per trial, not scaled
    overhead = TRIAL_OVERHEAD_S["train" if asha.resources.uses_train else "in_process"]
    assert a["estimate_upper_bound_hours"] == pytest.approx(9 * 1 * (4 * 0.1 + overhead / 3600), rel=1e-3)
    assert a["estimate_hours"] < a["estimate_upper_bound_hours"]


def test_an_imagefolder_estimate_counts_its_images_or_says_why_not(tmp_path):
    folder = tmp_path / "flowers"
    for cls in ("a", "b"):
        (folder / "train" / cls).mkdir(parents=True)
        (folder / "val" / cls).mkdir(parents=True)
        for i in range(3):
            (folder / "train" / cls / f"{i}.jpg").write_bytes(b"x")
    found = load_spec(spec(base={"model": "convnextv2_huge", "dataset": "imagefolder", "data_root": str(folder),
                                 "num_classes": 2, "input_size": 224, "epochs": 4}))
    report = dry_run(found, {"CPU": 16, "GPU": 8})
    assert report["images_per_epoch"] == 6 and report["gflops_per_image"] == pytest.approx(229.844)
    assert report["estimate_hours"] is None  # no "6.55 GPU-hours" from a CPU figure for atto
    missing = load_spec(spec(base={"model": "convnextv2_huge", "dataset": "imagefolder",
                                   "data_root": str(tmp_path / "elsewhere"), "num_classes": 2, "epochs": 4}))
    report = dry_run(missing, {"CPU": 16})
    assert report["train_pflops"] is None and "not readable here" in report["note"]


def test_dry_run_shows_warm_start_points_first():
    s = load_spec(spec(search={"algorithm": "random", "points_to_evaluate": [{"blr": 1e-3, "layer_decay": 0.8,
                                                                              "schedule": "cosine"}]}))
    assert dry_run(s)["samples"][0] == {"blr": 1e-3, "layer_decay": 0.8, "schedule": "cosine"}


def test_metric_is_checked_against_what_the_loop_reports_and_mode_follows_it():
    base = {"name": "m", "base": {"model": "convnextv2_atto"},
            "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    with pytest.raises(SpecError) as exc:
        load_spec({**base, "metric": "val_acc"})
    assert exc.value.errors[0]["field"] == "metric" and "val_top1" in exc.value.errors[0]["message"]
    assert load_spec({**base, "metric": "val_loss"}).mode == "min"
    assert load_spec({**base, "metric": "val_top5"}).mode == "max"
    assert load_spec({**base, "metric": "val_loss", "mode": "max"}).mode == "max"  # an explicit mode wins


def test_trials_rank_their_best_model_and_checkpoints_by_the_sweep_metric():
    from search_spaces.spec import trial_finetune
    from trainers.ray_run import build_torch_trainer

    spec = load_spec({"name": "m", "base": {"model": "convnextv2_atto"}, "metric": "val_loss",
                      "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}})
    cfg = trial_finetune(spec, {"blr": 1e-3})
    assert (cfg.best_metric, cfg.best_mode) == ("val_loss", "min")
    trainer = build_torch_trainer(cfg, name="rank", storage_path="/tmp/convtune-rank-test")
    ckpt = trainer.run_config.checkpoint_config
    assert (ckpt.checkpoint_score_attribute, ckpt.checkpoint_score_order) == ("val_loss", "min")


MINIMAL = {"name": "t", "base": {"model": "convnextv2_atto"}}


def all_errors(data) -> list[dict[str, str]]:
    with pytest.raises(SpecError) as exc:
        load_spec(data)
    return exc.value.errors


def test_warm_start_points_are_checked_against_their_domains():
    errors = all_errors({**MINIMAL, "base": {"model": "convnextv2_atto", "epochs": 10},
                         "space": {"blr": {"type": "loguniform", "low": 5e-5, "high": 2e-3},
                                          "warmup_epochs": {"type": "choice", "values": [0, 2, 5]}},
                        "search": {"algorithm": "tpe", "points_to_evaluate": [{"blr": 0.5, "warmup_epochs": 7}]}})
    assert [e["field"] for e in errors] == ["search.points_to_evaluate[0].blr",
                                            "search.points_to_evaluate[0].warmup_epochs"]
    assert "[5e-05, 0.002]" in errors[0]["message"] and "one of [0, 2, 5]" in errors[1]["message"]


def test_quniform_bounds_must_be_multiples_of_q_and_points_must_lie_on_the_grid():
    (error,) = all_errors({**MINIMAL, "space": {"drop_path": {"type": "quniform", "low": 0.05, "high": 0.33, "q": 0.1}}})
    assert error["field"] == "space.drop_path" and "multiples of q=0.1" in error["message"]
    (error,) = all_errors({**MINIMAL, "space": {"drop_path": {"type": "quniform", "low": 0.1, "high": 0.3, "q": 0.1}},
                          "search": {"points_to_evaluate": [{"drop_path": 0.25}]}})
    assert error["field"] == "search.points_to_evaluate[0].drop_path"
    ok = load_spec({**MINIMAL, "space": {"drop_path": {"type": "quniform", "low": 0.1, "high": 0.3, "q": 0.1}},
                    "search": {"points_to_evaluate": [{"drop_path": 0.2}]}})
    rng = np.random.default_rng(0)
    for _ in range(100):  # the dry run's sampler quantizes from 0, as Ray does; Optuna from low: the same grid
        value = sample_params(ok, rng)["drop_path"]
        assert 0.1 <= value <= 0.3 and abs(value / 0.1 - round(value / 0.1)) < 1e-9


def test_a_grid_with_nothing_sampled_runs_each_point_once_and_repeats_need_a_searched_seed():
    grid = {"blr": {"type": "grid", "values": [1e-3, 2e-3]}, "layer_decay": {"type": "grid", "values": [0.7, 0.8]}}
    assert count_trials(load_spec({**MINIMAL, "space": grid})) == 4  # was 32: 8 repeats with the same seed
    (error,) = all_errors({**MINIMAL, "space": grid, "num_samples": 3})
    assert error["field"] == "num_samples" and "space.seed" in error["message"]
    seeded = load_spec({**MINIMAL, "space": {**grid, "seed": {"type": "grid", "values": [0, 1, 2]}}})
    assert count_trials(seeded) == 12
    sampled = load_spec({**MINIMAL, "space": {**grid, "drop_path": {"type": "uniform", "low": 0.0, "high": 0.2}}})
    assert sampled.num_samples == 8  # something is sampled: the usual default


def test_every_mistake_is_reported_at_once_each_naming_its_field():
    errors = all_errors({**MINIMAL, "base": {"model": "convnextv2_atto", "bogus": 1}, "num_samples": 0,
                        "metric": "val_acc",
                        "space": {"blr": {"type": "loguniform", "low": 5e-5, "high": 2e-3},
                                  "drop_path": {"type": "uniform", "low": 0.5, "high": 0.2},
                                  "nope": {"type": "uniform", "low": 0, "high": 1}},
                        "search": {"points_to_evaluate": [{"blr": 0.5}]},
                        "scheduler": {"type": "asha", "grace_period": 50}})
    assert {e["field"] for e in errors} == {"space.drop_path", "num_samples", "base.bogus", "space.nope",
                                            "search.points_to_evaluate[0].blr", "scheduler.grace_period",
                                            "metric"}


def test_grid_size_is_counted_without_building_the_grid_and_matches_it():
    rng = np.random.default_rng(1)
    for _ in range(30):
        space = {"schedule": {"type": "grid", "values": ["multistep", "step", "cosine", "linear"][: rng.integers(2, 5)]},
                 "warmup_epochs": {"type": "grid", "values": list(range(int(rng.integers(1, 4))))},
                 "milestones": {"type": "grid", "values": [[1], [2], [3]][: rng.integers(1, 4)],
                                "when": {"schedule": "multistep"}},
                 "step_size": {"type": "grid", "values": [1, 2][: rng.integers(1, 3)], "when": {"schedule": "step"}}}
        s = load_spec({**MINIMAL, "space": space, "search": {"algorithm": "grid"}})
        assert count_trials(s) == len(grid_points(s))
    names = ["blr", "layer_decay", "drop_path", "smoothing", "weight_decay", "reprob", "color_jitter"]
    huge = {n: {"type": "grid", "values": [round(0.05 + 0.05 * i, 2) for i in range(10)]} for n in names}
    (error,) = all_errors({**MINIMAL, "space": huge})  # 10**7 points: refused from the count alone
    assert error["field"] == "search.max_grid_trials" and "10000000" in error["message"]


def test_a_when_condition_on_a_base_setting_is_validated():
    errors = all_errors({**MINIMAL, "space": {"warmup_epochs": {"type": "choice", "values": [0, 1],
                                                            "when": {"optimizer": "no-such-optimizer"}}}})
    assert errors[0]["field"] == "space.warmup_epochs.when.optimizer"


def test_concurrency_is_the_minimum_over_every_resource_per_node():
    from search_spaces.spec import cluster_capacity, max_concurrent_trials

    gpu = {**MINIMAL, "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, "num_samples": 8,
           "resources": {"workers_per_trial": 2, "cpus_per_worker": 8, "gpus_per_worker": 1}}
    one_node = cluster_capacity({"CPU": 16, "GPU": 8}, [{"CPU": 16, "GPU": 8}])
    assert max_concurrent_trials(load_spec(gpu), one_node) == 1  # was 4: 8 GPUs / 2, CPUs ignored
    # two nodes of 12 CPUs: one 8-CPU worker each, so one 2-worker trial, though 24 CPUs / 16 looks like 1.5
    two_nodes = cluster_capacity({"CPU": 24, "GPU": 8}, [{"CPU": 12, "GPU": 4}, {"CPU": 12, "GPU": 4}])
    assert max_concurrent_trials(load_spec(gpu), two_nodes) == 1
    four_nodes = cluster_capacity({"CPU": 64, "GPU": 4}, [{"CPU": 16, "GPU": 1}] * 4)
    assert max_concurrent_trials(load_spec(gpu), four_nodes) == 2


def test_asha_max_t_is_the_largest_searched_epochs_and_an_unreachable_last_rung_is_refused():
    from search_spaces.tune_search import build_scheduler

    searched = load_spec({**MINIMAL, "space": {"epochs": {"type": "choice", "values": [10, 20, 30]}},
                          "scheduler": {"type": "asha", "grace_period": 3}})
    assert searched.scheduler_max_epochs() == 30  # was 5, FinetuneConfig's default: every trial cut at 5
    scheduler = build_scheduler(searched)
    assert scheduler._max_t == 30 and scheduler._stop_last_trials is False
    (error,) = all_errors({**MINIMAL, "base": {"model": "convnextv2_atto", "epochs": 10},
                           "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                           "scheduler": {"type": "asha", "max_epochs": 20}})
    assert error["field"] == "scheduler.max_epochs" and "early_stopped" in error["message"]


def test_fractional_cpus_follow_one_rule_everywhere():
    from search_spaces.spec import cluster_capacity, max_concurrent_trials
    from trainers.ray_run import build_torch_trainer

    spec = load_spec({**MINIMAL, "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                      "resources": {"cpus_per_worker": 0.5}})
    assert spec.resources.threads_per_worker == 1
    assert max_concurrent_trials(spec, cluster_capacity({"CPU": 2}, [{"CPU": 2}])) == 4
    trainer = build_torch_trainer(trial_finetune(spec, {"blr": 1e-3}), name="frac", storage_path="/tmp/convtune-frac",
                                  cpus_per_worker=spec.resources.cpus_per_worker)
    assert trainer.scaling_config.resources_per_worker == {"CPU": 0.5}  # reserved as given, not max(1, int(c))
    assert trainer.train_loop_config["cpus_per_worker"] == 1  # one torch thread


def test_searched_schedule_values_are_checked_at_the_trials_updates_per_epoch():
    # digits at batch 500 on 2 workers: 718 images per worker, 1 update per epoch, so milestones [0.2, 0.4] are
    # updates [0, 0]: FinetuneConfig alone cannot know that, and every worker of such a trial used to fail
    space = {"schedule": {"type": "choice", "values": ["cosine", "multistep"]},
             "milestones": {"type": "choice", "values": [[1, 2], [0.2, 0.4]], "when": {"schedule": "multistep"}}}
    base = {"model": "convnextv2_atto", "batch_size": 500}
    (error,) = all_errors({**MINIMAL, "base": base, "space": space, "resources": {"workers_per_trial": 2}})
    assert error["field"] == "space.milestones.values[1]"
    assert "[0.2, 0.4] epochs are updates [0, 0] at 1 updates per epoch" in error["message"]
    (error,) = all_errors({**MINIMAL, "resources": {"workers_per_trial": 2},
                           "space": {"batch_size": {"type": "choice", "values": [64, 1000]}}})
    assert error["field"] == "space.batch_size.values[1]" and "larger than the 1437 training images" in error["message"]
    load_spec({**MINIMAL, "base": {**base, "dataset": "imagefolder", "data_root": "/nowhere", "num_classes": 3},
               "space": space})  # an imagefolder's size is unknown here: check_data checks it before training


# ---- one trial path: Ray Train by default, in_process only as an explicit opt-in --------------------------

def test_every_trial_is_a_ray_train_run_unless_in_process_is_asked_for():
    base = {"name": "p", "base": {"epochs": 2}, "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    default = load_spec(base)
    assert default.resources.in_process is False and default.resources.uses_train
    assert dry_run(default)["execution"] == "Ray Train"
    quick = load_spec({**base, "resources": {"in_process": True}})
    assert not quick.resources.uses_train
    assert "in_process" in dry_run(quick)["execution"] and "opt-in" in dry_run(quick)["execution"]
    for preset in ("quickstart", "convnextv2_layer_decay"):  # the presets use the default path
        assert resolve_spec_source(preset).resources.uses_train


@pytest.mark.parametrize("resources", [{"in_process": True, "workers_per_trial": 2},
                                       {"in_process": True, "gpus_per_worker": 1}])
def test_in_process_is_refused_for_ddp_and_gpu_trials(resources):
    with pytest.raises(SpecError) as err:
        load_spec({"name": "p", "base": {"epochs": 2}, "resources": resources,
                   "space": {"blr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}})
    assert "resources" in str(err.value) and "in_process" in str(err.value) and "Ray Train" in str(err.value)
