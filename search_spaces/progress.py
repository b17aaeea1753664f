"""A live trial table for sweeps run from a terminal (``convtune sweep``)."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from search_spaces.spec import SweepSpec


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class LiveTable(Callback):
    """Reprints the trial table (status, params, epoch, best metric) when it changed, at most every ``every_s``."""

    def __init__(self, spec: SweepSpec, every_s: float = 5.0, stream=None):
        self.spec, self.every_s = spec, every_s
        self.stream = stream
        self.rows: dict[str, dict] = {}
        self._dirty, self._last = False, 0.0

    def __getstate__(self):
        return {**self.__dict__, "stream": None}

    def _row(self, trial) -> dict:
        from search_spaces.tune_search import trial_params

        row = self.rows.setdefault(trial.trial_id, {"best": None, "epoch": 0})
        row["status"] = trial.status
        row["params"] = trial_params(self.spec, trial.config)
        self._dirty = True
        return row

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["status"] = "RUNNING"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["epoch"] = result.get("epoch", row["epoch"])
        value = result.get(self.spec.metric)
        if value is not None:
            better = row["best"] is None or (value > row["best"] if self.spec.mode == "max" else value < row["best"])
            row["best"] = value if better else row["best"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["status"] = "DONE" if row["epoch"] >= self.spec.scheduler_max_epochs() else "STOPPED"

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["status"] = "ERROR"

    def on_step_end(self, iteration, trials, **info):
        if self._dirty and time.monotonic() - self._last >= self.every_s:
            self.print_table()

    def on_experiment_end(self, trials, **info):
        self.print_table()

    def print_table(self) -> None:
        stream = self.stream or sys.stdout
        names = list(self.spec.space)
        header = ["trial", "status", "epoch", f"best {self.spec.metric}", *names]
        lines = [header]
        for trial_id, row in sorted(self.rows.items()):
            lines.append([trial_id, row.get("status", "?"), _fmt(row["epoch"]),
                          _fmt(row["best"]) if row["best"] is not None else "-",
                          *[_fmt(row.get("params", {}).get(n, "")) for n in names]])
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        stamp = time.strftime("%H:%M:%S")
        out = [f"[{stamp}] trials: {len(self.rows)}"]
        out += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
        print("\n".join(out), file=stream, flush=True)
        self._dirty, self._last = False, time.monotonic()
