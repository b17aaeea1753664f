"""The sweep spec: one typed object for a whole sweep, loaded from YAML or JSON.

A spec names a ``base`` finetune config (overrides of :class:`trainers.config.FinetuneConfig`), a
``space`` of parameters to search (any finetune field), and how to search it (``search``,
``scheduler``, ``metric``/``mode``, budgets and ``resources``). Loading validates everything once
and reports every problem with the field it concerns (``space.blr.low: ...``); nothing of Ray is
imported here, so the service can validate and dry-run specs without a cluster.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search_spaces.loading import SpecError, check_plain_data, load_spec_text

#: Keys of a trial's Tune config that are not finetune fields.
GRID_KEY = "grid_point"
MLFLOW_KEY = "mlflow"
RESERVED_NAMES = frozenset({GRID_KEY, MLFLOW_KEY})


#: Most trials one sweep may ask for (num_samples, max_grid_trials); a service may set a lower cap.
MAX_TRIALS = 100_000
#: MLflow's limits: experiment names, tag values (the description becomes the parent run's note).
MLFLOW_MAX_EXPERIMENT_NAME = 500
MLFLOW_MAX_TAG_VALUE = 8000


def _field_error(field: str, message: str) -> SpecError:
    return SpecError([{"field": field, "message": message}])


# --------------------------------------------------------------------------------------------- domains

_Strict = ConfigDict(extra="forbid", frozen=True)
Scalar = bool | int | float | str | None
Condition = dict[str, Any]


class _Domain(BaseModel):
    model_config = _Strict
    when: Condition | None = Field(
        None, description="Only sample this parameter when every named parameter has (one of) the given value(s), "
        "e.g. {schedule: multistep} or {schedule: [multistep, step]}.")

    finite: ClassVar[bool] = False

    def values_for_validation(self) -> list[tuple[str, Any]]:
        """(sub-field, value) pairs that stand for the whole domain when checked against FinetuneConfig."""
        return [("low", self.low), ("high", self.high)]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this domain can produce (warm-start points are checked with it)."""
        return _is_number(value) and self.low <= value <= self.high

    def describe(self) -> str:
        return f"[{self.low}, {self.high}]"


class _Range(_Domain):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class LogUniform(_Range):
    """A float sampled uniformly in log space between ``low`` and ``high`` (both > 0)."""

    type: Literal["loguniform"]

    @model_validator(mode="after")
    def _positive(self):
        if self.low <= 0:
            raise ValueError(f"loguniform bounds must be > 0 (got low={self.low}); use uniform for ranges touching 0")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


class Uniform(_Range):
    """A float sampled uniformly between ``low`` and ``high``."""

    type: Literal["uniform"]

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


class QUniform(_Range):
    """A float sampled uniformly between ``low`` and ``high`` and rounded to a multiple of ``q``.

    ``low`` and ``high`` must be multiples of ``q``: Ray quantizes from 0 and Optuna from ``low``, and the
    two agree exactly then (and Ray rejects other bounds).
    """

    type: Literal["quniform"]
    q: float = Field(gt=0)

    @model_validator(mode="after")
    def _bounds_on_the_grid(self):
        off = [name for name, v in (("low", self.low), ("high", self.high)) if not _is_multiple(v, self.q)]
        if off:
            raise ValueError(f"{' and '.join(off)} must be multiples of q={self.q} (got low={self.low}, "
                             f"high={self.high}); e.g. low={math.floor(self.low / self.q) * self.q:g}, "
                             f"high={math.ceil(self.high / self.q) * self.q:g}")
        return self

    def contains(self, value: Any) -> bool:
        return super().contains(value) and _is_multiple(value, self.q)

    def describe(self) -> str:
        return f"multiples of {self.q} in [{self.low}, {self.high}]"

    def sample(self, rng: np.random.Generator) -> float:
        return float(np.clip(round(rng.uniform(self.low, self.high) / self.q) * self.q, self.low, self.high))


class RandInt(_Domain):
    """An integer sampled uniformly from ``low`` to ``high``, both included."""

    type: Literal["randint"]
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def contains(self, value: Any) -> bool:
        return _is_number(value) and float(value).is_integer() and self.low <= value <= self.high

    def describe(self) -> str:
        return f"integers in [{self.low}, {self.high}]"


class _Finite(_Domain):
    values: list[Any]
    finite: ClassVar[bool] = True

    @field_validator("values")
    @classmethod
    def _non_empty(cls, values):
        if not values:
            raise ValueError("must list at least one value")
        return values

    def values_for_validation(self):
        return [(f"values[{i}]", v) for i, v in enumerate(self.values)]

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]

    def contains(self, value: Any) -> bool:
        return any(value == v and type(value) is not bool or value is v for v in self.values)

    def describe(self) -> str:
        return f"one of {self.values}"


class Choice(_Finite):
    """One of ``values``, sampled uniformly (searched by TPE as a categorical)."""

    type: Literal["choice"]


