#!/usr/bin/env python3
"""Write helm/private-llm/values.schema.json (JSON Schema draft-07, which every Helm 3/4 validator reads).

The engine settings can be given in three places (engine.defaults, a model entry, a pool of a model), each with
additionalProperties: false so a typo fails at install time; draft-07 cannot merge property sets with allOf under
that rule, so this script composes them once. Edit here, run it, commit both (tests/helm checks they agree).

Usage: scripts/gen_chart_schema.py [--check]
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configkit import json_schema  # noqa: E402
from gateway.settings import GatewaySettings, ModelConfig, UpstreamTimeouts  # noqa: E402

OUT = REPO / "helm" / "private-llm" / "values.schema.json"

STR = {"type": "string"}
BOOL = {"type": "boolean"}
OBJ = {"type": "object"}
ARR = {"type": "array"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
NONNEG = {"type": "integer", "minimum": 0}
POS = {"type": "integer", "minimum": 1}
QUANTITY = {
    "type": ["string", "integer", "number"],
    "pattern": r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|[numkMGTPE]i?)?$",
}
MAP_OF_STR = {"type": "object", "additionalProperties": {"type": "string"}}
SHA256 = r"^(sha256:)?[0-9a-fA-F]{64}$"
S3_OR_PATH = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?|/[^\s]*)$"


def obj(
    props: dict[str, Any],
    required: list[str] | None = None,
    description: str | None = None,
    closed: bool = True,
) -> dict:
    d: dict[str, Any] = {"type": "object", "properties": props}
    if closed:
        d["additionalProperties"] = False
    if required:
        d["required"] = required
    if description:
        d["description"] = description
    return d


def gateway_config_schema() -> dict:
    """The embedded gateway config, from the same pydantic models the gateway validates it with."""
    schema = json_schema(GatewaySettings, skip=frozenset({"config_file"}))
    schema["properties"].update({"api_keys": False, "models": False})
    schema["description"] = (
        "gateway settings (its YAML config file, see `llm-gateway serve --help`); never secrets"
    )
    return schema


def image() -> dict:
    return obj(
        {
            "repository": {"type": "string", "minLength": 1},
            "tag": STR,
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        },
        ["repository"],
    )


def resources() -> dict:
    r = {"type": "object", "additionalProperties": QUANTITY}
    return obj({"requests": r, "limits": r, "claims": ARR})


def probe(with_path: bool) -> dict:
    p = {"periodSeconds": POS, "timeoutSeconds": POS, "failureThreshold": POS}
    if with_path:
        p["path"] = {"type": "string", "pattern": "^/"}
    return obj(p)


ENGINE_SETTINGS = obj(
    {
        "tensorParallelSize": {
            **POS,
            "description": "ENGINE_TENSOR_PARALLEL_SIZE (GPUs per replica unless gpus is set)",
        },
        "pipelineParallelSize": POS,
        "quantization": {
            "type": "string",
            "description": "ENGINE_QUANTIZATION, e.g. fp8; empty = as the checkpoint says",
        },
        "maxModelLen": {**NONNEG, "description": "ENGINE_MAX_MODEL_LEN; 0 = the model's own"},
        "gpuMemoryUtilization": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "maxNumSeqs": NONNEG,
        "maxNumBatchedTokens": NONNEG,
        "dtype": {"enum": ["auto", "half", "float16", "bfloat16", "float", "float32"]},
        "kvCacheDtype": STR,
        "enablePrefixCaching": BOOL,
        "extraArgs": {"type": "string", "description": "any other vLLM arguments (ENGINE_EXTRA_ARGS)"},
        "pullConcurrency": POS,
        "runner": {"enum": ["", "generate", "pooling"], "description": "ENGINE_RUNNER: pooling for embedding/rerank models"},
        "toolCallParser": {
            "type": "string",
            "description": "ENGINE_TOOL_CALL_PARSER (hermes, llama3_json, mistral, ...): the model's tool-call format",
        },
        "enableAutoToolChoice": {"type": "boolean", "description": "ENGINE_ENABLE_AUTO_TOOL_CHOICE (needs toolCallParser)"},
        "toolCallStructuralTags": {
            "type": "boolean",
            "description": "ENGINE_TOOL_CALL_STRUCTURAL_TAGS: false = named tool choices decoded as schema-guided JSON",
        },
        "structuredOutputsDisableAnyWhitespace": {
            "type": "boolean",
            "description": "ENGINE_STRUCTURED_OUTPUTS_DISABLE_ANY_WHITESPACE: JSON output without free whitespace",
        },
        "responsesStore": {"type": "boolean", "description": "ENGINE_RESPONSES_STORE: GET /v1/responses/{id} and cancel"},
        "allowRuntimeLora": {"type": "boolean", "description": "ENGINE_ALLOW_RUNTIME_LORA: `llm-engine lora add/remove`"},
        "maxLoraRank": {**NONNEG, "description": "ENGINE_MAX_LORA_RANK; 0 = vLLM's default"},
    }
)

ENGINE_FIELDS: dict[str, Any] = {
    "workload": {"enum": ["Deployment", "StatefulSet"]},
    "replicas": NONNEG,
    "gpus": {
        **NONNEG,
        "description": "nvidia.com/gpu per replica; 0 = tensorParallelSize x pipelineParallelSize",
    },
    "rollingUpdate": obj(
        {"maxUnavailable": {"type": ["integer", "string"]}, "maxSurge": {"type": ["integer", "string"]}}
    ),
    "settings": ENGINE_SETTINGS,
    "group": obj(
        {
            "size": {**POS, "description": "pods per replica; > 1 renders a LeaderWorkerSet"},
            "launcher": {"enum": ["mp", "ray", "dp"]},
            "gpusPerPod": {**NONNEG, "description": "0 = tensorParallelSize x pipelineParallelSize / size"},
            "dataParallelSize": NONNEG,
            "enableExpertParallel": BOOL,
            "port": PORT,
            "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
            "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
            "nvlinkMulticast": BOOL,
            "ncclEnv": MAP_OF_STR,
            "rdma": obj({"resource": STR, "count": POS}),
        },
        description="one replica over several pods (LeaderWorkerSet)",
    ),
    "drainSeconds": NONNEG,
    "preStopSleepSeconds": NONNEG,
    "shmSize": QUANTITY,
    "cache": obj(
        {
            "type": {"enum": ["emptyDir", "pvc", "existingClaim"]},
            "sizeLimit": {"type": ["string", "integer"]},
            "size": QUANTITY,
            "storageClassName": STR,
            "accessModes": {
                "type": "array",
                "minItems": 1,
                "items": {"enum": ["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]},
            },
            "claimName": STR,
        }
    ),
    "resources": resources(),
    "pullResources": resources(),
    "pullExtraEnv": {**ARR, "description": "extra env of the weight-pulling init container"},
    "pullExtraVolumeMounts": {
        **ARR,
        "description": "extra volumeMounts of the weight-pulling init container",
    },
    "extraVolumes": {**ARR, "description": "extra pod volumes (mount them with extraVolumeMounts)"},
    "extraVolumeMounts": {**ARR, "description": "extra volumeMounts of the engine container"},
    "probes": obj({"startup": probe(False), "readiness": probe(False), "liveness": probe(False)}),
    "nodeSelector": MAP_OF_STR,
    "tolerations": ARR,
    "affinity": OBJ,
    "extraEnv": ARR,
    "podAnnotations": MAP_OF_STR,
    "podLabels": MAP_OF_STR,
    "priorityClassName": STR,
    "runtimeClassName": STR,
    # Generated from the gateway's own model (gateway/settings.py), so chart and gateway never disagree.
    "timeouts": {
        **json_schema(UpstreamTimeouts),
        "description": "gateway-side timeouts towards this model's engines (seconds): connect, first_byte (to the "
        "first event; also bounds a non-streamed generation), idle (longest gap between stream chunks), total",
    },
}

POOL = obj(
    {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 20},
        "weight": {
            "type": "integer",
            "minimum": 0,
            "maximum": 100,
            "description": "0: deployed and warm but no traffic; >0: in the gateway's upstreams",
        },
        "source": {"type": "string", "pattern": S3_OR_PATH},
        **copy.deepcopy(ENGINE_FIELDS),
    },
    ["name"],
)

MODEL = obj(
    {
        "name": {"type": "string", "minLength": 1, "description": "public model name clients send"},
        "key": {
            "type": "string",
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
            "maxLength": 30,
            "description": "short name for the engine's Kubernetes objects (default: from name)",
        },
        "source": {
            "type": "string",
            "pattern": S3_OR_PATH,
            "description": "s3://bucket/prefix of the verified weights (or a path inside the cache volume)",
        },
        "servedModelName": STR,
        "upstreams": {"type": "array", "items": {"type": "string", "pattern": "^(dns\\+)?https?://"}},
        "pools": {"type": "array", "minItems": 1, "items": POOL},
        "gatewayModel": {
            **json_schema(ModelConfig, skip=frozenset({"name", "upstreams"})),
            "description": "extra gateway ModelConfig keys (owned_by, max_connections)",
        },
        **copy.deepcopy(ENGINE_FIELDS),
    },
    ["name"],
)
# A model needs weights: its own source, or every pool's source.
MODEL["anyOf"] = [
    {"required": ["source"]},
    {"required": ["pools"], "properties": {"pools": {"items": {"required": ["source"]}}}},
    {"required": ["upstreams"], "properties": {"replicas": {"const": 0}}},
]

ENGINE_DEFAULTS = obj(copy.deepcopy(ENGINE_FIELDS))

API_KEY = obj(
    {
        "id": {"type": "string", "minLength": 1},
        "sha256": {
            "type": "string",
            "pattern": SHA256,
            "description": "hex sha256 of the key (never the key): `llm-gateway keys hash`",
        },
        "subject": STR,
        "tenant": STR,
        "models": {"type": "array", "items": STR},
        "disabled": BOOL,
    },
    ["id", "sha256"],
)

GATEWAY = obj(
    {
        "image": image(),
        "replicas": NONNEG,
        "port": PORT,
        "metricsPort": PORT,
        "trustedProxies": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "logLevel": {"enum": ["debug", "info", "warning", "error", "critical"]},
        # api_keys belong in apiKeys (a Secret) and models in the top-level models: (false = not allowed here).
        # Generated from GatewaySettings (gateway/settings.py): a typo at any depth fails `helm install`.
        "config": gateway_config_schema(),
        "apiKeys": {"type": "array", "items": API_KEY},
        "apiKeysExistingSecret": obj({"name": STR, "key": {"type": "string", "minLength": 1}}),
        "preStopSleepSeconds": NONNEG,
        "drainSeconds": NONNEG,
        "rollingUpdate": obj(
            {"maxUnavailable": {"type": ["integer", "string"]}, "maxSurge": {"type": ["integer", "string"]}}
        ),
        "resources": resources(),
        "probes": obj({"liveness": probe(True), "readiness": probe(True), "startup": probe(True)}),
        "s3Credentials": BOOL,
        "auditVolume": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "description": "one volume source (emptyDir, persistentVolumeClaim, ...)",
        },
        "extraEnv": ARR,
        "extraVolumes": ARR,
        "extraVolumeMounts": ARR,
        "podAnnotations": MAP_OF_STR,
        "podLabels": MAP_OF_STR,
        "nodeSelector": MAP_OF_STR,
        "tolerations": ARR,
        "affinity": OBJ,
        "topologySpreadConstraints": ARR,
        "priorityClassName": STR,
        "serviceAccount": obj({"create": BOOL, "name": STR, "annotations": MAP_OF_STR}),
        "podSecurityContext": OBJ,
        "securityContext": OBJ,
        "service": obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": PORT,
                "annotations": MAP_OF_STR,
            }
        ),
        "ingress": obj(
            {
                "enabled": BOOL,
                "className": STR,
                "annotations": MAP_OF_STR,
                "hosts": {
                    "type": "array",
                    "items": obj(
                        {
                            "host": STR,
                            "paths": {
                                "type": "array",
                                "items": obj(
                                    {
                                        "path": {"type": "string", "pattern": "^/"},
                                        "pathType": {"enum": ["Prefix", "Exact", "ImplementationSpecific"]},
                                    },
                                    ["path"],
                                ),
                            },
                        },
                        ["host", "paths"],
                    ),
                },
                "tls": ARR,
            }
        ),
        "autoscaling": obj(
            {
                "enabled": BOOL,
                "minReplicas": POS,
                "maxReplicas": POS,
                "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1, "maximum": 100},
                "behavior": OBJ,
            }
        ),
        "podDisruptionBudget": obj(
            {
                "enabled": BOOL,
                "minAvailable": {"type": ["integer", "string"]},
                "maxUnavailable": {"type": ["integer", "string"]},
            }
        ),
    }
)

SCHEMA = obj(
    {
        "nameOverride": STR,
        "fullnameOverride": STR,
        "clusterDomain": {"type": "string", "minLength": 1},
        "commonLabels": MAP_OF_STR,
        "imagePullSecrets": {"type": "array", "items": obj({"name": STR}, ["name"])},
        "gateway": GATEWAY,
        "engine": obj(
            {
                "image": image(),
                "port": PORT,
                "defaults": ENGINE_DEFAULTS,
                "podSecurityContext": OBJ,
                "securityContext": OBJ,
            }
        ),
        "models": {"type": "array", "items": MODEL},
        "s3": obj(
            {
                "endpoint": {"type": "string", "pattern": "^(https?://.+)?$"},
                "region": STR,
                "accessKeyId": STR,
                "secretAccessKey": STR,
                "existingSecret": STR,
                "existingSecretKeys": obj({"accessKeyId": STR, "secretAccessKey": STR}),
                "caBundle": obj(
                    {
                        "secretName": STR,
                        "configMapName": STR,
                        "key": {"type": "string", "minLength": 1},
                    },
                    description="CA certificates (PEM) that sign the S3 endpoint's certificate, from a Secret "
                    "or a ConfigMap; mounted into every container that talks to S3 (AWS_CA_BUNDLE)",
                ),
                "verifySSL": {**BOOL, "description": "false turns certificate checks off (S3_VERIFY_SSL)"},
                "extraEnv": {
                    **ARR,
                    "description": "env for every container that talks to S3 (engine, pull, gateway with "
                    "s3Credentials), e.g. AWS_ROLE_ARN",
                },
            }
        ),
        "networkPolicy": obj(
            {
                "enabled": BOOL,
                "prometheus": obj(
                    {"enabled": BOOL, "namespaceSelector": MAP_OF_STR, "podSelector": MAP_OF_STR}
                ),
            }
        ),
        "monitoring": obj(
            {
                "serviceMonitor": obj(
                    {
                        "enabled": BOOL,
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "labels": MAP_OF_STR,
                    }
                ),
                "prometheusRule": obj({"enabled": BOOL, "labels": MAP_OF_STR}),
                "grafanaDashboards": obj({"enabled": BOOL, "labels": MAP_OF_STR}),
            }
        ),
        "minio": obj(
            {
                "enabled": BOOL,
                "image": image(),
                "rootUser": STR,
                "rootPassword": {
                    "type": "string",
                    "anyOf": [{"maxLength": 0}, {"minLength": 8}],
                    "description": "at least 8 characters (MinIO's rule)",
                },
                "existingSecret": STR,
                "persistence": obj({"enabled": BOOL, "size": QUANTITY, "storageClassName": STR}),
                "resources": resources(),
                "nodeSelector": MAP_OF_STR,
                "tolerations": ARR,
            }
        ),
        "redis": obj(
            {
                "enabled": BOOL,
                "image": image(),
                "password": {
                    "type": "string",
                    "pattern": "^[A-Za-z0-9._~-]*$",
                    "description": "URL-safe characters only (it goes into the Redis URL)",
                },
                "auth": obj(
                    {"existingSecret": STR, "existingSecretPasswordKey": {"type": "string", "minLength": 1}}
                ),
                "persistence": obj({"enabled": BOOL, "size": QUANTITY, "storageClassName": STR}),
                "resources": resources(),
                "nodeSelector": MAP_OF_STR,
                "tolerations": ARR,
                "external": obj(
                    {
                        "url": {"type": "string", "pattern": "^(rediss?://.+)?$"},
                        "existingSecret": STR,
                        "existingSecretKey": {"type": "string", "minLength": 1},
                    }
                ),
                "envVar": {"type": "string", "pattern": "^[A-Z_][A-Z0-9_]*$"},
            }
        ),
        "global": OBJ,
    },
    ["gateway", "engine", "models"],
)
SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "private-llm chart values", **SCHEMA}


def render() -> str:
    return json.dumps(SCHEMA, indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run scripts/gen_chart_schema.py")
            return 1
        return 0
    OUT.write_text(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
