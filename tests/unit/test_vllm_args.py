import json

import pytest

from engine.settings import EngineSettings
from engine.vllm_args import EngineArgsError, build_vllm_command, vllm_environment


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_gpu_defaults_keep_cuda_graphs_and_prefix_caching():
    s = EngineSettings(model="/m", served_model_name="llama")
    cmd = build_vllm_command(s, "/m", device="cuda", python="py")
    assert cmd[:5] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    assert "--enforce-eager" not in cmd
    assert "--enable-prefix-caching" in cmd
    assert _flag(cmd, "--served-model-name") == "llama"
    assert "--tensor-parallel-size" not in cmd


def test_gpu_tuning_knobs_reach_vllm():
    s = EngineSettings(
        model="/m", quantization="fp8", tensor_parallel_size=2, gpu_memory_utilization=0.9,
        max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096, enforce_eager=True,
        enable_chunked_prefill=True, kv_cache_dtype="fp8", extra_args="--swap-space 4 --disable-log-stats",
    )
    cmd = build_vllm_command(s, "/m", device="cuda")
    assert _flag(cmd, "--quantization") == "fp8"
    assert _flag(cmd, "--tensor-parallel-size") == "2"
    assert _flag(cmd, "--gpu-memory-utilization") == "0.9"
    assert _flag(cmd, "--max-num-seqs") == "256"
    assert _flag(cmd, "--max-num-batched-tokens") == "8192"
    assert _flag(cmd, "--max-model-len") == "4096"
    assert _flag(cmd, "--kv-cache-dtype") == "fp8"
    assert "--enforce-eager" in cmd and "--enable-chunked-prefill" in cmd
    assert cmd[-3:] == ["--swap-space", "4", "--disable-log-stats"]


def test_cpu_is_eager_with_kv_cache_size_and_no_gpu_flags():
    s = EngineSettings(model="/m", cpu_kv_cache="64M", gpu_memory_utilization=0.5)
    cmd = build_vllm_command(s, "/m", device="cpu")
    assert "--enforce-eager" in cmd
    assert _flag(cmd, "--kv-cache-memory-bytes") == "64M"
    assert "--gpu-memory-utilization" not in cmd


def test_cpu_rejects_tensor_parallel():
    with pytest.raises(EngineArgsError):
        build_vllm_command(EngineSettings(model="/m", tensor_parallel_size=2), "/m", device="cpu")


def test_passthrough_cannot_override_owned_flags():
    s = EngineSettings(model="/m", extra_args="--port=9999")
    with pytest.raises(EngineArgsError, match="--port"):
        build_vllm_command(s, "/m", device="cuda")


def test_prefix_caching_can_be_turned_off_and_loras_added():
    s = EngineSettings(model="/m", enable_prefix_caching=False, max_loras=2)
    cmd = build_vllm_command(s, "/m", device="cuda", lora_dirs={"sql": "/cache/sql"})
    assert "--no-enable-prefix-caching" in cmd
    assert "--enable-lora" in cmd and "sql=/cache/sql" in cmd and _flag(cmd, "--max-loras") == "2"


def test_served_name_defaults_to_directory_name():
    cmd = build_vllm_command(EngineSettings(model="/models/qwen-7b/"), "/models/qwen-7b/", device="cuda")
    assert _flag(cmd, "--served-model-name") == "qwen-7b"


def test_environment_cpu_knobs_and_nvls_off_on_gpu():
    env = vllm_environment("cpu", {"PATH": "/bin"})
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    env = vllm_environment("cuda", {})
    assert env["NCCL_NVLS_ENABLE"] == "0"


@pytest.mark.parametrize("bad", [{"dtype": "int3"}, {"device": "tpu"}, {"gpu_memory_utilization": 1.5}, {"tensor_parallel_size": 0}])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        EngineSettings(model="/m", **bad)


def test_tools_structured_output_and_runner_reach_vllm():
    s = EngineSettings(
        model="/m",
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
        runner="pooling",
        convert="embed",
        structured_outputs_disable_any_whitespace=True,
        reasoning_parser="qwen3",
    )
    cmd = build_vllm_command(s, "/m", device="cpu")
    assert "--enable-auto-tool-choice" in cmd and _flag(cmd, "--tool-call-parser") == "hermes"
    assert _flag(cmd, "--runner") == "pooling" and _flag(cmd, "--convert") == "embed"
    assert "--enable-prefix-caching" not in cmd  # encoder pooling models have no prefix cache: vLLM decides
    assert _flag(cmd, "--reasoning-parser") == "qwen3"
    # vLLM accepts disable_any_whitespace only with xgrammar or guidance: xgrammar is chosen when none is set.
    assert json.loads(_flag(cmd, "--structured-outputs-config")) == {
        "disable_any_whitespace": True,
        "backend": "xgrammar",
    }
    s = EngineSettings(
        model="/m", structured_outputs_backend="guidance", structured_outputs_disable_any_whitespace=True
    )
    cmd = build_vllm_command(s, "/m", device="cpu")
    assert json.loads(_flag(cmd, "--structured-outputs-config")) == {
        "disable_any_whitespace": True,
        "backend": "guidance",
    }
    plain = build_vllm_command(EngineSettings(model="/m"), "/m", device="cpu")
    for flag in (
        "--runner",
        "--tool-call-parser",
        "--enable-auto-tool-choice",
        "--structured-outputs-config",
        "--enable-lora",
    ):
        assert flag not in plain


def test_runtime_lora_enables_lora_and_sets_vllm_switch():
    s = EngineSettings(model="/m", allow_runtime_lora=True, max_lora_rank=16)
    cmd = build_vllm_command(s, "/m", device="cpu")
    assert "--enable-lora" in cmd and "--lora-modules" not in cmd and _flag(cmd, "--max-lora-rank") == "16"
    assert vllm_environment("cpu", {}, s)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in vllm_environment("cpu", {}, EngineSettings(model="/m"))


@pytest.mark.parametrize(
    "bad, culprit",
    [
        ({"enable_auto_tool_choice": True}, "tool_call_parser"),
        (
            {"structured_outputs_backend": "outlines", "structured_outputs_disable_any_whitespace": True},
            "xgrammar",
        ),
        ({"runner": "draft"}, "runner"),
        ({"structured_outputs_backend": "fast"}, "structured_outputs_backend"),
    ],
)
def test_bad_tool_and_structured_output_settings_name_the_culprit(bad, culprit):
    with pytest.raises(ValueError, match=culprit):
        EngineSettings(model="/m", **bad)
