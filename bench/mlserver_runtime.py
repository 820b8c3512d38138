"""The Python peer for the bench: an MLServer custom runtime that runs the exported model in onnxruntime.

Loaded by MLServer 1.7.1 (in its own venv, see bench/mlserver.py) as `bench.mlserver_runtime.OnnxLstmRuntime`;
imports nothing of this project, so that MLServer's interpreter needs only mlserver, onnxruntime and numpy.
Like our server it takes `input` [batch, time, features] and fills the optional recurrent state with zeros.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxLstmRuntime(MLModel):
    """One onnxruntime session on the model file named by the model settings' `parameters.uri`."""

    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        # Same session settings as our server's defaults: full graph optimisation, threads left to onnxruntime,
        # idle threads do not spin (the machine is shared with the load generator).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self._session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._state = {i.name: i.shape for i in self._session.get_inputs() if i.name != "input"}
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        if "input" not in inputs:
            raise ValueError(f"request: got inputs {sorted(inputs)}, expected 'input' [batch, time, features]")
        batch = inputs["input"].shape[0]
        for name, shape in self._state.items():
            if name not in inputs:  # omitted state starts at zero, as in our server
                inputs[name] = np.zeros([batch, *shape[1:]], np.float32)
        results = self._session.run(self._outputs, inputs)
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output(name, array)
                                          for name, array in zip(self._outputs, results)])
