"""Nothing of a stopped trial outlives it: the placement groups of dead Ray Train worker groups are removed.

When Tune stops a Ray Train trial (ASHA, a sweep cancel, a trial failure), it kills the trial process and
the Train controller and workers die with it. The worker placement group was made by the controller but
belongs to the job, so Ray frees it only when the sweep's driver exits: until then it holds its CPUs/GPUs
and the next trials' worker groups wait for them. Ray Train frees it through a detached
`PlacementGroupCleaner` per run, which convtune's trainer leaves out (`trainers.ray_run.trainer_class`:
it can be orphaned for good, and it must find the cluster through the State API).

The sweep driver therefore checks for itself, through the State API of the cluster it is connected to:
a placement group of this job that held Ray Train workers, all of them now dead, is a leak and is removed.
Train never reuses such a group (a restarted worker group gets a new one), and Tune's own trial groups hold
no Train workers, so nothing in use is touched. The check runs every few seconds while the sweep runs (a
Tune callback) and once more, waiting for the last trial's actors to exit, when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import time

from ray.tune import Callback

log = logging.getLogger("convtune.sweep")

TRAIN_WORKER_CLASS = "RayTrainWorker"
CHECK_EVERY_S = 3.0


def _state_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def leaked_placement_groups(job_id: str) -> tuple[list[str], int]:
    """(ids of this job's live placement groups whose Ray Train workers are all dead, number of this job's
    live placement groups that still have live Train workers)."""
    from ray.util.state import list_actors, list_placement_groups

    address = _state_address()
    groups = {g.placement_group_id for g in list_placement_groups(
        address=address, filters=[("state", "!=", "REMOVED")], detail=True, raise_on_missing_output=False)
        if g.creator_job_id == job_id}
    if not groups:
        return [], 0
    workers: dict[str, list[str]] = {}
    for actor in list_actors(address=address, filters=[("class_name", "=", TRAIN_WORKER_CLASS)], detail=True,
                             limit=10_000, raise_on_missing_output=False):
        if actor.placement_group_id in groups:
            workers.setdefault(actor.placement_group_id, []).append(actor.state)
    leaked = [pg for pg, states in workers.items() if all(s == "DEAD" for s in states)]
    return leaked, len(workers) - len(leaked)


def remove_leaked_placement_groups(job_id: str) -> tuple[list[str], int]:
    """Remove the leaked groups of `job_id`; returns (the removed ids, groups still in use)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    leaked, in_use = leaked_placement_groups(job_id)
    for pg_id in leaked:
        log.warning("removing placement group %s: its Ray Train workers are dead (a stopped trial)", pg_id)
        with contextlib.suppress(Exception):  # removed meanwhile by Train's own cleaner
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    return leaked, in_use


def release_all(job_id: str, timeout_s: float = 60.0) -> list[str]:
    """At the end of a sweep: wait (up to `timeout_s`) for the Train workers of stopped trials to exit and
    remove every group they leave. Never raises: a sweep's results do not depend on it."""
    removed: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            leaked, in_use = remove_leaked_placement_groups(job_id)
            removed += leaked
            if not in_use or time.monotonic() > deadline:
                if in_use:
                    log.warning("%d placement group(s) of this sweep still have live Train workers", in_use)
                return removed
            time.sleep(0.5)  # the killed trials' workers exit within a second or two: poll their state
    except Exception:  # noqa: BLE001 - the State API may be unavailable (no dashboard)
        log.warning("could not check for leftover placement groups", exc_info=True)
        return removed


class ReleaseStoppedTrials(Callback):
    """Every `CHECK_EVERY_S` of the Tune loop: remove the placement groups of dead Train worker groups."""

    def __init__(self, job_id: str, every_s: float = CHECK_EVERY_S):
        self.job_id, self.every_s, self.last = job_id, every_s, 0.0
        self.removed: list[str] = []

    def __getstate__(self):  # pickled with the Tuner state: nothing of this run's progress
        return {"job_id": self.job_id, "every_s": self.every_s, "last": 0.0, "removed": []}

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        try:
            self.removed += remove_leaked_placement_groups(self.job_id)[0]
        except Exception:  # noqa: BLE001 - checked again at the next step and at the end
            log.debug("placement-group check failed", exc_info=True)