class Grid(_Finite):
    """Every one of ``values``: the sweep crosses all grid parameters (times ``num_samples``)."""

    type: Literal["grid"]


Domain = Annotated[LogUniform | Uniform | QUniform | RandInt | Choice | Grid, Field(discriminator="type")]
DOMAIN_TYPES = ("loguniform", "uniform", "quniform", "randint", "choice", "grid")


# ---------------------------------------------------------------------------------- other sections

class SearchConfig(BaseModel):
    """How trials are proposed."""

    model_config = _Strict
    algorithm: Literal["random", "grid", "tpe"] = Field(
        "random", description="random: sample the space (grid parameters crossed); grid: every combination of "
        "grid/choice values (continuous domains are an error); tpe: Optuna's TPE sampler.")
    seed: int | None = Field(0, description="Seed of the sampler; null for a different search on every run.")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="Warm start: configurations (parameter -> value) to try first.")
    evaluated_rewards: list[float] | None = Field(
        None, description="Known metric values of points_to_evaluate (from an earlier sweep, tpe only): they seed "
        "the sampler without being trained again.")
    max_grid_trials: int = Field(256, ge=1, le=MAX_TRIALS,
                                 description="Refuse grids larger than this (the cross product grows fast).")


class FifoScheduler(BaseModel):
    """Run every trial to the end."""

    model_config = _Strict
    type: Literal["fifo"]


class AshaScheduler(BaseModel):
    """Asynchronous successive halving: stop the worst trials at rungs grace_period * reduction_factor^k epochs."""

    model_config = _Strict
    type: Literal["asha"]
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="1/reduction_factor of the trials go on at each rung.")
    max_epochs: int | None = Field(None, ge=1, description="Last rung; defaults to base.epochs.")


class MedianScheduler(BaseModel):
    """Stop a trial whose best result is below the median of the other trials' running averages."""

    model_config = _Strict
    type: Literal["median"]
    grace_period: int = Field(1, ge=1, description="Epochs before a trial can be stopped.")
    min_samples_required: int = Field(3, ge=1, description="Trials that must have reported before any stop.")


SchedulerConfig = Annotated[FifoScheduler | AshaScheduler | MedianScheduler, Field(discriminator="type")]


class ResourcesConfig(BaseModel):
    """What one trial uses. GPUs are reserved by its Train workers, never by the trial driver."""

    model_config = _Strict
    workers_per_trial: int = Field(1, ge=1, description="Ray Train (DDP) workers per trial.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves, fractions allowed (e.g. 0.5 to "
                                   "pack two workers on a core); its torch threads are the whole part, at least 1.")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker reserves (fractions share a GPU).")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Default: what the cluster fits, total GPUs (or CPUs) / per-trial GPUs (or CPUs).")
    in_process: bool = Field(
        False, description="Opt-in for quick CPU sweeps: run single-worker, CPU-only trials inside the Tune trial "
        "process instead of as a Ray Train run (no worker group; checkpoints, retries and resume go through Tune). "
        "Default false: every trial is a Ray Train run. Refused with workers_per_trial > 1 or GPUs.")

    @model_validator(mode="after")
    def _in_process_only_for_one_cpu_worker(self) -> ResourcesConfig:
        if self.in_process and (self.workers_per_trial > 1 or self.gpus_per_worker > 0):
            raise ValueError("resources.in_process: true is only for single-worker CPU trials (workers_per_trial: 1, "
                             "gpus_per_worker: 0); remove it so the trials run on Ray Train")
        return self

    @property
    def uses_train(self) -> bool:
        """Whether trials run as Ray Train runs (the default; the in_process opt-in runs them in the Tune trial)."""
        return not self.in_process

    @property
    def threads_per_worker(self) -> int:
        """Torch threads of a worker: the whole CPUs it reserves, at least one (the reservation is the float)."""
        return max(1, int(self.cpus_per_worker))

    @property
    def cpus_per_trial(self) -> float:
        return self.workers_per_trial * self.cpus_per_worker

    @property
    def gpus_per_trial(self) -> float:
        return self.workers_per_trial * self.gpus_per_worker


class FailuresConfig(BaseModel):
    """Retries: a trial driver relaunched by Tune, or a Train worker group restarted from its last checkpoint."""

    model_config = _Strict
    trial_retries: int = Field(1, ge=0, description="Tune relaunches of a failed trial (resumes from its checkpoint).")
    worker_retries: int = Field(1, ge=0, description="Ray Train restarts of a failed worker group.")


class EstimateConfig(BaseModel):
    """Inputs of the dry run's compute estimate."""

    model_config = _Strict
    seconds_per_epoch: float | None = Field(
        None, gt=0, description="Measured wall seconds of one training epoch of one trial.")
    images_per_second: float | None = Field(
        None, gt=0, description="Measured training images per second of one worker on the cluster's hardware "
        "(`convtune sweep SPEC --dry-run --probe` measures it on the machine it runs on).")


