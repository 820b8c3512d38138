# The one-shot pipeline (train, export, verify, audit) with CPU torch: `.[train,cpu]`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lstm_onnx ./lstm_onnx
COPY model ./model
COPY export ./export
COPY server ./server
COPY protos ./protos
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[train,cpu]"
ENTRYPOINT ["lstm-onnx"]
