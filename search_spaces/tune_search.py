"""Turn a :class:`SweepSpec` into Ray Tune objects: the parameter space, the search algorithm, the scheduler.

Conditional parameters: for random/grid search the grid parameters are enumerated up front (so an
inactive one never multiplies the trials) and go into one ``grid_search`` under ``grid_point``, each point
a canonical JSON string (a leaf value, so a warm-start point can preset it: Ray's preset lookup walks into
dicts and fails on them);
conditional sampled parameters are ``sample_from`` callables that return ``None`` when inactive.
TPE uses an Optuna define-by-run space, which only suggests active parameters.
:func:`trial_params` turns any trial config back into the flat ``{field: value}`` overrides.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.stopper import Stopper

from search_spaces.spec import (
    GRID_KEY,
    MLFLOW_KEY,
    Choice,
    LogUniform,
    QUniform,
    RandInt,
    SpecError,
    SweepSpec,
    Uniform,
    grid_points,
)

# ------------------------------------------------------------------------------------ random / grid

_RAY_DOMAINS: dict[type, Callable[[Any], Any]] = {
    LogUniform: lambda d: tune.loguniform(d.low, d.high),
    Uniform: lambda d: tune.uniform(d.low, d.high),
    QUniform: lambda d: tune.quniform(d.low, d.high, d.q),
    RandInt: lambda d: tune.randint(d.low, d.high + 1),  # spec bounds are inclusive
    Choice: lambda d: tune.choice(d.values),
}


class _ConditionalSample:
    """``sample_from`` callable: sample ``name`` when its condition holds, else ``None``."""

    def __init__(self, spec: SweepSpec, name: str, seed: int | None):
        self.spec, self.name = spec, name
        self.rng = np.random.default_rng(None if seed is None else [seed, sum(map(ord, name))])

    def __call__(self, config):
        grid = set(self.spec.grid_params())
        values = {}
        for ref in self.spec.space[self.name].when or {}:
            if ref in grid:
                values[ref] = grid_values(config).get(ref)
            elif ref in self.spec.space:
                values[ref] = config[ref]
        return self.spec.space[self.name].sample(self.rng) if self.spec.is_active(self.name, values) else None


def build_param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tuner's ``param_space`` for random/grid search (TPE builds its own space)."""
    if spec.search.algorithm == "tpe":
        return {}
    space: dict[str, Any] = {}
    grid = set(spec.grid_params())
    for name in spec.sampled_params():
        dom = spec.space[name]
        space[name] = tune.sample_from(_ConditionalSample(spec, name, spec.search.seed)) if dom.when else \
            _RAY_DOMAINS[type(dom)](dom)
    if grid:
        space[GRID_KEY] = tune.grid_search([encode_grid_point(p) for p in grid_points(spec)])
    return space