class SweepSpec(BaseModel):
    """A sweep: a search over finetune settings, each trial a Ray Train finetune (see docs/sweeps.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"title": "convtune sweep spec"})

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Sweep name (also the MLflow "
                      "experiment unless mlflow_experiment is set).")
    description: str = Field("", max_length=MLFLOW_MAX_TAG_VALUE,
                             description="Free text, shown as the MLflow parent run's note.")
    base: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig fields shared by all trials.")
    space: dict[str, Domain] = Field(description="Parameter (a FinetuneConfig field) -> domain.")
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=lambda: AshaScheduler(type="asha"))
    metric: str = Field("val_top1", description="Metric the trials report and the search optimises (val_top1, "
                        "val_top5, val_loss, train_loss, or their ema_ forms with model_ema_eval).")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher metric is better; default: min for "
                                        "a *_loss metric, else max.")
    num_samples: int = Field(8, le=MAX_TRIALS,
                             description="Trials to sample (times the grid size); -1: until time_budget_s.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop the whole sweep after this many seconds.")
    stop_at: float | None = Field(None, description="Stop the sweep once a trial reaches this metric value.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    failures: FailuresConfig = Field(default_factory=FailuresConfig)
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)
    mlflow_experiment: str | None = Field(None, min_length=1, max_length=MLFLOW_MAX_EXPERIMENT_NAME,
                                          description="MLflow experiment; default 'convtune-<name>'.")
    register_model: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="MLflow Model Registry name: when the sweep finishes, the best trial's weights are logged as "
                    "an MLflow PyTorch model in the sweep's run and registered as a new version of this name "
                    "(letters, digits, '_', '.', '-'; needs a database-backed MLflow store).")

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_depend_on_other_fields(cls, data):
        if not isinstance(data, dict):
            return data
        if "mode" not in data and isinstance(data.get("metric"), str):
            data = {**data, "mode": "min" if data["metric"].endswith("loss") else "max"}
        if "num_samples" not in data and _only_grid(data):
            data = {**data, "num_samples": 1}  # a grid with nothing sampled: each point once
        return data

    @field_validator("num_samples")
    @classmethod
    def _num_samples(cls, value):
        if value == 0 or value < -1:
            raise ValueError("must be >= 1, or -1 to sample until time_budget_s runs out")
        return value

    @model_validator(mode="after")
    def _structure(self):
        errors = _structure_errors(self)
        if errors:
            raise SpecError(errors)
        return self

    # ------------------------------------------------------------------ derived views used by the driver
    @property
    def experiment_name(self) -> str:
        return self.mlflow_experiment or f"convtune-{self.name}"

    def grid_params(self) -> list[str]:
        """Parameters the search crosses exhaustively (in grid mode every finite domain)."""
        finite = (Grid, Choice) if self.search.algorithm == "grid" else (Grid,)
        return [name for name, dom in self.space.items() if isinstance(dom, finite)]

    def sampled_params(self) -> list[str]:
        grid = set(self.grid_params())
        return [name for name in self.space if name not in grid]

    def max_epochs(self) -> int:
        """The most epochs a trial can train: the largest value a searched ``epochs`` can take, else base's."""
        dom = self.space.get("epochs")
        if isinstance(dom, _Finite):
            numbers = [v for v in dom.values if _is_number(v)]
            if numbers:
                return int(max(numbers))
        elif dom is not None:
            return int(dom.high)
        return int(self.base.get("epochs") or _finetune_default("epochs"))

    def scheduler_max_epochs(self) -> int:
        cap = getattr(self.scheduler, "max_epochs", None)
        return cap or self.max_epochs()

    def ordered_params(self) -> list[str]:
        """Unconditional parameters first, so a condition is always evaluated after what it reads."""
        return sorted(self.space, key=lambda n: self.space[n].when is not None)

    def is_active(self, name: str, values: Mapping[str, Any]) -> bool:
        """Whether ``name``'s condition holds for the other values (sampled ones, then base)."""
        when = self.space[name].when
        if not when:
            return True
        for ref, wanted in when.items():
            actual = values[ref] if ref in values else self.base.get(ref, _finetune_default(ref))
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if actual not in allowed:
                return False
        return True


def _only_grid(data: Mapping[str, Any]) -> bool:
    """Whether a raw spec's space is all grid parameters (nothing sampled), for the num_samples default."""
    space = data.get("space")
    search = data.get("search") if isinstance(data.get("search"), Mapping) else {}
    algorithm = search.get("algorithm", "random")
    if not isinstance(space, Mapping) or not space or algorithm == "tpe":
        return False
    gridded = ("grid", "choice") if algorithm == "grid" else ("grid",)
    return all(isinstance(d, Mapping) and d.get("type") in gridded for d in space.values())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_multiple(value: float, q: float) -> bool:
    ratio = value / q
    return abs(ratio - round(ratio)) <= 1e-9 * max(1.0, abs(ratio))


def _finetune_fields() -> dict[str, Any]:
    from trainers.config import FinetuneConfig

    return FinetuneConfig.model_fields


