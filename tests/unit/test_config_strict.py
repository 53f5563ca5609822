"""Strict configuration: a typo anywhere (YAML key at any depth, GATEWAY_*/ENGINE_* variable) stops start-up
with one line that names the key, where it came from and the closest valid key; `config check` validates
without starting and shows every effective value with its origin, secrets masked; `--help` is generated from
the settings models (every setting, its variable, type, default and meaning)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configkit import ConfigError, field_doc, iter_models, settings_reference
from engine.settings import EngineSettings
from gateway.settings import _NOT_IN_YAML, GatewaySettings, load_settings
from tests.support import REPO, free_port

PY = sys.executable
DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "ENGINE_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", *args],
        capture_output=True,
        text=True,
        env=env or _clean_env(),
        cwd=cwd or REPO,
        timeout=60,
    )


def _write(tmp_path: Path, data: object) -> str:
    p = tmp_path / "gateway.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


FILE_TYPOS = {
    "misspelled section": ({"qouta": {"enabled": True}}, "'qouta'", "'quota'"),
    "nested key": ({"audit": {"enabeld": True}}, "'audit.enabeld'", "'enabled'"),
    "key in a list item": (
        {"models": [{"name": "m", "upstream": ["http://x"]}]},
        "'models[0].upstream'",
        "'upstreams'",
    ),
    "key in a map value, 5 levels deep": (
        {"quota": {"principals": {"app1": {"models": {"m": {"max_concurent": 3}}}}}},
        "'quota.principals.app1.models.m.max_concurent'",
        "'max_concurrent'",
    ),
    "JWT issuers at the top level": ({"issuers": []}, "'issuers'", "valid keys" if False else "'issuers'"),
    "issuer field": (
        {"auth": {"issuers": [{"issuer": "https://i", "audience": "a", "jwks_uri": "https://i/k"}]}},
        "'auth.issuers[0].jwks_uri'",
        "'jwks_url'",
    ),
}


@pytest.mark.parametrize("case", sorted(FILE_TYPOS))
def test_unknown_yaml_key_is_one_line_naming_file_key_and_suggestion(tmp_path: Path, case: str) -> None:
    data, key, hint = FILE_TYPOS[case]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path + ": unknown key ") and key in msg and hint in msg


def test_top_level_issuers_points_nowhere_near_a_silent_default(tmp_path: Path) -> None:
    # docs/deploy.md once documented `issuers` at the top level; it must fail, not turn JWT checking off.
    with pytest.raises(ConfigError, match="unknown key 'issuers'"):
        load_settings(_write(tmp_path, {"issuers": [{"issuer": "https://i", "audience": "a"}]}))


def test_aliases_are_valid_keys(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, {"quota": {"default": {"rpm": 5, "tpm": 10, "concurrency": 2}}}))
    assert (s.quota.default.rpm, s.quota.default.tpm, s.quota.default.concurrency) == (5, 10, 2)


def test_wrong_type_is_one_line_with_path_and_origin(tmp_path: Path) -> None:
    path = _write(tmp_path, {"models": [{"name": "m", "timeouts": {"read": "soon"}}]})
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path) and "models[0].timeouts.read" in msg


def test_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_settings(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(_write(tmp_path, "models: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "var, hint",
    [
        ("GATEWAY_QOUTA__ENABLED", "GATEWAY_QUOTA__ENABLED"),
        ("GATEWAY_QUOTA__REDIS_ULR", "GATEWAY_QUOTA__REDIS_URL"),
        ("GATEWAY_DRAIN_TIMEOT", "GATEWAY_DRAIN_TIMEOUT"),
        ("GATEWAY_AUDIT__ENABLED__X", "is not a section"),
    ],
)
def test_unknown_gateway_variable(monkeypatch: pytest.MonkeyPatch, var: str, hint: str) -> None:
    monkeypatch.setenv(var, "1")
    with pytest.raises(ConfigError) as e:
        GatewaySettings()
    assert str(e.value).startswith(f"environment: unknown variable {var}") and hint in str(e.value)


def test_map_keys_in_variables_are_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_QUOTA__PRINCIPALS__APP1__RPM", "7")
    assert GatewaySettings().quota.principals["app1"].rpm == 7


def test_unknown_engine_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_MAX_MODEL_LENGTH", "4096")
    with pytest.raises(ConfigError, match="ENGINE_MAX_MODEL_LENGTH.*did you mean 'ENGINE_MAX_MODEL_LEN'"):
        EngineSettings(model="/m")


def test_every_settings_model_forbids_unknown_keys() -> None:
    for root in (GatewaySettings, EngineSettings):
        for m in iter_models(root):
            assert m.model_config.get("extra") == "forbid", (
                f"{m.__name__} must be strict (base it on StrictModel)"
            )


def test_every_setting_has_a_meaning() -> None:
    missing = [
        f"{m.__name__}.{n}"
        for root in (GatewaySettings, EngineSettings)
        for m in iter_models(root)
        for n in m.model_fields
        if not field_doc(m, n)
    ]
    assert not missing, f"add a comment above (or a description to) these settings: {missing}"


# ---------------------------------------------------------------------------------------------- CLIs


def test_serve_refuses_a_misspelled_section_before_starting(tmp_path: Path) -> None:
    path = _write(tmp_path, {"qouta": {"enabled": True}})
    port = free_port()
    r = _cli("gateway", "serve", "--config", path, "--port", str(port))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'qouta'" in lines[0] and "did you mean 'quota'" in lines[0]


def test_serve_refuses_an_unknown_variable() -> None:
    r = _cli("gateway", "serve", env=_clean_env(GATEWAY_PROT="9000"))
    assert r.returncode == 2 and "GATEWAY_PROT" in r.stderr and "GATEWAY_PORT" in r.stderr


def test_engine_run_refuses_an_unknown_variable() -> None:
    r = _cli("engine", "run", "--dry-run", env=_clean_env(ENGINE_MODEL="/m", ENGINE_QUANTISATION="fp8"))
    assert r.returncode == 2 and "ENGINE_QUANTISATION" in r.stderr and "ENGINE_QUANTIZATION" in r.stderr


def test_config_check_prints_effective_values_with_origin_and_masks_secrets(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "models": [
                {"name": "m", "upstreams": ["http://127.0.0.1:8000"], "upstream_api_key": "sk-upstream-zz"}
            ],
            "quota": {"default": {"rpm": 60}},
            "api_keys": [{"id": "a", "sha256": DIGEST}],
        },
    )
    env = _clean_env(GATEWAY_PORT="9999", GATEWAY_QUOTA__REDIS_URL="redis://:hunter22@redis:6379/0")
    r = _cli("gateway", "config", "check", path, env=env)
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.splitlines()[1:]:
        left, origin = line.rsplit("  # ", 1)
        key, value = left.split(" = ", 1)
        rows[key.strip()] = (value.strip(), origin)
    assert rows["port"] == ("9999", "env GATEWAY_PORT")
    assert rows["models[0].name"] == ("m", f"file {path}")
    assert rows["quota.default.requests_per_minute"] == ("60", f"file {path}")  # given as `rpm`
    assert rows["host"] == ("127.0.0.1", "default")
    assert rows["models[0].upstream_api_key"][0] == "***"
    assert rows["quota.redis_url"] == ("redis://***@redis:6379/0", "env GATEWAY_QUOTA__REDIS_URL")
    assert "sk-upstream-zz" not in r.stdout and "hunter22" not in r.stdout
    # every setting of the reference appears (lists and maps expand per item)
    for s in settings_reference(GatewaySettings, "GATEWAY_", "__", skip=_NOT_IN_YAML):
        if "[]" not in s.path and "<name>" not in s.path and s.type.split("[")[0] not in ("list", "dict"):
            assert any(k == s.path or k.startswith(s.path + ".") for k in rows), s.path


def test_config_check_exit_1_with_one_line(tmp_path: Path) -> None:
    r = _cli("gateway", "config", "check", _write(tmp_path, {"routing": {"prefix_char": 64}}))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "'routing.prefix_char'" in r.stderr and "'prefix_chars'" in r.stderr


def test_config_check_validates_the_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"id": "a", "sha256": "sk-not-a-digest"}]))
    r = _cli("gateway", "config", "check", _write(tmp_path, {"api_keys_file": str(keys)}))
    assert r.returncode == 1 and "sha256" in r.stderr and str(keys) in r.stderr


def test_engine_config_check(tmp_path: Path) -> None:
    env = _clean_env(ENGINE_MODEL="s3://models/m", ENGINE_API_KEY="sk-engine-zz", ENGINE_MAX_NUM_SEQS="8")
    r = _cli("engine", "config", "check", env=env)
    assert r.returncode == 0, r.stderr
    assert "sk-engine-zz" not in r.stdout
    assert any(line.startswith("api_key = ***") for line in r.stdout.splitlines())
    assert any(
        line.startswith("max_num_seqs = 8") and "env ENGINE_MAX_NUM_SEQS" in line
        for line in r.stdout.splitlines()
    )
    assert any(
        line.startswith("port = 8000") and line.endswith("# default") for line in r.stdout.splitlines()
    )
    r = _cli("engine", "config", "check", env=_clean_env())
    assert r.returncode == 1 and "model" in r.stderr and r.stderr.count("\n") == 1
    r = _cli(
        "engine", "config", "check", env=_clean_env(ENGINE_MODEL="/m", ENGINE_GPU_MEMORY_UTILIZATION="1.5")
    )
    assert r.returncode == 1 and "ENGINE_GPU_MEMORY_UTILIZATION" in r.stderr


def test_help_lists_every_setting_with_variable_type_and_default() -> None:
    r = _cli("gateway", "serve", "--help")
    assert r.returncode == 0
    for s in settings_reference(GatewaySettings, "GATEWAY_", "__", skip=_NOT_IN_YAML):
        assert (s.env or f"(YAML) {s.path}") in r.stdout, s.path
    assert "GATEWAY_QUOTA__OVERLOAD__MAX_WAIT  [float]  default: 2.0" in r.stdout
    assert "GATEWAY_ACCESS_LOG  [bool]  default: true" in r.stdout
    r = _cli("engine", "run", "--help")
    assert r.returncode == 0
    for name in EngineSettings.model_fields:
        assert f"ENGINE_{name.upper()}  [" in r.stdout, name
    assert "ENGINE_MAX_NUM_SEQS  [int?]  default: unset" in r.stdout


def test_version() -> None:
    from gateway import __version__

    for mod, prog in (("gateway", "llm-gateway"), ("engine", "llm-engine")):
        r = _cli(mod, "--version")
        assert r.returncode == 0 and r.stdout.strip() == f"{prog} {__version__}"


def test_chart_schema_for_gateway_config_comes_from_the_models() -> None:
    import json

    schema = json.loads((REPO / "helm/private-llm/values.schema.json").read_text())
    cfg = schema["properties"]["gateway"]["properties"]["config"]
    assert cfg["additionalProperties"] is False
    assert set(cfg["properties"]) == set(GatewaySettings.model_fields) - {"config_file"}
    quota = cfg["properties"]["quota"]
    assert quota["additionalProperties"] is False and "rpm" in quota["properties"]["default"]["properties"]


def test_secret_names() -> None:
    from configkit import is_secret, mask

    for name in ("api_key", "upstream_api_key", "password", "client_secret", "token", "aws_secret_key"):
        assert is_secret(name), name
    for name in (
        "tokens_per_minute",
        "max_token_bytes",
        "verified_token_cache_size",
        "api_keys_file",
        "api_keys",
    ):
        assert not is_secret(name), name
    assert mask("redis_url", "rediss://user:pw@redis:6380/0") == "rediss://***@redis:6380/0"


def test_engine_dry_run_prints_vllms_command_line_without_the_api_key(tmp_path: Path) -> None:
    env = _clean_env(ENGINE_MODEL=str(tmp_path), ENGINE_API_KEY="sk-engine-zz", ENGINE_DEVICE="cpu")
    r = _cli("engine", "run", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert (
        "vllm.entrypoints" in r.stdout
        and f"--model {tmp_path}" in r.stdout
        and "sk-engine-zz" not in r.stdout
    )
