# The gateway image: slim Python, our package without extras (no torch, no vLLM), non-root, and friendly to a
# read-only root filesystem (no bytecode writes; only /tmp needs to be writable, the chart mounts an emptyDir).
#   docker build -f docker/gateway.Dockerfile -t registry.example.com/private-llm/gateway:0.1.0 .
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY gateway ./gateway
COPY engine ./engine
COPY objectstore ./objectstore
COPY configkit ./configkit
# Wheels for the package and its dependencies; the final stage installs them without a compiler or cache.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels private-llm-stack \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin gateway
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["llm-gateway"]
CMD ["serve"]
