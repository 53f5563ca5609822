# The gateway image: slim Python, our package without extras (no torch, no vLLM) in a venv, non-root, and
# friendly to a read-only root filesystem (no bytecode writes; only /tmp needs to be writable, the chart mounts an
# emptyDir, docker/compose.yaml a tmpfs).
#   docker build -f docker/gateway.Dockerfile -t registry.example.com/private-llm/gateway:0.1.0 .
# BASE: any Debian-based image; one without Python (a plain Debian base, as scripts/ctr builds with) gets
# Debian's python3. PIP_CERT: a CA bundle for a TLS-intercepting proxy, mounted into the build.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG PIP_CERT=
RUN (command -v python3 >/dev/null && python3 -c "import ensurepip" 2>/dev/null) \
 || (apt-get update -q && apt-get install -y -q --no-install-recommends python3 python3-venv \
     && rm -rf /var/lib/apt/lists/*)
# A C compiler and Python's headers: the request path is compiled with mypyc when the package is installed
# (gateway/native.py; build with --build-arg PRIVATE_LLM_NATIVE=0 for pure Python). Only this stage has them.
ARG PRIVATE_LLM_NATIVE=1
RUN [ "${PRIVATE_LLM_NATIVE}" = 0 ] || { command -v gcc >/dev/null \
      && python3 -c "import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))"; } \
 || (apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev \
       $(python3 -c "import sysconfig, os; print('' if os.path.exists(sysconfig.get_paths()['include'] + '/Python.h') else 'python3-dev')") \
     && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first (their layer stays cached while only our code changes), then our package without them.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > /tmp/requirements.txt \
 && PIP_CERT="${PIP_CERT}" /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt
# Our packages (gateway/, engine/, objectstore/, ...: whatever .dockerignore lets through).
COPY . ./
RUN PIP_CERT="${PIP_CERT}" PRIVATE_LLM_NATIVE="${PRIVATE_LLM_NATIVE}" \
      /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && (cd / && /opt/venv/bin/python -c "import gateway.native as n; print('gateway request path:', n.status())") \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE}
RUN command -v python3 >/dev/null \
 || (apt-get update -q && apt-get install -y -q --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*)
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin gateway
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["llm-gateway"]
CMD ["serve"]