def _finetune_default(name: str) -> Any:
    field = _finetune_fields().get(name)
    return None if field is None else field.get_default(call_default_factory=True)


def _structure_errors(spec: SweepSpec) -> list[dict[str, str]]:
    """Checks across sections that pydantic's per-field validation cannot see."""
    errors: list[dict[str, str]] = []

    def err(field: str, message: str):
        errors.append({"field": field, "message": message})

    fields = _finetune_fields()
    if not spec.space:
        err("space", "name at least one parameter to search (e.g. blr: {type: loguniform, low: 1e-4, high: 1e-2})")
    for key in spec.base:
        if key not in fields:
            err(f"base.{key}", f"not a finetune setting; valid names: {', '.join(sorted(fields))}")
    for name, dom in spec.space.items():
        where = f"space.{name}"
        if name in RESERVED_NAMES or name not in fields:
            err(where, f"'{name}' is not a finetune setting; searchable names: {', '.join(sorted(fields))}")
            continue
        if name in spec.base:
            err(where, f"'{name}' is also set in base; remove it from one of the two")
        if name == "layer_decay":
            bad = [(k, v) for k, v in dom.values_for_validation() if not _num_in(v, 0.0, 1.0)]
            for k, v in bad:
                err(f"{where}.{k}", f"layer_decay must lie in (0, 1] (got {v!r}); 1.0 turns layer decay off")
        for ref, wanted in (dom.when or {}).items():
            if ref == name:
                err(f"{where}.when.{ref}", "a parameter cannot depend on itself")
            elif ref in spec.space:
                parent = spec.space[ref]
                if parent.when is not None:
                    err(f"{where}.when.{ref}", f"'{ref}' is conditional itself; conditions may only name "
                        "unconditional parameters")
                elif not parent.finite:
                    err(f"{where}.when.{ref}", f"'{ref}' has a continuous domain; conditions need a choice or grid")
                else:
                    for value in wanted if isinstance(wanted, list) else [wanted]:
                        if value not in parent.values:
                            err(f"{where}.when.{ref}", f"{value!r} is not one of space.{ref}.values {parent.values}")
            elif ref in fields:
                pass  # a base (or default) value: a static condition
            else:
                err(f"{where}.when.{ref}", f"'{ref}' is neither a searched parameter nor a finetune setting")
        if isinstance(dom, Grid) and dom.when and any(
                not isinstance(spec.space.get(r), (Grid, Choice)) for r in dom.when if r in spec.space):
            err(f"{where}.when", "a grid parameter can only depend on other grid/choice parameters")

    algo = spec.search.algorithm
    if algo == "grid":
        for name, dom in spec.space.items():
            if not dom.finite:
                err(f"space.{name}.type", f"grid search needs finite domains: use choice or grid for '{name}', "
                    "or search.algorithm: random/tpe")
    if algo == "tpe":
        for name, dom in spec.space.items():
            if isinstance(dom, Grid):
                err(f"space.{name}.type", "grid domains need search.algorithm grid or random; use choice with tpe")
    if spec.search.evaluated_rewards is not None:
        if algo != "tpe":
            err("search.evaluated_rewards", "known results can only seed the tpe search (random/grid ignore them)")
        elif len(spec.search.evaluated_rewards) != len(spec.search.points_to_evaluate):
            err("search.evaluated_rewards", f"needs one value per point in search.points_to_evaluate "
                f"({len(spec.search.points_to_evaluate)}), got {len(spec.search.evaluated_rewards)}")
    for i, point in enumerate(spec.search.points_to_evaluate):
        for key, value in point.items():
            if key not in spec.space:
                err(f"search.points_to_evaluate[{i}].{key}", f"not a searched parameter; space has "
                    f"{', '.join(spec.space)}")
            elif value is not None and not spec.space[key].contains(value):
                err(f"search.points_to_evaluate[{i}].{key}", f"{value!r} is outside space.{key}: "
                    f"{spec.space[key].describe()}")
    if not errors:
        grid = _grid_size(spec)
        n = grid * max(spec.num_samples, 1)
        if spec.search.algorithm != "tpe" and n > spec.search.max_grid_trials:
            err("search.max_grid_trials", f"the grid has {grid} combinations x num_samples {spec.num_samples} = "
                f"{n} trials, above the cap {spec.search.max_grid_trials}; shrink the grid or raise the cap")
    if (spec.search.algorithm != "tpe" and spec.grid_params() and not spec.sampled_params()
            and spec.num_samples > 1):
        err("num_samples", f"{spec.num_samples} would repeat every grid point with the same settings and seed; a "
            "grid with nothing sampled runs each point once. To repeat with different seeds, search the seed: "
            "space.seed: {type: grid, values: [0, 1, 2]}")
    if spec.num_samples == -1 and spec.time_budget_s is None:
        err("num_samples", "-1 (sample forever) needs time_budget_s")
    cap = getattr(spec.scheduler, "max_epochs", None)
    if cap is not None and cap > spec.max_epochs():
        err("scheduler.max_epochs", f"{cap} is above the most epochs a trial trains ({spec.max_epochs()}): every "
            "trial would end before the last rung and be labelled early_stopped; leave it unset or lower it")
    if isinstance(spec.scheduler, AshaScheduler) and spec.scheduler.grace_period > spec.scheduler_max_epochs():
        err("scheduler.grace_period", f"{spec.scheduler.grace_period} is beyond max_epochs "
            f"{spec.scheduler_max_epochs()}: no trial could ever be stopped")
    return errors


