import json

import pytest

from engine.settings import EngineSettings
from engine.vllm_args import VLLM_SERVE, EngineArgsError, build_vllm_command, vllm_environment


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
        model="/m",
        quantization="fp8",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.9,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_model_len=4096,
        enforce_eager=True,
        enable_chunked_prefill=True,
        kv_cache_dtype="fp8",
        extra_args="--swap-space 4 --disable-log-stats",
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


@pytest.mark.parametrize(
    "bad",
    [{"dtype": "int3"}, {"device": "tpu"}, {"gpu_memory_utilization": 1.5}, {"tensor_parallel_size": 0}],
)
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        EngineSettings(model="/m", **bad)


def test_scheduling_policy_reaches_vllm_only_when_set():
    cmd = build_vllm_command(EngineSettings(model="/m", scheduling_policy="priority"), "/m", device="cuda")
    assert _flag(cmd, "--scheduling-policy") == "priority"
    assert "--scheduling-policy" not in build_vllm_command(EngineSettings(model="/m"), "/m", device="cpu")
    with pytest.raises(EngineArgsError, match="--scheduling-policy"):
        build_vllm_command(EngineSettings(model="/m", extra_args="--scheduling-policy fcfs"), "/m", device="cpu")
    with pytest.raises(ValueError):
        EngineSettings(model="/m", scheduling_policy="lifo")
def test_api_key_reaches_vllm_through_its_environment_never_argv():
    s = EngineSettings(model="/m", api_key="sk-engine-secret")
    cmd = build_vllm_command(s, "/m", device="cuda")
    assert not any("sk-engine-secret" in a for a in cmd) and "--api-key" not in cmd
    env = vllm_environment("cuda", {"ENGINE_API_KEY": "sk-engine-secret", "PATH": "/bin"}, s.api_key)
    assert env["VLLM_API_KEY"] == "sk-engine-secret"
    assert "ENGINE_API_KEY" not in env and env["PATH"] == "/bin"


