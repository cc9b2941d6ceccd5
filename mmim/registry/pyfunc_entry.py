"""Entry point of the logged MLflow model ("model from code": nothing is pickled)."""

import mlflow

from mmim.registry.serving import MMIMPyfunc

mlflow.models.set_model(MMIMPyfunc())