def _num_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high


# ------------------------------------------------------------------------------------ grid and samples

def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid parameters, leaving out conditional ones where inactive."""
    names = [n for n in spec.ordered_params() if n in set(spec.grid_params())]
    points: list[dict[str, Any]] = [{}]
    for name in names:
        grown = []
        for point in points:
            if spec.is_active(name, point):
                grown.extend({**point, name: v} for v in spec.space[name].values)
            else:
                grown.append(point)
        points = grown
    return points if names else []


def _grid_size(spec: SweepSpec) -> int:
    """``len(grid_points(spec))`` (at least 1) without building the grid: the product of the unconditional grid
    parameters' value counts, times, per assignment of the parameters that conditions read, the value counts
    of the conditional parameters active there. Past MAX_TRIALS the unconditional product is returned: it is
    a lower bound, and enough to refuse the spec."""
    names = [n for n in spec.ordered_params() if n in set(spec.grid_params())]
    unconditional = [n for n in names if not spec.space[n].when]
    conditional = [n for n in names if spec.space[n].when]
    size = math.prod(len(spec.space[n].values) for n in unconditional)
    if not conditional or size > MAX_TRIALS:
        return max(size, 1)
    read = [n for n in unconditional if any(n in spec.space[c].when for c in conditional)]
    rest = math.prod(len(spec.space[n].values) for n in unconditional if n not in read)
    total = 0
    for combo in itertools.product(*(spec.space[n].values for n in read)):
        point = dict(zip(read, combo, strict=True))
        total += math.prod(len(spec.space[c].values) if spec.is_active(c, point) else 1 for c in conditional)
    return max(total * rest, 1)


def count_trials(spec: SweepSpec) -> int | None:
    """Trials the sweep will run (None: unbounded, until its time budget), as Ray runs them: TPE proposes
    num_samples in all (warm-start points included); random/grid search crosses num_samples with the grid,
    and every warm-start point takes the place of one sample and is one trial (it fixes the grid point)."""
    if spec.num_samples == -1:
        return None
    if spec.search.algorithm == "tpe":
        return spec.num_samples
    points = len(spec.search.points_to_evaluate)
    if not spec.grid_params():
        return max(spec.num_samples, points)
    return points + max(spec.num_samples - points, 0) * _grid_size(spec)


def sample_params(spec: SweepSpec, rng: np.random.Generator, grid_point: Mapping[str, Any] | None = None) -> dict:
    """One sampled parameter set (what the dry run shows; Ray/Optuna do the real sampling)."""
    values: dict[str, Any] = dict(grid_point or {})
    for name in spec.ordered_params():
        if name in values or name in spec.grid_params() and grid_point is not None:
            continue
        if spec.is_active(name, values):
            values[name] = spec.space[name].sample(rng)
    return values


def trial_finetune(spec: SweepSpec, params: Mapping[str, Any], *, torch_free: bool = False):
    """The FinetuneConfig a trial with ``params`` trains (base overridden by the active params).

    ``torch_free``: skip the checks that import timm (a trial's driver; its workers check everything)."""
    from trainers.config import FinetuneConfig

    # the trial's best model (and Ray Train's checkpoint ranking) follow the sweep's objective
    objective = {"best_metric": spec.metric, "best_mode": spec.mode}
    data = {**objective, **spec.base, **{k: v for k, v in params.items() if v is not None}}
    return FinetuneConfig.validate_torch_free(data) if torch_free else FinetuneConfig.model_validate(data)


# ------------------------------------------------------------------------------------------- loading

def load_spec(source: str | Path | Mapping[str, Any]) -> SweepSpec:
    """Load and fully validate a spec from a YAML/JSON file, a YAML/JSON string, or a dict.

    Raises :class:`SpecError` naming every invalid field: a field error does not hide the cross-section
    checks, because the spec is validated again without the offending entries until nothing new turns up.
    """
    data = _read(source)
    errors: list[dict[str, str]] = []
    dropped: set[str] = set()
    spec = None
    for _ in range(6):
        try:
            spec = SweepSpec.model_validate(data)
            break
        except ValidationError as exc:
            found = [item for e in exc.errors() for item in _pydantic_errors(e)]
        fresh = [e for e in found if e not in errors and e["field"] not in dropped]
        if not fresh:
            break
        errors += fresh
        data = _without(data, [e["field"] for e in fresh], dropped)
    if spec is not None:
        errors += [e for e in _finetune_errors(spec) if e not in errors]
    if errors:
        raise SpecError(errors)
    check_plain_data(spec.model_dump())  # what is stored: pydantic turns the string "Infinity" into inf
    return spec


def _without(data: dict[str, Any], fields: Iterable[str], dropped: set[str]) -> dict[str, Any]:
    """``data`` without the entries the error ``fields`` point at (up to two levels: ``space.blr``,
    ``scheduler.grace_period``, ``num_samples``), recording the containers emptied in ``dropped``."""
    out = json.loads(json.dumps(data, default=str))
    for field in fields:
        parts = [p for p in re.split(r"[.\[]", field) if p and not p.endswith("]")]
        if not parts or parts[0] not in out:
            continue
        top = parts[0]
        if len(parts) > 1 and isinstance(out[top], dict):
            out[top].pop(parts[1], None)
            dropped.add(top)  # e.g. an emptied space must not add "name at least one parameter"
        elif top not in ("name", "space"):
            out.pop(top)
    return out


def _read(source: str | Path | Mapping[str, Any]) -> Any:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and len(source) < 4096
                                    and Path(source).suffix.lower() in {".yaml", ".yml", ".json"}):
        path = Path(source)
        if not path.is_file():
            raise _field_error("<file>", f"no such spec file: {path}")
        data = load_spec_text(path.read_bytes(), "json" if path.suffix.lower() == ".json" else "yaml")
    else:
        text = str(source)
        data = load_spec_text(text, "json" if text.lstrip().startswith(("{", "[")) and _is_json(text) else "yaml")
    if not isinstance(data, dict):
        raise _field_error("<document>", f"a spec is a mapping of sections, got {type(data).__name__}")
    return data


