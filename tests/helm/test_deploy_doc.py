"""docs/deploy.md's one-model walkthrough matches the chart: the values file it installs exists and passes,
the Secrets it creates are the ones that file names, the key file its `llm-gateway keys create` line writes
loads into the gateway, and the Service it port-forwards is the one the chart renders."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helm.chart import env_of, example, pod_spec, render
from tests.support import REPO

DOC = (REPO / "docs" / "deploy.md").read_text()


def test_install_command_uses_the_committed_example() -> None:
    m = re.search(r"helm install (\S+) (\S+) -n (\S+) -f (\S+)", DOC)
    assert m, "no helm install line"
    release, chart_path, _ns, values_path = m.groups()
    assert (REPO / chart_path / "Chart.yaml").exists()
    assert (REPO / values_path).exists()
    objs = render(example((REPO / values_path).name), release=release)
    svc = f"{release}-private-llm-gateway"
    assert any(o["kind"] == "Service" and o["metadata"]["name"] == svc for o in objs)
    assert f"port-forward svc/{svc} 8080:80" in DOC


def test_doc_secrets_are_the_ones_the_example_reads() -> None:
    values = example("h200-single.yaml")
    assert f"create secret generic {values['s3']['existingSecret']}" in DOC
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert f"--from-literal={key}=" in DOC
        assert values["s3"].get("existingSecretKeys", {}).get(key, key) == key
    keys = values["gateway"]["apiKeysExistingSecret"]
    assert f"create secret generic {keys['name']} --from-file={keys['key']}" in DOC
    gw = pod_spec(render(values).gateway())
    assert env_of(gw["containers"][0])["GATEWAY_API_KEYS_FILE"].endswith("/" + keys["key"])
    assert any(v.get("secret", {}).get("secretName") == keys["name"] for v in gw["volumes"])
    model = values["models"][0]
    assert f'"model": "{model["name"]}"' in DOC
    assert f"llm-engine push /models/Llama-3.1-8B-Instruct {model['source']}" in DOC


def test_documented_key_command_writes_a_file_the_gateway_loads(tmp_path) -> None:
    from gateway.auth.apikeys import ApiKeyStore

    m = re.search(r"llm-gateway keys create (.*) --file (\S+) > (\S+)", DOC)
    assert m
    args, keys_yaml, key_file = m.groups()
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", *args.split(), "--file", keys_yaml],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    (tmp_path / key_file).write_text(r.stdout)
    store = ApiKeyStore.from_settings([], str(tmp_path / keys_yaml))
    principal = store.lookup(r.stdout.strip())
    assert principal is not None and principal.tenant == "team-a"
    assert r.stdout.strip() not in (tmp_path / keys_yaml).read_text(), (
        "the key must not be in the file that becomes a Secret"
    )
    assert r.stdout.strip() not in r.stderr
