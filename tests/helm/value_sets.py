"""Realistic value sets the chart is rendered, linted and validated with."""

from __future__ import annotations

from typing import Any

from tests.helm.chart import example

# Secret values that must never appear outside Secret objects.
S3_SECRET = "s3-secret-Zq8x1Lw0"
REDIS_URL_PASSWORD = "redis-secret-P4ss"
DIGEST = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"

TP2_PVC: dict[str, Any] = {
    "models": [
        {
            "name": "mixtral-8x7b-instruct",
            "key": "mixtral",
            "source": "s3://weights/mixtral-8x7b-instruct/v0.1",
            "replicas": 3,
            "settings": {
                "tensorParallelSize": 2,
                "quantization": "fp8",
                "maxModelLen": 32768,
                "maxNumBatchedTokens": 8192,
                "extraArgs": "--swap-space 8 --disable-log-requests",
            },
            "cache": {
                "type": "pvc",
                "size": "200Gi",
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "nfs",
            },
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "nvidia.com/gpu.product",
                                        "operator": "In",
                                        "values": ["NVIDIA-H100-80GB-HBM3"],
                                    }
                                ]
                            }
                        ]
                    }
                }
            },
            "runtimeClassName": "nvidia",
            # sizes in plain bytes survive the chart's JSON round trip as integers, not 3.4e+10
            "shmSize": 34359738368,
        }
    ],
    "s3": {
        "endpoint": "https://s3.internal.example.com",
        "accessKeyId": "AKIAEXAMPLE",
        "secretAccessKey": S3_SECRET,
    },
    "gateway": {
        "apiKeys": [{"id": "ci", "sha256": DIGEST, "tenant": "ci", "models": ["mixtral-8x7b-instruct"]}],
        "autoscaling": {"enabled": True, "maxReplicas": 6},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": [{"host": "llm.corp.example", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.corp.example"]}],
        },
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
        "s3Credentials": True,
        "config": {"audit": {"archive_bucket": "audit", "archive_prefix": "gateway/"}},
    },
    "redis": {"external": {"url": f"redis://:{REDIS_URL_PASSWORD}@redis.corp.example:6379/2"}},
}

EXTERNAL_SECRETS: dict[str, Any] = {
    "models": [
        {"name": "llama-3.1-8b-instruct", "source": "s3://models/llama-3.1-8b-instruct"},
        {
            "name": "bge-m3",
            "source": "s3://models/bge-m3",
            "gpus": 1,
            "settings": {"gpuMemoryUtilization": 0.3},
        },
    ],
    "s3": {
        "endpoint": "http://minio.storage:9000",
        "existingSecret": "model-store",
        "existingSecretKeys": {"accessKeyId": "access", "secretAccessKey": "secret"},
    },
    "gateway": {"apiKeysExistingSecret": {"name": "llm-api-keys", "key": "keys.yaml"}},
    "redis": {"external": {"existingSecret": "quota-redis", "existingSecretKey": "url"}},
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboards": {"enabled": True},
    },
}

BUNDLED_EXISTING: dict[str, Any] = {
    "minio": {"enabled": True, "existingSecret": "minio-root"},
    "redis": {"enabled": True, "auth": {"existingSecret": "redis-auth"}, "persistence": {"enabled": True}},
    "models": [
        {
            "name": "tiny",
            "source": "s3://models/tiny",
            "cache": {"type": "existingClaim", "claimName": "shared-weights"},
        }
    ],
}

# Multi-pod groups with the other two launchers: Ray (TP 4 x PP 2 over 2 pods) and MoE data + expert parallel.
GROUPS_RAY_DP: dict[str, Any] = {
    "s3": {"endpoint": "http://minio.storage.svc.cluster.local:9000"},
    "models": [
        {
            "name": "big-dense",
            "source": "s3://models/big-dense",
            "replicas": 2,
            "group": {"size": 2, "launcher": "ray", "nvlinkMulticast": True},
            "settings": {"tensorParallelSize": 4, "pipelineParallelSize": 2},
        },
        {
            "name": "big-moe",
            "source": "s3://models/big-moe",
            "group": {
                "size": 4,
                "launcher": "dp",
                "gpusPerPod": 8,
                "dataParallelSize": 32,
                "enableExpertParallel": True,
            },
            "cache": {"type": "emptyDir"},
        },
    ],
}


# MinIO over TLS with an internal CA, IRSA-style settings and extra volumes: nothing forked.
MINIO_TLS: dict[str, Any] = {
    "models": [{"name": "llama-3.1-8b-instruct", "source": "s3://weights/llama-3.1-8b-instruct/v1"}],
    "s3": {
        "endpoint": "https://minio.storage.svc:9000",
        "existingSecret": "s3-keys",
        "caBundle": {"configMapName": "internal-ca", "key": "ca.pem"},
        "extraEnv": [{"name": "AWS_ROLE_SESSION_NAME", "value": "private-llm"}],
    },
    "engine": {
        "defaults": {
            "pullExtraEnv": [{"name": "ENGINE_VERIFY_CACHE", "value": "full"}],
            "pullExtraVolumeMounts": [
                {"name": "aws-token", "mountPath": "/var/run/secrets/aws", "readOnly": True}
            ],
            "extraVolumes": [
                {
                    "name": "aws-token",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"path": "token", "audience": "sts.amazonaws.com"}}
                        ]
                    },
                }
            ],
            "extraVolumeMounts": [
                {"name": "aws-token", "mountPath": "/var/run/secrets/aws", "readOnly": True}
            ],
            "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}],
        }
    },
    "gateway": {
        "s3Credentials": True,
        "config": {"audit": {"enabled": True, "archive_bucket": "llm-audit"}, "workers": 2},
    },
}


def value_sets() -> dict[str, dict[str, Any]]:
    return {
        "defaults": {},
        "h200-single": example("h200-single.yaml"),
        "two-models": example("two-models.yaml"),
        "blue-green": example("blue-green.yaml"),
        "self-contained": example("self-contained.yaml"),
        "tp2-pvc-rwx": TP2_PVC,
        "external-secrets": EXTERNAL_SECRETS,
        "bundled-existing-secrets": BUNDLED_EXISTING,
        "deepseek-r1-h100-2nodes": example("deepseek-r1-h100-2nodes.yaml"),
        "deepseek-r1-h200": example("deepseek-r1-h200.yaml"),
        "groups-ray-dp": GROUPS_RAY_DP,
        "minio-tls": MINIO_TLS,
    }