def _is_json(text: str) -> bool:
    """Whether ``text`` parses as JSON (else it is read as YAML, e.g. a flow mapping ``{a: 1}``)."""
    try:
        json.loads(text, parse_int=lambda s: 0, parse_constant=lambda s: 0)
    except (ValueError, RecursionError):
        return False
    return True


def _pydantic_errors(error: Mapping[str, Any]) -> list[dict[str, str]]:
    """One pydantic error as field errors: a SpecError raised by a model validator carries several."""
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("error"), SpecError):  # already field-named, every one of them
        return list(ctx["error"].errors)
    return [_pydantic_error(error)]


def _pydantic_error(error: Mapping[str, Any]) -> dict[str, str]:
    loc = []
    for part in error["loc"]:
        if isinstance(part, int):
            loc[-1:] = [f"{loc[-1]}[{part}]"] if loc else [f"[{part}]"]
        elif part in DOMAIN_TYPES or part in ("fifo", "asha", "median"):
            continue  # the discriminator tag pydantic adds to the path
        else:
            loc.append(str(part))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key; check the spelling (docs/sweeps.md lists every key)"
    elif error["type"] == "union_tag_invalid":
        message = f"unknown type {error.get('input', {}).get('type')!r}; expected one of {', '.join(DOMAIN_TYPES)}" \
            if "space" in loc else f"{message}"
    return {"field": ".".join(loc) or "<document>", "message": message}


def _finetune_errors(spec: SweepSpec) -> list[dict[str, str]]:
    """Check base, every domain's edge values and every warm-start point against FinetuneConfig."""
    errors: list[dict[str, str]] = []
    base_err = _try_finetune(spec, {})
    if base_err:
        objective = {"best_metric": "metric", "best_mode": "mode"}  # set from the spec's metric and mode
        return [{"field": objective.get(loc) or (f"base.{loc}" if loc else "base"), "message": msg}
                for loc, msg in base_err]
    for name, dom in spec.space.items():
        for ref, wanted in (dom.when or {}).items():
            if ref in spec.space or ref not in _finetune_fields():
                continue  # searched parameters are checked with the spec's structure
            for value in wanted if isinstance(wanted, list) else [wanted]:
                if not isinstance(value, (str, int, float, bool)) or value is None:
                    errors.append({"field": f"space.{name}.when.{ref}", "message": f"{value!r}: a condition "
                                   "compares with plain values (strings, numbers, booleans)"})
                    continue
                for _, msg in _try_finetune(spec, {ref: value}):
                    errors.append({"field": f"space.{name}.when.{ref}",
                                   "message": f"{value!r} is not a valid {ref}: {msg}"})
        activating = {ref: (w[0] if isinstance(w, list) else w) for ref, w in (dom.when or {}).items()}
        for sub, value in dom.values_for_validation():
            for loc, msg in _try_finetune(spec, _with_activated(spec, {**activating, name: value})):
                field = f"space.{name}.{sub}" if loc in (name, "") else f"space.{name}.{sub} (as {loc})"
                errors.append({"field": field, "message": msg})
    for i, point in enumerate(spec.search.points_to_evaluate):
        for loc, msg in _try_finetune(spec, point):
            errors.append({"field": f"search.points_to_evaluate[{i}].{loc}", "message": msg})
    return errors


