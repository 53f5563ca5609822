# The engine image: the official vLLM OpenAI image (CUDA, PyTorch, vLLM) plus our package, which pulls and
# verifies weights from S3/MinIO (`llm-engine pull`) and runs and supervises vLLM (`llm-engine run`).
#   docker build -f docker/engine.Dockerfile \
#     -t registry.example.com/private-llm/engine:0.1.0 .
# The one pin of the GPU image's vLLM: engine/vllm_args.py emits only flags this release accepts
# (tests/unit/test_vllm_args.py checks them against tests/data/vllm-<version>-flags.json: scripts/vllm_flags.py).
ARG VLLM_VERSION=v0.24.0
FROM vllm/vllm-openai:${VLLM_VERSION}

WORKDIR /opt/private-llm
# pyproject.toml, README.md and our packages (gateway/, engine/, objectstore/, ...: what .dockerignore lets through).
COPY . ./
# vLLM and torch come with the base image and are not touched: only our package and its small dependencies
# are added (pip keeps every requirement the image already satisfies). The engine serves no gateway requests:
# its copy of the gateway package stays pure Python (no C compiler needed).
RUN PRIVATE_LLM_NATIVE=0 python3 -m pip install --no-cache-dir . "nvidia-ml-py>=12" \
 && rm -rf /opt/private-llm/build \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin engine) \
 && mkdir -p /home/engine /cache \
 && chown -R 1000:1000 /home/engine /cache

# Non-root (uid 1000, matching the chart's engine.podSecurityContext); vLLM, Triton and torch.compile write their
# caches under $HOME. Weights live in /cache (a volume in Kubernetes) and never come from a model hub.
ENV HOME=/home/engine \
    HF_HOME=/home/engine/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    ENGINE_CACHE_DIR=/cache \
    ENGINE_HOST=0.0.0.0 \
    ENGINE_PORT=8000 \
    ENGINE_DEVICE=cuda
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["llm-engine"]
CMD ["run"]
