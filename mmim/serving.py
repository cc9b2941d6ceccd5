"""The MLflow pyfunc model: a checkpoint (weights, config, tokenizer) behind `predict`.

Input: a table with one row per utterance and the columns
    text    str
    audio   list of frames, each a list of audio_dim numbers
    vision  list of frames, each a list of vision_dim numbers
Output: a table with `score` (sentiment in [-3, 3]), `polarity` (the Acc-2 class) and
`class7` (the Acc-7 class, -3..3).

The model is logged as "model from code" (`mmim/pyfunc_entry.py`), so nothing is
pickled; loading it needs the `mmim` package and the logged checkpoint only.
"""

from __future__ import annotations

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from mmim.checkpoint import load_checkpoint
from mmim.errors import MMIMInputError
from mmim.predict import predict_utterances

COLUMNS = ("text", "audio", "vision")


class MMIMPyfunc(PythonModel):
    def load_context(self, context) -> None:
        self.model, self.config, self.tokenizer = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        missing = [column for column in COLUMNS if column not in model_input.columns]
        if missing:
            raise MlflowException(f"input lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}",
                                  error_code=INVALID_PARAMETER_VALUE)
        utterances = [{"text": row.text, "audio": _frames(row.audio), "vision": _frames(row.vision)}
                      for row in model_input.itertuples(index=False)]
        try:
            predictions = predict_utterances(self.model, self.tokenizer, utterances)
        except MMIMInputError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(predictions, columns=["score", "polarity", "class7"])


def _frames(value):
    """Frames as nested lists (a column may hold numpy arrays of arrays)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [frame.tolist() if hasattr(frame, "tolist") else frame for frame in value]
    return value