def _with_activated(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` plus the first value of every conditional parameter they activate, so that settings which
    only go together (``schedule: step`` and its ``step_size``) are checked together."""
    out = dict(params)
    for other in spec.ordered_params():
        dom = spec.space[other]
        if other not in out and dom.when and spec.is_active(other, out):
            out[other] = dom.values_for_validation()[0][1]
    return out


def _try_finetune(spec: SweepSpec, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    try:
        cfg = trial_finetune(spec, params)
        # the schedule at the trial's updates per epoch, where the dataset's size is known here (digits,
        # synthetic): searched milestones or batch sizes would otherwise fail on every worker of the trial
        cfg.check_schedule(world_size=spec.resources.workers_per_trial)
    except ValidationError as exc:
        return [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    except (ValueError, TypeError) as exc:
        return [("", str(exc))]
    return []


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of a sweep spec (for editors, the REST API and docs)."""
    return SweepSpec.model_json_schema()


# ----------------------------------------------------------------------------------------- resources

def cluster_capacity(cluster_resources: Mapping[str, float] | None = None,
                     nodes: Iterable[Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Totals plus the largest node, from ``ray.cluster_resources()`` and ``ray.nodes()[i]['Resources']``."""
    totals = dict(cluster_resources or {})
    node_list = [dict(n) for n in nodes] if nodes else [totals]
    return {
        "CPU": float(totals.get("CPU", 0)), "GPU": float(totals.get("GPU", 0)),
        "node_CPU": max(float(n.get("CPU", 0)) for n in node_list),
        "node_GPU": max(float(n.get("GPU", 0)) for n in node_list),
        "nodes": [{"CPU": float(n.get("CPU", 0)), "GPU": float(n.get("GPU", 0))} for n in node_list],
    }


def check_resources(spec: SweepSpec, capacity: Mapping[str, float]) -> None:
    """Raise :class:`SpecError` if the cluster can never run one trial of ``spec``."""
    res, errors = spec.resources, []
    if res.gpus_per_worker > capacity["node_GPU"]:
        errors.append({"field": "resources.gpus_per_worker", "message": (
            f"{res.gpus_per_worker} GPU(s) per worker but no node has more than {capacity['node_GPU']:g}; "
            "use gpus_per_worker: 0 on a CPU cluster")})
    elif res.gpus_per_trial > capacity["GPU"]:
        errors.append({"field": "resources.workers_per_trial", "message": (
            f"{res.workers_per_trial} workers x {res.gpus_per_worker} GPUs = {res.gpus_per_trial:g} GPUs per "
            f"trial; the cluster has {capacity['GPU']:g}")})
    if res.cpus_per_worker > capacity["node_CPU"]:
        errors.append({"field": "resources.cpus_per_worker", "message": (
            f"{res.cpus_per_worker:g} CPUs per worker but no node has more than {capacity['node_CPU']:g}")})
    elif res.cpus_per_trial > capacity["CPU"]:
        errors.append({"field": "resources.workers_per_trial", "message": (
            f"{res.workers_per_trial} workers x {res.cpus_per_worker:g} CPUs = {res.cpus_per_trial:g} CPUs per "
            f"trial; the cluster has {capacity['CPU']:g}")})
    if errors:
        raise SpecError(errors)


def worker_slots(res: ResourcesConfig, node: Mapping[str, float]) -> int:
    """Workers of ``res`` one node holds: the minimum over every resource a worker reserves (a worker cannot
    span nodes)."""
    fits = [node.get("CPU", 0.0) // res.cpus_per_worker]
    if res.gpus_per_worker:
        fits.append(node.get("GPU", 0.0) // res.gpus_per_worker)
    return int(min(fits))


def max_concurrent_trials(spec: SweepSpec, capacity: Mapping[str, Any]) -> int:
    """Trials that fit side by side: the spec's value, else the worker slots of every node (CPUs and GPUs
    alike) divided by the workers of one trial."""
    if spec.resources.max_concurrent_trials:
        return spec.resources.max_concurrent_trials
    res = spec.resources
    nodes = capacity.get("nodes") or [{"CPU": capacity["CPU"], "GPU": capacity["GPU"]}]
    fits = sum(worker_slots(res, node) for node in nodes) // res.workers_per_trial
    total = count_trials(spec)
    return int(max(1, min(fits, total if total else fits)))


# -------------------------------------------------------------------------------------------- dry run

def expected_epochs_per_trial(spec: SweepSpec) -> float:
    """Epochs an average trial trains: all of them under FIFO; ASHA's rung survival rates otherwise."""
    max_t = spec.scheduler_max_epochs()
    if not isinstance(spec.scheduler, AshaScheduler):
        return float(max_t)  # median stopping has no closed form: the bound
    rf, rung, survive, epochs, prev = spec.scheduler.reduction_factor, spec.scheduler.grace_period, 1.0, 0.0, 0
    while rung < max_t:
        epochs += survive * (rung - prev)
        prev, survive, rung = rung, survive / rf, int(math.ceil(rung * rf))
    return epochs + survive * (max_t - prev)


def dry_run(spec: SweepSpec, cluster_resources: Mapping[str, float] | None = None,
            nodes: Iterable[Mapping[str, float]] | None = None, *, n_samples: int = 5,
            images_per_second: float | None = None) -> dict[str, Any]:
    """What a sweep would do, without running it: trials, sample configs, concurrency and compute
    (``images_per_second``: a measured probe of this hardware, see search_spaces.estimate)."""
    from search_spaces.estimate import estimate

    capacity = cluster_capacity(cluster_resources or {"CPU": 1.0}, nodes)
    problems: list[dict[str, str]] = []
    try:
        check_resources(spec, capacity)
    except SpecError as exc:
        problems = exc.errors
    rng = np.random.default_rng(spec.search.seed if spec.search.seed is not None else 0)
    grid = grid_points(spec) if _grid_size(spec) <= MAX_TRIALS else []
    samples = []
    for i in range(n_samples):
        point = grid[i % len(grid)] if grid else None
        samples.append(sample_params(spec, rng, point))
    for i, point in enumerate(spec.search.points_to_evaluate[:n_samples]):
        samples[i] = dict(point)
    trials = count_trials(spec)
    concurrency = max_concurrent_trials(spec, capacity)
    epochs = expected_epochs_per_trial(spec)
    return {
        "name": spec.name,
        "search": spec.search.algorithm,
        "scheduler": spec.scheduler.type,
        "metric": spec.metric, "mode": spec.mode,
        "trials": trials,
        "grid_size": len(grid) or None,
        "max_concurrent_trials": concurrency,
        "resources_per_trial": {"CPU": spec.resources.cpus_per_trial, "GPU": spec.resources.gpus_per_trial},
        "execution": ("Ray Train" if spec.resources.uses_train else
                      "in the Tune trial process (in_process: the opt-in for quick CPU sweeps, not Ray Train)"),
        "cluster": {k: v for k, v in capacity.items() if k != "nodes"},
        "problems": problems,
        "samples": [_jsonable(s) for s in samples],
        "max_epochs": spec.scheduler_max_epochs(),
        "expected_epochs_per_trial": round(epochs, 2),
        **estimate(spec, trial_finetune(spec, {}), epochs, spec.scheduler_max_epochs(), trials, concurrency,
                   images_per_second),
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def format_dry_run(report: Mapping[str, Any]) -> str:
    """A human-readable dry run (the CLI prints it; the service returns the dict)."""
    trials = report["trials"] if report["trials"] is not None else "unbounded (time budget)"
    lines = [
        f"sweep {report['name']}: {report['search']} search, {report['scheduler']} scheduler, "
        f"{report['mode']} {report['metric']}",
        f"  trials: {trials}" + (f" (grid of {report['grid_size']})" if report["grid_size"] else ""),
        f"  per trial: {report['resources_per_trial']['CPU']:g} CPU, {report['resources_per_trial']['GPU']:g} GPU; "
        f"{report['max_concurrent_trials']} at a time on {report['cluster']['CPU']:g} CPU / "
        f"{report['cluster']['GPU']:g} GPU",
        f"  epochs per trial: up to {report['max_epochs']}, about {report['expected_epochs_per_trial']} expected",
    ]
    lines.append(f"  trials run: {report['execution']}")
    if report["train_pflops"] is not None:
        lines.append(f"  work: {report['train_pflops']:g} PFLOPs ({report['gflops_per_image']:g} GFLOPs forward per "
                     f"image x 3 x {report['images_per_epoch']} images x {report['expected_epochs_per_trial']} "
                     "epochs x trials)")
    if report["estimate_hours"] is not None:
        lines.append(f"  estimate: {report['estimate_hours']:.3f} {report['estimate_unit']} "
                     f"(at most {report['estimate_upper_bound_hours']:.3f} without early stopping), "
                     f"~{report['wall_hours'] * 60:.1f} min wall, at {report['seconds_per_epoch']:g} s per epoch")
    else:
        lines.append(f"  time: unknown; {report['note']}")
    for problem in report["problems"]:
        lines.append(f"  PROBLEM {problem['field']}: {problem['message']}")
    lines.append("  sample configurations:")
    lines.extend(f"    {i + 1}. {json.dumps(s)}" for i, s in enumerate(report["samples"]))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- presets

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> SweepSpec:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise _field_error("<preset>", f"no preset named {name!r}; presets: {', '.join(list_presets())}")
    return load_spec(path)


def resolve_spec_source(source: str | Path) -> SweepSpec:
    """A spec file path, or the name of a preset."""
    if isinstance(source, str) and source in list_presets() and not Path(source).exists():
        return load_preset(source)
    return load_spec(Path(source))


__all__ = [
    "SweepSpec", "SpecError", "load_spec", "spec_json_schema", "dry_run", "format_dry_run", "list_presets",
    "load_preset", "grid_points", "count_trials", "sample_params", "trial_finetune", "check_resources",
    "cluster_capacity", "max_concurrent_trials",
]
