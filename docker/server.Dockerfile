# The inference server without torch: `.[serve,cpu]` by default, `--build-arg EXTRA=gpu` for onnxruntime-gpu.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRA=cpu
WORKDIR /app
# CUDA base images have no pip; python:*-slim does. Ubuntu 24.04 guards its system Python, hence the flag.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN command -v pip >/dev/null || (apt-get update && apt-get install -y --no-install-recommends python3 python3-pip \
        python-is-python3 && rm -rf /var/lib/apt/lists/*)
COPY pyproject.toml README.md ./
COPY lstm_onnx ./lstm_onnx
COPY model ./model
COPY export ./export
COPY server ./server
COPY protos ./protos
RUN pip install --no-cache-dir ".[serve,${EXTRA}]" && python -c "import lstm_onnx.server.app" \
    && ! python -c "import torch" 2>/dev/null
# Inside a container the server must listen beyond loopback for the published port to reach it.
ENV LSTM_ONNX_HOST=0.0.0.0 \
    LSTM_ONNX_MODEL_REPOSITORY=/models \
    LSTM_ONNX_LOG_FORMAT=json
EXPOSE 8000 8001 8002
ENTRYPOINT ["lstm-onnx"]
CMD ["serve"]
