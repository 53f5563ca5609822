"""Build a tiny Llama-architecture model offline: random weights, a byte-level BPE tokenizer trained on
local text (Python's own standard-library sources), bos/eos/pad tokens and a chat template.

No model hub is reachable here, so the tests, the quickstart and the GPU runbook all make their model with
this. The same seed gives byte-identical files. Random weights produce random text: assert structure and
token counts, never content.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ text }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]

# Shapes: "tiny" for CPU tests; the others for GPU runs (random weights, realistic speed).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32),
}


def _corpus_files(limit_bytes: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    out, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > limit_bytes:
            continue
        out.append(str(p))
        total += size
    return out


def build_tokenizer(out_dir: Path, vocab_size: int = 4096, corpus_bytes: int = 3_000_000) -> int:
    """Train a byte-level BPE tokenizer and save it in transformers' format. Returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = _corpus_files(corpus_bytes)
    if files:
        tok.train(files, trainer)
    else:  # no stdlib sources on disk: a small built-in corpus still yields a working tokenizer
        tok.train_from_iterator([CHAT_TEMPLATE * 50, " ".join(map(str, range(5000)))], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2)
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tok.get_vocab_size()


def model_config(vocab_size: int, shape: str = "tiny", max_len: int = 2048) -> dict:
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_hidden_layers"],
        "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"],
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "torch_dtype": "float32" if shape == "tiny" else "bfloat16",
    }


def build_test_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    shape: str = "tiny",
    vocab_size: int = 4096,
    weights: bool = True,
) -> Path:
    """Write config, tokenizer and (unless ``weights=False``, for ``--load-format dummy``) random weights.

    Writes into a temporary directory first and renames it into place, so a half-built model is never used.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file() and (not weights or any(out.glob("*.safetensors"))):
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    n_vocab = build_tokenizer(tmp, vocab_size=vocab_size)
    cfg = model_config(n_vocab, shape)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "do_sample": True}, indent=2)
    )
    if weights:
        _write_random_weights(tmp, cfg, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # someone else published it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_random_weights(out: Path, cfg: dict, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if cfg["torch_dtype"] == "float32" else torch.bfloat16
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rnd(v, h),
        "model.norm.weight": torch.ones(h, dtype=dtype),
        "lm_head.weight": rnd(v, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rnd(nh * hd, h)
        tensors[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, h)
        tensors[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, h)
        tensors[p + "self_attn.o_proj.weight"] = rnd(h, nh * hd)
        tensors[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        tensors[p + "mlp.up_proj.weight"] = rnd(inter, h)
        tensors[p + "mlp.down_proj.weight"] = rnd(h, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


# -- a tiny embedding model (BERT encoder) ------------------------------------------------------------------

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(
    out_dir: Path, vocab_size: int = 4096, corpus_bytes: int = 1_000_000, max_len: int = 512
) -> int:
    """A BERT-style WordPiece tokenizer ([CLS] a [SEP] b [SEP], token type ids) trained on local text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS, show_progress=False
    )
    files = _corpus_files(corpus_bytes)
    if files:
        tok.train(files, trainer)
    else:
        tok.train_from_iterator(
            [" ".join(map(str, range(5000))), "the quick brown fox jumps over the lazy dog"], trainer
        )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
        "model_max_length": max_len,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {k: cfg[k] for k in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token")}, indent=2
        )
    )
    return tok.get_vocab_size()


def build_embedding_model(
    out_dir: str | os.PathLike, *, seed: int = 0, hidden_size: int = 128, layers: int = 2
) -> Path:
    """A tiny random-weight BERT encoder (``BertModel``) that vLLM serves as an embedding (pooling) model:
    ``/v1/embeddings``, and ``/v1/score`` / ``/v1/rerank`` as a bi-encoder (cosine similarity). Mean pooling
    and normalization as sentence-transformers declares them. Same seed, same files."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    max_len = 512
    n_vocab = build_wordpiece_tokenizer(tmp, max_len=max_len)
    cfg = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": n_vocab,
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": hidden_size * 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": max_len,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        # Truncated embeddings (the API's ``dimensions``) are allowed at these sizes.
        "matryoshka_dimensions": [32, 64, hidden_size],
    }
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    # sentence-transformers layout: how vLLM learns the pooling (mean) and normalization.
    (tmp / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ],
            indent=2,
        )
    )
    (tmp / "1_Pooling").mkdir(exist_ok=True)
    (tmp / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden_size,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_cls_token": False,
            },
            indent=2,
        )
    )
    (tmp / "2_Normalize").mkdir(exist_ok=True)
    (tmp / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_len, "do_lower_case": True})
    )
    _write_bert_weights(tmp, cfg, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_bert_weights(out: Path, cfg: dict, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    def ln(prefix: str, t: dict[str, torch.Tensor]) -> None:
        t[prefix + ".weight"] = torch.ones(h)
        t[prefix + ".bias"] = torch.zeros(h)

    t: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": rnd(v, h),
        "embeddings.position_embeddings.weight": rnd(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": rnd(cfg["type_vocab_size"], h),
        "pooler.dense.weight": rnd(h, h),
        "pooler.dense.bias": torch.zeros(h),
    }
    ln("embeddings.LayerNorm", t)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            t[p + f"attention.self.{name}.weight"] = rnd(h, h)
            t[p + f"attention.self.{name}.bias"] = torch.zeros(h)
        t[p + "attention.output.dense.weight"] = rnd(h, h)
        t[p + "attention.output.dense.bias"] = torch.zeros(h)
        ln(p + "attention.output.LayerNorm", t)
        t[p + "intermediate.dense.weight"] = rnd(inter, h)
        t[p + "intermediate.dense.bias"] = torch.zeros(inter)
        t[p + "output.dense.weight"] = rnd(h, inter)
        t[p + "output.dense.bias"] = torch.zeros(h)
        ln(p + "output.LayerNorm", t)
    save_file(
        {k: x.contiguous() for k, x in t.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )


# -- a LoRA adapter (PEFT format) for the tiny generator ----------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_lora_adapter(
    base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, rank: int = 8, alpha: int = 16, seed: int = 1
) -> Path:
    """A PEFT-format LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for a model built
    by ``build_test_model``: rank ``rank`` on the attention projections, random A and B (so it changes the
    output). vLLM loads it with ``--enable-lora`` (at start or at run time)."""
    out = Path(out_dir)
    if (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from safetensors.torch import save_file

    base = json.loads((Path(base_dir) / "config.json").read_text())
    h, nh, nkv = base["hidden_size"], base["num_attention_heads"], base["num_key_value_heads"]
    hd = base.get("head_dim", h // nh)
    out_dims = {"q_proj": nh * hd, "k_proj": nkv * hd, "v_proj": nkv * hd, "o_proj": h}
    in_dims = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": nh * hd}
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(base["num_hidden_layers"]):
        for m in LORA_TARGETS:
            p = f"base_model.model.model.layers.{i}.self_attn.{m}."
            tensors[p + "lora_A.weight"] = torch.randn(rank, in_dims[m], generator=g) * 0.02
            tensors[p + "lora_B.weight"] = torch.randn(out_dims[m], rank, generator=g) * 0.02
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(LORA_TARGETS),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(
        {k: x.contiguous() for k, x in tensors.items()},
        str(tmp / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
