"""Bad values fail at install time with a message that names the problem (values.schema.json, then the
chart's own checks), before anything reaches the cluster."""

from __future__ import annotations

import helm_python as helm
import pytest

from engine.vllm_args import OWNED_FLAGS
from tests.helm.chart import chart, render_files

MODEL = {"name": "m", "source": "s3://models/m"}


def _install(values: dict) -> None:
    """What `helm install` does with values before creating objects: validate against the schema, render."""
    chart().validate_schema(values)
    render_files(values)


SCHEMA_CASES = {
    "typo at the top level": ({"modles": []}, "additional properties 'modles' not allowed"),
    "typo in engine settings": (
        {"models": [{**MODEL, "settings": {"tensorParalelSize": 2}}]},
        "additional properties 'tensorParalelSize' not allowed",
    ),
    "model without weights": ({"models": [{"name": "m"}]}, "missing property 'source'"),
    "weights not on S3": (
        {"models": [{"name": "m", "source": "https://huggingface.co/x"}]},
        "/models/0/source",
    ),
    "plaintext API key instead of its digest": (
        {"gateway": {"apiKeys": [{"id": "a", "sha256": "sk-live-123"}]}},
        "/gateway/apiKeys/0/sha256",
    ),
    "API key without id": ({"gateway": {"apiKeys": [{"sha256": "a" * 64}]}}, "missing property 'id'"),
    "API keys in the ConfigMap": ({"gateway": {"config": {"api_keys": []}}}, "/gateway/config/api_keys"),
    "models in gateway.config": ({"gateway": {"config": {"models": []}}}, "/gateway/config/models"),
    # gateway.config's schema is generated from the gateway's settings models (scripts/gen_chart_schema.py)
    "misspelled gateway section": ({"gateway": {"config": {"qouta": {}}}}, "additional properties 'qouta' not allowed"),
    "misspelled nested gateway key": (
        {"gateway": {"config": {"audit": {"enabeld": True}}}},
        "additional properties 'enabeld' not allowed",
    ),
    "JWT issuers outside auth": ({"gateway": {"config": {"issuers": []}}}, "additional properties 'issuers' not allowed"),
    "quota limit of the wrong type": (
        {"gateway": {"config": {"quota": {"default": {"rpm": "sixty"}}}}},
        "/gateway/config/quota/default/rpm",
    ),
    "misspelled gatewayModel key": (
        {"models": [{**MODEL, "gatewayModel": {"owner": "x"}}]},
        "additional properties 'owner' not allowed",
    ),
    "misspelled model timeout": ({"models": [{**MODEL, "timeouts": {"frist_byte": 5}}]}, "'frist_byte' not allowed"),
    "GPU memory utilization above 1": (
        {"models": [{**MODEL, "settings": {"gpuMemoryUtilization": 1.5}}]},
        "/models/0/settings/gpuMemoryUtilization",
    ),
    "tensor parallel 0": (
        {"models": [{**MODEL, "settings": {"tensorParallelSize": 0}}]},
        "tensorParallelSize",
    ),
    "unknown workload kind": ({"models": [{**MODEL, "workload": "DaemonSet"}]}, "/models/0/workload"),
    "unknown cache type": ({"models": [{**MODEL, "cache": {"type": "hostPath"}}]}, "/models/0/cache/type"),
    "replicas as text": ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
    "bad resource quantity": ({"models": [{**MODEL, "shmSize": "lots"}]}, "/models/0/shmSize"),
    "short MinIO password": (
        {"minio": {"enabled": True, "rootUser": "u", "rootPassword": "short"}},
        "/minio/rootPassword",
    ),
    "Redis password not URL-safe": ({"redis": {"enabled": True, "password": "p@ss/word"}}, "/redis/password"),
    "blue/green weight above 100": (
        {"models": [{"name": "m", "pools": [{"name": "blue", "source": "s3://models/m", "weight": 150}]}]},
        "weight",
    ),
    "pool without weights anywhere": ({"models": [{"name": "m", "pools": [{"name": "blue"}]}]}, "source"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_rejects(case: str) -> None:
    values, message = SCHEMA_CASES[case]
    with pytest.raises(helm.HelmValuesError) as e:
        _install(values)
    assert message in str(e.value)
    # rendering alone (what `helm template` / `install` run) refuses the same values
    with pytest.raises(helm.HelmValuesError):
        render_files(values)


TEMPLATE_CASES = {
    "fewer GPUs than tensor parallel": (
        {"models": [{**MODEL, "gpus": 1, "settings": {"tensorParallelSize": 4}}]},
        "gpus=1 is less than tensorParallelSize",
    ),
    "shared RWO PVC on a Deployment": (
        {"models": [{**MODEL, "cache": {"type": "pvc"}}]},
        "needs accessModes [ReadWriteMany]",
    ),
    "existingClaim without a name": (
        {"models": [{**MODEL, "cache": {"type": "existingClaim"}}]},
        "needs cache.claimName",
    ),
    "same model twice": ({"models": [MODEL, MODEL]}, 'the model name "m" is used twice'),
    "two names, one engine name": (
        {"models": [MODEL, {"name": "M", "source": "s3://models/m"}]},
        "collides with another model or pool",
    ),
    "every pool at weight 0": (
        {"models": [{"name": "m", "pools": [{"name": "blue", "source": "s3://models/m", "weight": 0}]}]},
        "no upstream takes traffic",
    ),
    "bundled MinIO without credentials": ({"minio": {"enabled": True}}, "minio.enabled needs minio.rootUser"),
    "bundled Redis without password": ({"redis": {"enabled": True}}, "redis.enabled needs redis.password"),
    "S3 key id without its secret": ({"s3": {"accessKeyId": "AK"}}, "s3.secretAccessKey is required"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
def test_chart_checks_reject(case: str) -> None:
    values, message = TEMPLATE_CASES[case]
    chart().validate_schema(values)  # valid by the schema alone: the chart's own checks catch it
    with pytest.raises(helm.HelmRenderError) as e:
        render_files(values)
    assert message in str(e.value)


@pytest.mark.parametrize("flag", sorted(OWNED_FLAGS))
def test_extra_args_cannot_override_typed_settings(flag: str) -> None:
    """The chart refuses the same pass-through flags the engine refuses (engine/vllm_args.OWNED_FLAGS), at
    install time rather than in a crash-looping pod."""
    values = {"models": [{**MODEL, "settings": {"extraArgs": f"--swap-space 4 {flag}=1"}}]}
    with pytest.raises(helm.HelmRenderError, match=f"may not set {flag}"):
        render_files(values)
    # a flag that merely starts with the same letters is fine
    render_files({"models": [{**MODEL, "settings": {"extraArgs": f"{flag}-something 1"}}]})
