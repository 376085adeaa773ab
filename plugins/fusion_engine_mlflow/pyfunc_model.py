"""The models-from-code file of an exported ensemble's MLflow model (:mod:`.pyfunc`).

MLflow copies this file into the model and executes it when the model is logged and when it is
loaded; it must stay cheap: the ensemble itself is loaded by ``load_context``, from the model's
artifacts. Logging a model "from code" stores no pickle of any Python object.
"""

import mlflow.models

from fusion_engine_mlflow.pyfunc import EnsembleModel

mlflow.models.set_model(EnsembleModel())
