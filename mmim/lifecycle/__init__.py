"""One retraining, the same from every door: check the data, train, log the model, score
challenger and champion on the same data, register.

    checks.check_data          the store before anything trains on it; a failed hard
                               check raises (exit 2), so nothing trains and nothing registers
    training.check_training    what would refuse the training (output_dir, seeds, Ray settings)
    training.train_model       one seed (one process or Ray Train workers), or one Ray run per
                               seed; every epoch to the MLflow run as it is reported
    registration.log_trained   the selected checkpoint as the run's pyfunc model
    registration.score         the logged model (fetched back) and the champion on the same
                               data: the head-to-head, recorded on the run
    registration.register_model   a new version; `champion` moves only when it is earned
    retrain.retrain            all of the above in one process (`mmim train --track`)
    retrain.train_checked      the checks and the training only (`mmim train`)
    checks.check_config_store  the checks alone, as `mmim tune` runs them before its search
                               (whose best config is then trained like any other)

The Prefect tasks (tasks/) wrap the same steps one by one (retries, caching, artifacts), so
the guarantees, the decision text and the gate.* tags do not depend on the door.
"""
