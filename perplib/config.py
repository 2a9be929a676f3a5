"""Typed, frozen configuration of one LLM run (prune -> retrain -> evaluate).

The whole configuration is the key of the run's record in the results store, so every field
that changes a result belongs here, and nothing else does. Fields are validated on construction
with messages that name the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from .sparsity import Sparsity

PRUNE_METHODS = ("none", "magnitude", "wanda", "sparsegpt")
# "auto": each criterion's reference default (magnitude and SparseGPT per matrix/block as in
# their reference code, Wanda per output row as in the Wanda paper); "row" / "matrix" force it.
PRUNE_SCOPES = ("auto", "row", "matrix")
# Parameter groups (Section 3.1): presets and any '+'-joined combination of the groups.
RETRAIN_GROUPS = ("biases", "norms", "head", "lora")
RETRAIN_PRESETS = {
    "none": (),
    "biases": ("biases",),
    "ln": ("biases", "norms"),
    "linear-probing": ("biases", "norms", "head"),
    "perp": ("biases", "norms", "head", "lora"),
    "full": ("full",),
}
LORA_KINDS = ("masked", "plain")
# Which prunable layers get LoRA (perplib.adapters.lora_target_layers): the paper's set for the
# model's family (q,v on OPT, attention on Mixtral, every linear elsewhere), q,v, the attention
# module's linears, or every prunable linear (the released PERP code's list).
LORA_TARGET_SETS = ("paper", "qv", "attention", "all")
HEAD_MODES = ("lora", "full")
DTYPES = ("float32", "bfloat16", "float16")
# Where a BOS token starts a window (evaluation, calibration, training; perplib.data.resolve_bos):
# reference = the reference code's convention (the text tokenized once, so only the first window
# starts with the BOS the tokenizer adds), window = BOS + seqlen-1 text tokens in every window
# (what a model trained to always see BOS, e.g. Gemma, gets from its own tokenizer), none = no BOS,
# auto = window for Gemma families, else reference.
BOS_MODES = ("auto", "reference", "window", "none")
EVAL_SPLITS = ("eval", "val")


def retrain_groups(retrain: str) -> tuple[str, ...]:
    """Expand a preset or a '+'-joined group list (e.g. 'norms+lora') into parameter groups."""
    if retrain in RETRAIN_PRESETS:
        return RETRAIN_PRESETS[retrain]
    parts = tuple(p.strip() for p in retrain.split("+"))
    bad = [p for p in parts if p not in RETRAIN_GROUPS]
    if bad or not parts:
        raise ValueError(
            f"retrain must be a preset {sorted(RETRAIN_PRESETS)} or '+'-joined groups from "
            f"{list(RETRAIN_GROUPS)} (e.g. 'norms+lora'), got '{retrain}'"
        )
    return tuple(g for g in RETRAIN_GROUPS if g in parts)


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        raise ValueError(f"{name} must be an integer {'>= 0' if allow_zero else '>= 1'}, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """One prune-retrain-evaluate run of a causal LM. Defaults: the embedded laptop setting."""

    model: str = field(default="smollm2-135m", metadata={"help": "embedded alias, HF id or local folder"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype for loading: float32|bfloat16|float16"})
    # pruning (Section 2.3, 3.3)
    prune: str = field(default="none", metadata={"help": "pruning criterion: none|magnitude|wanda|sparsegpt"})
    sparsity: str = field(default="0.5", metadata={"help": "ratio in [0, 1) or N:M (2:4, 4:8)"})
    scope: str = field(default="auto", metadata={"help": "compare scores per output row or per matrix"})
    calib: str = field(default="wiki-vital", metadata={"help": "calibration text source"})
    nsamples: int = field(default=128, metadata={"help": "calibration windows"})
    seqlen: int | None = field(
        default=512,
        metadata={"help": "tokens per calibration/training/eval window (None: the model's context, capped at 4096)"},
    )
    bos: str = field(default="auto", metadata={"help": "BOS per window: auto|reference|window|none"})
    seed: int = field(default=0, metadata={"help": "seed for sampling and training"})
    # retraining (Section 3.1, 3.2, Appendix A)
    retrain: str = field(default="none", metadata={"help": "preset or '+'-joined parameter groups"})
    lora: str = field(default="masked", metadata={"help": "LoRA kind: masked (mergeable) | plain"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale alpha/r)"})
    lora_targets: str = field(default="paper", metadata={"help": "layers with LoRA: paper|qv|attention|all"})
    head: str = field(default="lora", metadata={"help": "how the 'head' group trains: lora|full"})
    steps: int = field(default=0, metadata={"help": "optimizer steps of retraining"})
    lr: float = field(default=1e-4, metadata={"help": "initial learning rate (AdamW, linear decay, 10% warmup)"})
    batch_size: int = field(default=2, metadata={"help": "micro-batch size (sequences)"})
    grad_accum: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of steps of linear warmup"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    eval_every: int = field(default=0, metadata={"help": "held-out perplexity every K retraining steps (Figure 3)"})
    train: str = field(default="wiki-vital", metadata={"help": "training text source"})
    # evaluation
    eval: str = field(default="wiki-vital", metadata={"help": "evaluation text source"})
    windows: int | None = field(default=64, metadata={"help": "first K eval windows (None: all)"})
    eval_split: str = field(
        default="eval", metadata={"help": "eval (held-out text) | val (validation text: choosing lr)"}
    )
    zero_shot: str = field(default="", metadata={"help": "comma-separated lm-eval tasks ('paper': Table 11's seven)"})
    # beyond the paper (notebook 40): layer-wise allocation and block-wise reconstruction
    allocation: str = field(default="uniform", metadata={"help": "layer-wise sparsity: uniform | owl"})
    owl_m: float = field(default=5.0, metadata={"help": "OWL: outlier threshold M (x the block's mean score)"})
    owl_lambda: float = field(default=0.08, metadata={"help": "OWL: block sparsities within ±λ of the target"})
    reconstruct: str = field(default="", metadata={"help": "block-wise reconstruction: '' (off) or '+'-joined "
                             "groups of weights|biases|norms|lora"})  # fmt: skip
    reconstruct_steps: int = field(default=8, metadata={"help": "reconstruction AdamW steps per block"})
    reconstruct_lr: float = field(default=2e-4, metadata={"help": "reconstruction learning rate"})

    # Fields added after records were first stored: left out of the record's key while at their
    # default, so the records of every configuration that existed before keep their keys.
    KEY_OMITS_DEFAULT: ClassVar[tuple[str, ...]] = (
        "allocation",
        "owl_m",
        "owl_lambda",
        "reconstruct",
        "reconstruct_steps",
        "reconstruct_lr",
    )

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("bos", self.bos, BOS_MODES)
        _choice("prune", self.prune, PRUNE_METHODS)
        _choice("scope", self.scope, PRUNE_SCOPES)
        _choice("lora", self.lora, LORA_KINDS)
        _choice("lora_targets", self.lora_targets, LORA_TARGET_SETS)
        _choice("head", self.head, HEAD_MODES)
        _choice("eval_split", self.eval_split, EVAL_SPLITS)
        if self.prune != "none":
            # normalise '50%' / 0.5 / '0.50' to one spelling so records key identically
            object.__setattr__(self, "sparsity", str(Sparsity.parse(self.sparsity)))
        for name in ("nsamples", "batch_size", "grad_accum", "lora_rank"):
            _positive(name, getattr(self, name))
        if self.seqlen is not None:  # None: resolved to the model's context before the record key is built
            _positive("seqlen", self.seqlen)
        _positive("steps", self.steps, allow_zero=True)
        _positive("eval_every", self.eval_every, allow_zero=True)
        if self.windows is not None:
            _positive("windows", self.windows)
        retrain_groups(self.retrain)
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (0 <= self.warmup < 1):
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        from .allocation import Allocation

        allocation = Allocation(self.allocation, self.owl_m, self.owl_lambda)
        if self.prune != "none":
            allocation.check(Sparsity.parse(self.sparsity), self.prune, calibrated=True)
        if self.reconstruct:
            from .reconstruct import ReconstructSpec, parse_groups

            if self.prune == "none":
                raise ValueError("reconstruct fits pruned blocks to the dense ones: it needs a prune method")
            ReconstructSpec(parse_groups(self.reconstruct), self.reconstruct_steps, self.reconstruct_lr)

    def key_view(self) -> dict[str, Any]:
        """The configuration as the results store keys it (see ``KEY_OMITS_DEFAULT``)."""
        defaults = RunConfig.__dataclass_fields__
        return {
            f.name: getattr(self, f.name) for f in fields(self)
            if not (f.name in self.KEY_OMITS_DEFAULT and getattr(self, f.name) == defaults[f.name].default)
        }  # fmt: skip

    @property
    def zero_shot_tasks(self) -> tuple[str, ...]:
        from .evaluation import ZERO_SHOT_TASKS

        if self.zero_shot.strip() == "paper":
            return ZERO_SHOT_TASKS
        return tuple(t.strip() for t in self.zero_shot.split(",") if t.strip())

    @property
    def groups(self) -> tuple[str, ...]:
        return retrain_groups(self.retrain)

    def replace(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
