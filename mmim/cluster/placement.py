"""Ray Train's placement-group cleaner, made to wait for a real death before it frees a run.

Ray Train 2.60 starts, with every run, a detached actor that frees the run's placement group
if the run's controller dies without shutting down (a Tune trial that ASHA stops, a killed
driver). It asks the dashboard's State API whether the controller lives, and takes an answer
that does not mention it as "dead". On a busy machine the State API gives such answers for
a live controller; the cleaner then removes the placement group of a run that is training,
and Ray destroys its workers ("Destroying worker since its placement group was removed").
That is how a seed failed from load alone.

`Trainer` is Ray's TorchTrainer with one change: its cleaner (`PatientCleaner`) removes the
group only once the GCS's own actor table, which every actor's life goes through, says the
controller is dead; until then it waits and asks again.
"""

from __future__ import annotations

from typing import Any

import ray
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray._private.state import actors as actor_table
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner


def dead_in_gcs(actor_id: str) -> bool:
    """Whether the GCS records the actor as dead (or has forgotten it, as it does dead actors)."""
    return actor_table(actor_id).get("State", "DEAD") == "DEAD"


class PatientCleaner(PlacementGroupCleaner):
    """Ray's cleaner, whose removal first waits until the GCS confirms the controller's death."""

    def _cleanup_placement_group(self, placement_group) -> None:
        while not self._stop_event.is_set() and not dead_in_gcs(self._controller_actor_id):
            self._stop_event.wait(self._check_interval_s)  # a false alarm: the run goes on
        if not self._stop_event.is_set():  # stop(): the controller shut down cleanly, nothing to free
            super()._cleanup_placement_group(placement_group)


class PatientCleanerCallback(PlacementGroupCleanerCallback):
    """Ray's callback, starting a PatientCleaner where it would start its own cleaner."""

    def after_controller_start(self, train_run_context) -> None:
        self._controller_actor_id = ray.get_runtime_context().get_actor_id()
        # As Ray's: detached, so that it outlives a controller that dies; on the head node.
        cleaner: Any = (
            ray.remote(num_cpus=0)(PatientCleaner)
            .options(
                lifetime="detached",
                resources={HEAD_NODE_RESOURCE_NAME: 0.001},
                scheduling_strategy="DEFAULT",  # outside the placement group of a Tune trial that starts it
            )
            .remote(
                controller_actor_id=self._controller_actor_id,
                check_interval_s=self._check_interval_s,
                get_actor_timeout_s=self._get_actor_timeout_s,
                stop_timeout=self._stop_timeout,
            )
        )
        cleaner.start_monitoring.remote()
        self._cleaner = cleaner  # Ray's callback stops it when the controller shuts down cleanly


class Trainer(TorchTrainer):
    """TorchTrainer whose placement-group cleaner is a PatientCleaner (see the module's docstring)."""

    def _create_default_callbacks(self):
        return [
            PatientCleanerCallback() if type(callback) is PlacementGroupCleanerCallback else callback
            for callback in super()._create_default_callbacks()
        ]
