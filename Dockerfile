# TinySAM Label Studio ML backend.
#   docker build -t tinysam-ml-backend .
#   docker run -p 9090:9090 -e LABEL_STUDIO_URL=http://host:8080 -e LABEL_STUDIO_API_KEY=... tinysam-ml-backend
# docker-compose.yml runs it together with Label Studio. Configuration: docs/labelstudio.md.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TINYSAM_HOME=/models

WORKDIR /app
# torch first and on its own layer: it is by far the largest dependency and changes least often
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY tinysam_kit ./tinysam_kit
RUN pip install ".[onnx,labelstudio]"

# model weights are cached here (mount a volume to keep them, or put a checkpoint there by hand)
RUN useradd --create-home --uid 1000 tinysam && mkdir -p /models && chown tinysam /models
USER tinysam
VOLUME ["/models"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "tinysam_kit.integrations.labelstudio.healthcheck"]

# One process: the model is loaded once and shared by all requests (model calls take turns; /health
# is answered on the event loop while they run).
CMD ["tinysam", "serve-ls", "--host", "0.0.0.0", "--port", "9090"]