def encode_grid_point(point: Mapping[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def grid_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """The grid parameters' values in a trial config (``grid_point``, a JSON string)."""
    point = config.get(GRID_KEY)
    return json.loads(point) if isinstance(point, str) else dict(point or {})


def _points_for_variant_generator(spec: SweepSpec) -> list[dict[str, Any]]:
    grid_names, points = set(spec.grid_params()), []
    combos = grid_points(spec)
    for i, point in enumerate(spec.search.points_to_evaluate):
        out = {k: v for k, v in point.items() if k not in grid_names}
        wanted = {k: v for k, v in point.items() if k in grid_names}
        if grid_names:
            match = next((c for c in combos if all(c.get(k) == v for k, v in wanted.items())), None)
            if match is None:
                raise SpecError([{"field": f"search.points_to_evaluate[{i}]",
                                  "message": f"{wanted} is not a point of the grid"}])
            out[GRID_KEY] = encode_grid_point(match)
        points.append(out)
    return points


# ---------------------------------------------------------------------------------------------- TPE

def _encode(value: Any) -> Any:
    """Optuna categoricals must be scalars: lists/dicts travel as JSON strings."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _encoded_params(spec: SweepSpec) -> set[str]:
    return {n for n, d in spec.space.items() if d.finite and any(isinstance(v, (list, dict)) for v in d.values)}


class _OptunaSpace:
    """Optuna define-by-run space: conditional parameters are only suggested when active."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for name in self.spec.ordered_params():
            if not self.spec.is_active(name, values):
                continue
            dom = self.spec.space[name]
            if isinstance(dom, LogUniform):
                values[name] = trial.suggest_float(name, dom.low, dom.high, log=True)
            elif isinstance(dom, QUniform):
                values[name] = trial.suggest_float(name, dom.low, dom.high, step=dom.q)
            elif isinstance(dom, Uniform):
                values[name] = trial.suggest_float(name, dom.low, dom.high)
            elif isinstance(dom, RandInt):
                values[name] = trial.suggest_int(name, dom.low, dom.high)
            else:
                raw = trial.suggest_categorical(name, [_encode(v) for v in dom.values])
                values[name] = dom.values[[_encode(v) for v in dom.values].index(raw)]
        return None


def _optuna_distributions(spec: SweepSpec, point: Mapping[str, Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for name in point:
        dom = spec.space[name]
        if isinstance(dom, LogUniform):
            dists[name] = FloatDistribution(dom.low, dom.high, log=True)
        elif isinstance(dom, QUniform):
            dists[name] = FloatDistribution(dom.low, dom.high, step=dom.q)
        elif isinstance(dom, Uniform):
            dists[name] = FloatDistribution(dom.low, dom.high)
        elif isinstance(dom, RandInt):
            dists[name] = IntDistribution(dom.low, dom.high)
        else:
            dists[name] = CategoricalDistribution([_encode(v) for v in dom.values])
    return dists


def _build_tpe(spec: SweepSpec, max_concurrent: int, sweep_id: str):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=spec.search.seed, n_startup_trials=max(2, min(10, spec.num_samples // 3)))
    points = [{k: _encode(v) for k, v in p.items()} for p in spec.search.points_to_evaluate]
    kwargs: dict[str, Any] = {}
    if spec.search.evaluated_rewards:
        # OptunaSearch rejects known rewards with a define-by-run space: seed the study ourselves.
        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(storage=storage, study_name=sweep_id,
                                    direction="maximize" if spec.mode == "max" else "minimize")
        for point, reward in zip(points, spec.search.evaluated_rewards, strict=True):
            study.add_trial(optuna.trial.create_trial(params=point, distributions=_optuna_distributions(spec, point),
                                                      value=reward))
        kwargs = {"storage": storage, "study_name": sweep_id}
        points = []
    searcher = OptunaSearch(space=_OptunaSpace(spec), metric=spec.metric, mode=spec.mode, sampler=sampler,
                            points_to_evaluate=points or None, **kwargs)
    return tune.search.ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def build_search_alg(spec: SweepSpec, *, max_concurrent: int, sweep_id: str = "sweep"):
    """The search algorithm for ``spec.search.algorithm``."""
    if spec.search.algorithm == "tpe":
        return _build_tpe(spec, max_concurrent, sweep_id)
    return BasicVariantGenerator(points_to_evaluate=_points_for_variant_generator(spec) or None,
                                 max_concurrent=max_concurrent, random_state=spec.search.seed)


def trial_params(spec: SweepSpec, config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's Tune config as flat finetune overrides: grid point unpacked, inactive and JSON values resolved."""
    flat = {k: v for k, v in config.items() if k not in (GRID_KEY, MLFLOW_KEY)}
    flat.update(grid_values(config))
    for name in _encoded_params(spec) & set(flat):
        if isinstance(flat[name], str):
            flat[name] = json.loads(flat[name])
    return {k: flat[k] for k in spec.space if k in flat and flat[k] is not None}


# ---------------------------------------------------------------------------------------- schedulers

class _AssignsRuns:
    """Scheduler mixin: give every trial its MLflow run before it starts (its config then carries the id).

    ``on_trial_add`` is the one driver-side hook that runs after a trial is created and before its
    actor receives the config; restored trials pass through it too and keep their run.
    """

    run_assigner: Callable[[Any], None] | None = None

    def on_trial_add(self, tune_controller, trial):
        if self.run_assigner is not None:
            self.run_assigner(trial)
        super().on_trial_add(tune_controller, trial)


class FifoWithRuns(_AssignsRuns, FIFOScheduler):
    pass


class AshaWithRuns(_AssignsRuns, ASHAScheduler):
    pass


class MedianWithRuns(_AssignsRuns, MedianStoppingRule):
    pass


SCHEDULERS: dict[str, Callable[[SweepSpec], TrialScheduler]] = {
    "fifo": lambda spec: FifoWithRuns(),
    # stop_last_trials=False: a trial that survives every rung ends on its own at its own epochs (a searched
    # epochs value may be below max_t), so its Ray Train run finishes and tears down normally
    "asha": lambda spec: AshaWithRuns(time_attr="epoch", max_t=spec.scheduler_max_epochs(),
                                      grace_period=spec.scheduler.grace_period,
                                      reduction_factor=spec.scheduler.reduction_factor, stop_last_trials=False),
    "median": lambda spec: MedianWithRuns(time_attr="epoch", grace_period=spec.scheduler.grace_period,
                                          min_samples_required=spec.scheduler.min_samples_required),
}


def build_scheduler(spec: SweepSpec, run_assigner: Callable[[Any], None] | None = None) -> TrialScheduler:
    """The trial scheduler; ``epoch`` (monotonic across restores) is its time attribute."""
    scheduler = SCHEDULERS[spec.scheduler.type](spec)
    scheduler.run_assigner = run_assigner
    return scheduler


class TargetStopper(Stopper):
    """Stop the whole sweep once any trial reaches ``target`` (``stop_at`` in the spec).

    Trials are never stopped here at their last epoch: a Train trial that ends on its own frees its
    placement group itself, while a killed one relies on Train's cleaner (measured: a leak there
    stalls the next trial's worker group for minutes).
    """

    def __init__(self, metric: str, mode: str, target: float):
        self.metric, self.mode, self.target, self.reached = metric, mode, target, False

    def __call__(self, trial_id, result) -> bool:
        value = result.get(self.metric)
        if value is not None and (value >= self.target if self.mode == "max" else value <= self.target):
            self.reached = True
        return False

    def stop_all(self) -> bool:
        return self.reached