# ------------------------------------------------- the flags we emit exist in the vLLM releases we run


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
    assert vllm_environment("cpu", {}, settings=s)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in vllm_environment("cpu", {}, settings=EngineSettings(model="/m"))
    # named/required tool choices as schema-guided JSON (honours no-free-whitespace) instead of structural tags
    off = EngineSettings(model="/m", tool_call_structural_tags=False, responses_store=True)
    assert vllm_environment("cpu", {}, settings=off)["VLLM_ENFORCE_STRICT_TOOL_CALLING"] == "0"
    assert vllm_environment("cpu", {}, settings=off)["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"
    assert "VLLM_ENFORCE_STRICT_TOOL_CALLING" not in vllm_environment("cpu", {}, settings=EngineSettings(model="/m"))


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


def _pinned_gpu_vllm() -> str:
    """The vLLM release of the GPU image: the official image's tag in docker/engine.Dockerfile (ARG defaults
    substituted into the last FROM)."""
    import re

    from tests.support import REPO

    text = (REPO / "docker" / "engine.Dockerfile").read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^\s*ARG\s+(\w+)=(\S+)", text, re.M))
    base = re.findall(r"^\s*FROM\s+(\S+)", text, re.M)[-1]
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    m = re.fullmatch(r"vllm/vllm-openai:v?(\d+\.\d+\.\d+)", base)
    assert m, f"the engine image is not FROM vllm/vllm-openai:vX.Y.Z with a default tag: {base}"
    return m.group(1)


def _every_command() -> list[list[str]]:
    """Commands that together exercise every flag build_vllm_command can emit (both values of each switch)."""
    on = dict(
        served_model_name="m",
        max_model_len=4096,
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        seed=1,
        load_format="safetensors",
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        quantization="fp8",
        kv_cache_dtype="fp8",
        gpu_memory_utilization=0.9,
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        enforce_eager=True,
        max_loras=2,
        max_lora_rank=16,
        api_key="k",
        cpu_kv_cache="1G",
        drain_timeout=60,
    )
    off = dict(enable_prefix_caching=False, enable_chunked_prefill=False)
    loras = {"sql": "/cache/sql", "chat": "/cache/chat"}
    cmds = [
        build_vllm_command(
            EngineSettings(model="/m", **on), "/m", device="cuda", python="py", lora_dirs=loras
        ),
        build_vllm_command(EngineSettings(model="/m", **off), "/m", device="cuda", python="py"),
        build_vllm_command(
            EngineSettings(model="/m", **{**on, "tensor_parallel_size": 1, "pipeline_parallel_size": 1}),
            "/m",
            device="cpu",
            python="py",
            lora_dirs=loras,
        ),
        build_vllm_command(EngineSettings(model="/m", **off), "/m", device="cpu", python="py"),
        # The OpenAI features: tools, structured output, a pooling model, run-time LoRA (last: the checks below
        # look at the first four by position).
        build_vllm_command(
            EngineSettings(
                model="/m",
                runner="pooling",
                convert="embed",
                tool_call_parser="hermes",
                enable_auto_tool_choice=True,
                reasoning_parser="qwen3",
                structured_outputs_disable_any_whitespace=True,
                allow_runtime_lora=True,
                max_lora_rank=8,
            ),
            "/m",
            device="cpu",
            python="py",
        ),
    ]
    # Multi-pod groups: each launcher and role (engine/group.py).
    from engine.group import resolve_plan

    lws = {"LWS_LEADER_ADDRESS": "lead", "LWS_GROUP_SIZE": "2"}
    for extra, index in (
        ({}, "0"),
        ({}, "1"),
        ({"group_launcher": "ray"}, "0"),
        ({"group_launcher": "dp", "data_parallel_size": 4, "enable_expert_parallel": True}, "1"),
    ):
        es = EngineSettings(model="/m", **{**off, "tensor_parallel_size": 2, **extra})
        plan = resolve_plan(es, {**lws, "LWS_WORKER_INDEX": index})
        cmds.append(build_vllm_command(es, "/m", device="cuda", python="py", plan=plan))
    out = []
    for c in cmds:
        if c[1] == "-c":  # a group: `vllm serve MODEL` == the server parser with --model MODEL
            assert c[1:5] == ["-c", VLLM_SERVE, "serve", "/m"]
            out.append(["--model", "/m", *c[5:]])
        else:
            assert c[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
            out.append(c[3:])
    return out


def _flag_literals() -> set[str]:
    """Every '--flag' string in engine/vllm_args.py (emitted or owned), whatever branch emits it."""
    import ast

    from tests.support import REPO

    tree = ast.parse((REPO / "engine" / "vllm_args.py").read_text())
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and n.value.startswith("--")
        and len(n.value) > 2
        and " " not in n.value
    }


def test_every_flag_is_accepted_by_the_pinned_gpu_release():
    import json

    from tests.support import REPO

    version = _pinned_gpu_vllm()
    data = REPO / "tests" / "data" / f"vllm-{version}-flags.json"
    assert data.is_file(), f"no flag list for vLLM {version}: run python scripts/vllm_flags.py {version}"
    flags = json.loads(data.read_text())["flags"]
    unknown = sorted(_flag_literals() - set(flags))
    assert not unknown, f"vLLM {version} has no {unknown}"
    seen = set()
    for argv in _every_command():
        i = 0
        while i < len(argv):
            flag = argv[i]
            assert flag in flags, f"vLLM {version} has no {flag} (in {argv})"
            seen.add(flag)
            spec = flags[flag]
            if not spec["value"]:
                i += 1
                continue
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            assert values, f"{flag} needs a value"
            if spec["choices"]:
                assert all(v in spec["choices"] for v in values), (
                    f"{flag} {values}: vLLM {version} takes {spec['choices']}"
                )
    # The commands above really cover every flag the builder has (a new branch needs a new command here).
    assert seen >= _flag_literals() - _owned_only()


def _owned_only() -> set[str]:
    """Flags only listed as owned (refused in the pass-through), not emitted by the builder."""
    from engine.vllm_args import OWNED_FLAGS

    emitted = {a for argv in _every_command() for a in argv if a.startswith("--")}
    return set(OWNED_FLAGS) - emitted


def test_every_command_parses_with_the_installed_cpu_build():
    """The real parser of the vLLM CPU build used by the tests (make_arg_parser + validate_parsed_serve_args)."""
    import json
    import subprocess
    import sys

    from tests.support import REPO

    code = r"""
import json, sys
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
import vllm
parser = make_arg_parser(FlexibleArgumentParser())
known = sorted({s for a in parser._actions for s in a.option_strings})
parsed = []
for argv in json.loads(sys.argv[1]):
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    parsed.append({k: getattr(args, k, None) for k in ("model", "shutdown_timeout", "enable_prefix_caching",
                                                        "kv_cache_memory_bytes", "enforce_eager", "port")})
print("RESULT=" + json.dumps({"version": vllm.__version__, "known": known, "parsed": parsed}, default=str))
"""
    cmds = _every_command()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_NO_USAGE_STATS": "1",
        "PYTHONPATH": str(REPO),
    }
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cmds)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        cwd="/tmp",
    )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT=")), None)
    assert r.returncode == 0 and line, r.stderr[-3000:]
    out = json.loads(line[len("RESULT=") :])
    assert not sorted(_flag_literals() - set(out["known"])), f"vLLM {out['version']} (CPU) lacks some flags"
    assert [p["model"] for p in out["parsed"]] == ["/m"] * len(cmds)
    assert [p["shutdown_timeout"] for p in out["parsed"]][:4] == [55, 55, 55, 55]
    assert [p["enable_prefix_caching"] for p in out["parsed"]][:4] == [True, False, True, False]
    assert out["parsed"][2]["kv_cache_memory_bytes"] == 1024**3
    assert all(p["enforce_eager"] for p in out["parsed"][2:4])
