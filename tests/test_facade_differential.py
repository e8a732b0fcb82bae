"""Differential tests: one script of Transformers API calls, run on Transformers and on fmodel's facade.

`run_script(lib, family, folder, tmp_path)` is written only against the Transformers API; `lib` is
either the `transformers` module or `fmodel.facade`. It loads the same tiny random checkpoint
(written by Transformers, fp32, fixed seed, dropout 0), walks through inference, counting, the
legacy mask helpers, surgery (resize, tie, prune), casts, save/reload and one optimizer step with
gradient checkpointing off and on, and records `(step, value)` pairs. The test runs it with both
libraries and compares the traces step by step (`assert_same_trace` names the first step that
differs), then loads each library's saved checkpoint with the other library.

Comparison rules (`same`): tensors by dtype, shape and `allclose` with a tolerance for their dtype
(1e-5 for fp32 forwards); shapes, counts, names and configs exactly; floats to 1e-6 relative.

What is deliberately *not* compared, and why:
  * resize_token_embeddings: the new rows are random in both libraries, so only their shapes and
    spread are compared; the script then writes the same deterministic values into the new rows
    with plain tensor writes, after which full forwards are compared again.
  * get_memory_footprint: Transformers' GPT-2 keeps two causal-mask buffers per layer
    (`attn.bias`, `attn.masked_bias`) that fmodel does not need (it builds masks per call);
    the footprint is compared with those buffers subtracted, and fmodel's raw footprint must be
    smaller ("footprint/raw" steps).
  * Llama-like prune_heads: Transformers 4.57 has no `_prune_heads` for Llama, Qwen2 or Mistral
    (see `test_prune_heads_has_no_oracle`), so there is no oracle; the step is skipped.

Forward outputs are compared at every position, padding included (both libraries give the same
values even for left-padding queries that see no key). After the optimizer step, parameters are
compared to 1% of the learning rate (see `train_step`); gradients and losses at 1e-5.

KNOWN_GAPS lists (family, step) pairs where fmodel currently differs from Transformers. Those steps
are left out of `test_same_script_same_results` (the rest of the trace is still compared), and each
has a `test_known_gap` case that skips, saying how fmodel differs, while the gap is there and fails
once it is gone, so the entry gets removed.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="Transformers (the differential oracle) is not installed; pip install -e '.[test]'"
)
facade = pytest.importorskip("fmodel.facade")

# (family id pattern, step pattern), fnmatch-style: steps where fmodel's facade is known to differ
# from Transformers 4.57. Each entry is also a test of its own (`test_known_gap`) that skips while the
# gap is there and fails once it is gone, so fixed entries get removed. Empty this set as gaps close.
_LM_HEADS = ("llama-*", "qwen2", "mistral", "gpt2-lm", "bert-mlm", "bert-cls")
_WITH_OUTPUT_EMBEDDINGS = ("llama-*", "qwen2", "mistral", "gpt2-lm", "bert-mlm")
_TIED = ("llama-tied-mqa", "gpt2-lm", "bert-mlm", "gemma*")
KNOWN_GAPS: set[tuple[str, str]] = {
    # Intended difference: fmodel's ties are declared, so after set_input_embeddings a tied output
    # projection follows the new matrix; Transformers' lm_head keeps the old Parameter (untied)
    # until tie_weights() ties it again. After tie_weights() both agree (checked by the next steps).
    *((fam, "tie/tied_after_set_input_embeddings") for fam in _TIED),
}

VOCAB = 96
NEW_VOCAB = 101  # resized with pad_to_multiple_of=8 -> 104
SEQ = 9
LR = 1e-2


# -- the families --------------------------------------------------------------------------------


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random init leaves biases at 0 and norms at 1; perturb them so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or "ln_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _decoder(config_cls: str, model_cls: str, **overrides) -> Callable[[], torch.nn.Module]:
    def build():
        values = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attention_dropout=0.0,
        )
        config = getattr(transformers, config_cls)(**{**values, **overrides})
        return getattr(transformers, model_cls)(config)

    return build


def _gpt2(model_cls: str) -> Callable[[], torch.nn.Module]:
    def build():
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return getattr(transformers, model_cls)(config)

    return build


def _bert(model_cls: str, **overrides) -> Callable[[], torch.nn.Module]:
    def build():
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=112,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **overrides,
        )
        return getattr(transformers, model_cls)(config)

    return build


@dataclass(frozen=True)
class Family:
    id: str
    cls_name: str  # the family class, same name in both libraries
    auto: str  # the Auto class that should pick `cls_name`
    build: Callable[[], torch.nn.Module]  # a Transformers model (called under a fixed seed)
    task: str  # "causal_lm", "base", "masked_lm", "seq_cls"
    decoder: bool  # Llama-like (has num_key_value_heads)
    prune: tuple[dict[int, list[int]], ...] | None = None
    prune_skip: str = ""
    mask_buffers: tuple[str, ...] = ()  # Transformers-only causal-mask buffers (name suffixes)
    extra_config_keys: tuple[str, ...] = field(default=())


NO_LLAMA_PRUNING = "Transformers 4.57 cannot prune heads of Llama-like models (no _prune_heads): no oracle"
GPT2_MASKS = ("attn.bias", "attn.masked_bias")
PRUNE_TWICE = ({0: [1, 2]}, {0: [2, 3], 1: [0]})  # the second call overlaps the first (union)

FAMILIES = [
    Family(
        "llama-untied-gqa",
        "LlamaForCausalLM",
        "AutoModelForCausalLM",
        _decoder("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=False),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "llama-tied-mqa",
        "LlamaForCausalLM",
        "AutoModelForCausalLM",
        _decoder("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True, num_key_value_heads=1),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "qwen2",
        "Qwen2ForCausalLM",
        "AutoModelForCausalLM",
        _decoder("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=False),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "mistral",
        "MistralForCausalLM",
        "AutoModelForCausalLM",
        _decoder("MistralConfig", "MistralForCausalLM", tie_word_embeddings=False),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "gemma2",
        "Gemma2ForCausalLM",
        "AutoModelForCausalLM",
        # no attention soft-cap here: the script's oracle loads with Transformers' default sdpa,
        # which drops it (tests/test_parity_gemma.py compares it with Transformers' eager)
        _decoder(
            "Gemma2Config",
            "Gemma2ForCausalLM",
            head_dim=16,
            sliding_window=4,
            attn_logit_softcapping=None,
            final_logit_softcapping=5.0,
        ),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "gemma3-text",
        "Gemma3ForCausalLM",
        "AutoModelForCausalLM",
        _decoder(
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            head_dim=16,
            sliding_window=4,
            sliding_window_pattern=2,
            rope_local_base_freq=20.0,
            final_logit_softcapping=5.0,
        ),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "qwen3",
        "Qwen3ForCausalLM",
        "AutoModelForCausalLM",
        _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=16, tie_word_embeddings=False),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "olmo",
        "OlmoForCausalLM",
        "AutoModelForCausalLM",
        _decoder("OlmoConfig", "OlmoForCausalLM", clip_qkv=2.0, pad_token_id=1),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "olmo2",
        "Olmo2ForCausalLM",
        "AutoModelForCausalLM",
        _decoder("Olmo2Config", "Olmo2ForCausalLM", pad_token_id=1),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "phi3",
        "Phi3ForCausalLM",
        "AutoModelForCausalLM",
        _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, sliding_window=4),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "mixtral",
        "MixtralForCausalLM",
        "AutoModelForCausalLM",
        _decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "qwen3-moe",
        "Qwen3MoeForCausalLM",
        "AutoModelForCausalLM",
        _decoder(
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
        "causal_lm",
        decoder=True,
        prune_skip=NO_LLAMA_PRUNING,
    ),
    Family(
        "gpt2-lm",
        "GPT2LMHeadModel",
        "AutoModelForCausalLM",
        _gpt2("GPT2LMHeadModel"),
        "causal_lm",
        decoder=False,
        prune=PRUNE_TWICE,
        mask_buffers=GPT2_MASKS,
    ),
    Family(
        "gpt2-base",
        "GPT2Model",
        "AutoModel",
        _gpt2("GPT2Model"),
        "base",
        decoder=False,
        prune=PRUNE_TWICE,
        mask_buffers=GPT2_MASKS,
    ),
    Family(
        "bert-base", "BertModel", "AutoModel", _bert("BertModel"), "base", decoder=False, prune=PRUNE_TWICE
    ),
    Family(
        "bert-mlm",
        "BertForMaskedLM",
        "AutoModelForMaskedLM",
        _bert("BertForMaskedLM"),
        "masked_lm",
        decoder=False,
        prune=PRUNE_TWICE,
    ),
    Family(
        "bert-cls",
        "BertForSequenceClassification",
        "AutoModelForSequenceClassification",
        _bert(
            "BertForSequenceClassification",
            num_labels=3,
            id2label={0: "neg", 1: "neutral", 2: "pos"},
            label2id={"neg": 0, "neutral": 1, "pos": 2},
        ),
        "seq_cls",
        decoder=False,
        prune=PRUNE_TWICE,
        extra_config_keys=("id2label",),
    ),
]
BY_ID = {f.id: f for f in FAMILIES}


# -- the recorded trace ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raised:
    """A step that raised: recorded instead of its value, so the script goes on."""

    error: str
    message: str


@dataclass(frozen=True)
class Spread:
    """Freshly initialised values (random in both libraries): compared by mean and std only."""

    mean: float
    std: float


@dataclass(frozen=True)
class Below:
    """fmodel's value must be smaller than Transformers' (memory with buffers fmodel does not need)."""

    value: int


@dataclass(frozen=True)
class Close:
    """A value compared with an absolute tolerance of its own (see `train_step`)."""

    value: Any
    atol: float


class Trace:
    def __init__(self) -> None:
        self.steps: list[tuple[str, Any]] = []

    def add(self, name: str, value: Any) -> None:
        assert name not in dict(self.steps), f"duplicate step {name}"
        self.steps.append((name, _snapshot(value)))

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Record `fn()` under `name` (a module by its class name); an exception is recorded as
        `Raised` and None returned."""
        try:
            value = fn()
        except Exception as exc:  # a gap in one library must not hide the later steps
            self.add(name, Raised(type(exc).__name__, str(exc)[:300]))
            return None
        self.add(name, type(value).__name__ if isinstance(value, torch.nn.Module) else value)
        return value


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Close):
        return Close(_snapshot(value.value), value.atol)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


def _atol(dtype: torch.dtype) -> float:
    return {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}.get(dtype, 1e-5)


def _rtol(dtype: torch.dtype) -> float:
    return {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}.get(dtype, 1e-5)


def same(ours: Any, theirs: Any, where: str = "", atol: float | None = None) -> str | None:
    """None when `ours` (fmodel) matches `theirs` (Transformers), else why not (naming `where`).

    `atol` overrides the floating-point tolerance (set by `Close`)."""
    if isinstance(theirs, Raised) or isinstance(ours, Raised):  # both raised the same kind of error
        if isinstance(ours, Raised) and isinstance(theirs, Raised) and ours.error == theirs.error:
            return None
        return f"{where}: fmodel {ours!r} vs Transformers {theirs!r}"
    if isinstance(theirs, Close):
        if not isinstance(ours, Close):
            return f"{where}: fmodel {type(ours).__name__} vs Transformers Close"
        return same(ours.value, theirs.value, where, theirs.atol)
    if isinstance(theirs, Below):
        if not isinstance(ours, Below) or ours.value >= theirs.value:
            return f"{where}: fmodel {ours} should be below Transformers' {theirs.value}"
        return None
    if isinstance(theirs, Spread):
        if not isinstance(ours, Spread):
            return f"{where}: {ours!r} is not a Spread"
        if abs(ours.mean - theirs.mean) > 0.5 * theirs.std or not 0.5 < ours.std / theirs.std < 2:
            return f"{where}: new values spread {ours} vs Transformers {theirs}"
        return None
    if isinstance(theirs, torch.Tensor):
        if not isinstance(ours, torch.Tensor):
            return f"{where}: fmodel gave {type(ours).__name__}, Transformers a tensor"
        if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
            return f"{where}: fmodel {ours.dtype}{list(ours.shape)} vs Transformers {theirs.dtype}{list(theirs.shape)}"
        if not ours.is_floating_point():
            return None if torch.equal(ours, theirs) else f"{where}: integer tensors differ"
        tol = _atol(theirs.dtype) if atol is None else atol
        if not torch.allclose(ours, theirs, rtol=_rtol(theirs.dtype), atol=tol, equal_nan=True):
            diff = (ours.double() - theirs.double()).abs().nan_to_num(float("inf")).max().item()
            return f"{where}: max abs difference {diff:.3g} ({theirs.dtype})"
        return None
    if isinstance(theirs, dict):
        if not isinstance(ours, dict) or set(ours) != set(theirs):
            missing = set(theirs) - set(ours or {}) if isinstance(ours, dict) else "?"
            extra = set(ours) - set(theirs) if isinstance(ours, dict) else "?"
            return (
                f"{where}: keys differ (missing {sorted(map(str, missing))}, extra {sorted(map(str, extra))})"
            )
        for key in theirs:
            why = same(ours[key], theirs[key], f"{where}[{key!r}]", atol)
            if why:
                return why
        return None
    if isinstance(theirs, (list, tuple)):
        if not isinstance(ours, (list, tuple)) or len(ours) != len(theirs):
            return f"{where}: fmodel {ours!r} vs Transformers {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            why = same(a, b, f"{where}[{i}]", atol)
            if why:
                return why
        return None
    if isinstance(theirs, float) and not isinstance(ours, bool) and isinstance(ours, (int, float)):
        return (
            None if math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-7) else f"{where}: {ours} vs {theirs}"
        )
    if type(ours) is not type(theirs) or ours != theirs:
        return f"{where}: fmodel {ours!r} vs Transformers {theirs!r}"
    return None


def is_gap(family: str, step: str) -> bool:
    return any(fnmatch.fnmatchcase(family, f) and fnmatch.fnmatchcase(step, s) for f, s in KNOWN_GAPS)


def assert_same_trace(family: str, ours: list[tuple[str, Any]], theirs: list[tuple[str, Any]]) -> None:
    """Compare step by step in Transformers' order and fail at the first difference, naming the step.
    Steps in KNOWN_GAPS are left out here (`test_known_gap` reports on them)."""
    ours_by_name, theirs_names = dict(ours), [n for n, _ in theirs]
    assert [n for n, _ in ours] == theirs_names, (
        f"{family}: the scripts recorded different steps; Transformers-only "
        f"{[n for n in theirs_names if n not in ours_by_name]}, fmodel-only "
        f"{[n for n in ours_by_name if n not in set(theirs_names)]}"
    )
    for name, expected in theirs:
        if not is_gap(family, name):
            why = same(ours_by_name[name], expected, name)
            assert why is None, f"{family}: first differing step is {why}"


# -- the script (Transformers API only) ---------------------------------------------------------------


def batch(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [2, SEQ]; row 0 is padded on the left, row 1 on the right."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, SEQ - 3 :] = 0
    return ids, mask


def labels_for(family: Family, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    if family.task == "causal_lm":
        return ids.masked_fill(mask == 0, -100)
    if family.task == "masked_lm":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, ::2] = -100  # predict only some positions
        return labels
    if family.task == "seq_cls":
        return torch.tensor([0, 2])
    return None


FIELDS = {
    "causal_lm": ("logits",),
    "masked_lm": ("logits",),
    "seq_cls": ("logits",),
    "base": ("last_hidden_state", "pooler_output"),
}


def outputs(family: Family, model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The forward outputs that matter for the family, on a padded batch, without gradients."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return {key: getattr(out, key) for key in FIELDS[family.task] if getattr(out, key, None) is not None}


def config_keys(family: Family) -> list[str]:
    if family.cls_name.startswith("GPT2"):
        keys = ["vocab_size", "n_embd", "n_head", "n_layer", "n_positions"]
    else:
        keys = ["vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"]
    if family.decoder:
        keys.append("num_key_value_heads")
    return [*keys, "model_type", "tie_word_embeddings", "pad_token_id", *family.extra_config_keys]


def config_view(family: Family, config) -> dict[str, Any]:
    """The config fields the script's steps change or depend on, read as attributes."""
    view = {k: getattr(config, k) for k in config_keys(family)}
    view["pruned_heads"] = {int(k): sorted(v) for k, v in config.pruned_heads.items()}
    if "id2label" in view:
        view["id2label"] = {int(k): v for k, v in view["id2label"].items()}
    return view


def config_to_dict(family: Family, config) -> dict[str, Any]:
    """The same fields read through `config.to_dict()` (Transformers: every field, defaults too)."""
    data = config.to_dict()
    view = {k: data.get(k, "<absent>") for k in config_keys(family)}
    view["pruned_heads"] = {int(k): sorted(v) for k, v in data.get("pruned_heads", {}).items()}
    if isinstance(view.get("id2label"), dict):
        view["id2label"] = {int(k): v for k, v in view["id2label"].items()}
    return view


def tied(model) -> bool | None:
    out = model.get_output_embeddings()
    if out is None:
        return None
    return out.weight is model.get_input_embeddings().weight


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def footprint(family: Family, model, trace: Trace, step: str) -> None:
    """Memory footprint with and without buffers; Transformers-only mask buffers subtracted."""
    mask_bytes = sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(family.mask_buffers)
    )
    trace.add(f"{step}/footprint", model.get_memory_footprint() - mask_bytes)
    trace.add(f"{step}/footprint_no_buffers", model.get_memory_footprint(return_buffers=False))
    if family.mask_buffers:
        trace.add(f"{step}/footprint/raw", Below(model.get_memory_footprint()))


def counts(model, trace: Trace, step: str) -> None:
    trace.add(f"{step}/num_parameters", model.num_parameters())
    trace.add(f"{step}/num_parameters_only_trainable", model.num_parameters(only_trainable=True))
    trace.add(f"{step}/num_parameters_exclude_embeddings", model.num_parameters(exclude_embeddings=True))


def fill_new_rows(model, old_vocab: int) -> None:
    """Give the rows a resize added the same values in both libraries (they start random)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old_vocab:] = torch.randn(emb[old_vocab:].shape, generator=g, dtype=emb.dtype) * 0.02
        head = model.get_output_embeddings()
        if head is not None and head.weight is not emb:
            head.weight[old_vocab:] = torch.randn(head.weight[old_vocab:].shape, generator=g) * 0.02
        if head is not None and getattr(head, "bias", None) is not None:
            head.bias[old_vocab:] = torch.randn(head.bias[old_vocab:].shape, generator=g) * 0.02


def saved_files(folder: Path) -> dict[str, Any]:
    """What a save wrote: file names, every tensor's dtype and shape, and the config's key facts."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(key)
                tensors[key] = (str(t.dtype), tuple(t.shape))
    config = json.loads((folder / "config.json").read_text())
    return {
        "files": sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")),
        "tensors": tensors,
        "architectures": config.get("architectures"),
        "dtype": config.get("dtype", config.get("torch_dtype")),
        "vocab_size": config.get("vocab_size"),
        "pruned_heads": {int(k): sorted(v) for k, v in config.get("pruned_heads", {}).items()},
    }


def reload_and_forward(lib, family: Family, folder: Path, trace: Trace, step: str) -> None:
    """Load `folder` with `lib`'s family class; record class, mode, config, shapes, ties and forwards."""
    model = getattr(lib, family.cls_name).from_pretrained(folder)
    trace.add(f"{step}/training", model.training)
    trace.add(f"{step}/dtype", model.dtype)
    trace.add(f"{step}/config", config_view(family, model.config))
    trace.add(f"{step}/state_dict_shapes", shapes(model))
    trace.add(f"{step}/tied", tied(model))
    counts(model, trace, step)
    ids, mask = batch(model.config.vocab_size)
    trace.add(f"{step}/forward", outputs(family, model, ids, mask))


def train_step(lib, family: Family, folder: Path, trace: Trace, checkpointing: bool) -> None:
    """One AdamW step on a batch with labels (or a loss on the hidden states for base models)."""
    step = f"train/checkpointing={'on' if checkpointing else 'off'}"
    model = getattr(lib, family.cls_name).from_pretrained(folder)
    model.train()
    trace.add(f"{step}/training", model.training)
    if checkpointing:  # fmodel refuses reentrant checkpointing (no gradients with frozen inputs)
        trace.run(
            f"{step}/gradient_checkpointing_enable",
            lambda: model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            ),
        )
    else:
        trace.run(f"{step}/gradient_checkpointing_disable", model.gradient_checkpointing_disable)
    trace.add(f"{step}/is_gradient_checkpointing", model.is_gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, mask = batch(VOCAB)
    labels = labels_for(family, ids, mask)
    out = model(input_ids=ids, attention_mask=mask, **({} if labels is None else {"labels": labels}))
    if labels is not None:
        loss = out.loss
    else:  # a user's own loss on the base model's outputs (real positions only)
        loss = out.last_hidden_state[mask.bool()].pow(2).mean()
        if getattr(out, "pooler_output", None) is not None:
            loss = loss + out.pooler_output.pow(2).mean()
    loss.backward()
    trace.add(f"{step}/loss", loss.item())
    trace.add(
        f"{step}/grads",
        {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
    )
    optimizer.step()
    optimizer.zero_grad()
    # AdamW's first step is lr * g / (|g| + eps): for the few entries whose gradient is about eps
    # (1e-9 here), a 1e-10 difference in g moves the update by ~1e-5. Gradients are compared at 1e-5
    # above; updated parameters to 1% of the learning rate.
    trace.add(f"{step}/updated_parameters", Close(dict(model.named_parameters()), atol=LR * 1e-2))
    model.eval()
    trace.add(f"{step}/forward_after_step", outputs(family, model, ids, mask))


def run_script(lib, family: Family, folder: Path, tmp_path: Path) -> list[tuple[str, Any]]:
    """The differential script: Transformers API calls only; `lib` is transformers or fmodel.facade."""
    trace = Trace()
    ids, mask = batch()

    # load (through the Auto class) -------------------------------------------------------------
    model = getattr(lib, family.auto).from_pretrained(folder)
    trace.add("load/class", type(model).__name__)
    trace.add("load/training", model.training)
    trace.add("load/dtype", model.dtype)
    trace.add("load/config", config_view(family, model.config))
    trace.add("load/config.to_dict", config_to_dict(family, model.config))
    trace.add("load/state_dict_shapes", shapes(model))
    trace.add("load/named_parameters", [n for n, _ in model.named_parameters()])
    trace.add("load/tied", tied(model))
    with torch.no_grad():
        fields = model(input_ids=ids, attention_mask=mask).keys()
    trace.add(
        "load/output_fields", [k for k in fields if k != "past_key_values"]
    )  # no KV cache in the facade
    trace.add("load/forward", outputs(family, model, ids, mask))
    trace.add("load/forward_no_mask", outputs(family, model, ids, torch.ones_like(mask)))

    # counting ------------------------------------------------------------------------------------
    counts(model, trace, "stats")
    inputs = {"input_ids": ids, "attention_mask": mask}
    trace.add("stats/estimate_tokens", model.estimate_tokens(inputs))
    trace.add("stats/floating_point_ops", model.floating_point_ops(inputs))
    trace.add(
        "stats/floating_point_ops_with_embeddings", model.floating_point_ops(inputs, exclude_embeddings=False)
    )
    footprint(family, model, trace, "stats")
    model.get_input_embeddings().weight.requires_grad_(False)  # a frozen embedding
    trace.add(
        "stats/frozen_embeddings/num_parameters_only_trainable", model.num_parameters(only_trainable=True)
    )
    trace.add(
        "stats/frozen_embeddings/footprint_no_buffers", model.get_memory_footprint(return_buffers=False)
    )
    model.get_input_embeddings().weight.requires_grad_(True)

    # legacy mask helpers -------------------------------------------------------------------------
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    trace.add("masks/get_extended_attention_mask", model.get_extended_attention_mask(mask, ids.shape))
    trace.add(
        "masks/get_extended_attention_mask_3d",
        model.get_extended_attention_mask(mask[:, None].expand(2, SEQ, SEQ), ids.shape),
    )
    trace.add("masks/invert_attention_mask", model.invert_attention_mask(mask))
    trace.add(
        "masks/invert_attention_mask_3d", model.invert_attention_mask(mask[:, None].expand(2, SEQ, SEQ))
    )
    trace.add(
        "masks/create_extended_attention_mask_for_decoder",
        model.create_extended_attention_mask_for_decoder(ids.shape, mask),
    )
    trace.add("masks/get_head_mask_none", model.get_head_mask(None, layers))
    head_mask = torch.ones(heads)
    head_mask[1] = 0
    trace.add("masks/get_head_mask_1d", model.get_head_mask(head_mask, layers))
    trace.add(
        "masks/get_head_mask_2d",
        model.get_head_mask(torch.rand(layers, heads, generator=torch.Generator().manual_seed(3)), layers),
    )
    trace.add(
        "masks/get_head_mask_chunked", model.get_head_mask(head_mask, layers, is_attention_chunked=True)
    )

    # resize_token_embeddings ------------------------------------------------------------------------
    old_embedding = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings()
    old_head = None if old_head is None else old_head.weight.detach().clone()
    unchanged = model.resize_token_embeddings()  # no arguments: only returns the embedding
    trace.add(
        "resize/no_arguments", (unchanged is model.get_input_embeddings(), tuple(unchanged.weight.shape))
    )
    returned = trace.run(
        "resize/resize_token_embeddings",
        lambda: model.resize_token_embeddings(NEW_VOCAB, pad_to_multiple_of=8, mean_resizing=False),
    )
    embedding = model.get_input_embeddings()
    new_vocab = embedding.weight.shape[0]
    trace.add("resize/returned_is_input_embeddings", returned is embedding)
    trace.add("resize/embedding_shape", tuple(embedding.weight.shape))
    trace.add("resize/config", config_view(family, model.config))
    trace.add("resize/state_dict_shapes", shapes(model))
    trace.add("resize/kept_rows_unchanged", torch.equal(embedding.weight[:VOCAB], old_embedding))
    trace.add(
        "resize/new_rows",
        Spread(embedding.weight[VOCAB:].mean().item(), embedding.weight[VOCAB:].std().item()),
    )
    head = model.get_output_embeddings()
    if head is not None:
        trace.add("resize/output_shape", tuple(head.weight.shape))
        trace.add("resize/output_kept_rows_unchanged", torch.equal(head.weight[:VOCAB], old_head))
        if getattr(head, "bias", None) is not None:
            trace.add("resize/output_bias_shape", tuple(head.bias.shape))
    trace.add("resize/tied", tied(model))
    counts(model, trace, "resize")
    # old token ids; logits over the new (still random) vocabulary columns are left out
    old_outputs = outputs(family, model, ids, mask)
    if "logits" in old_outputs and family.task in ("causal_lm", "masked_lm"):
        old_outputs["logits"] = old_outputs["logits"][..., :VOCAB]
    trace.add("resize/forward_old_ids", old_outputs)
    fill_new_rows(model, VOCAB)
    new_ids, _ = batch(new_vocab)
    trace.add("resize/forward_new_ids", outputs(family, model, new_ids, mask))

    # set_input/output_embeddings, then tie_weights ----------------------------------------------------
    # new modules with the same values (so forwards stay comparable): this unties a tied model until
    # tie_weights() ties it again; an untied model stays untied (the config decides).
    trace.run(
        "tie/set_input_embeddings",
        lambda: model.set_input_embeddings(copy.deepcopy(model.get_input_embeddings())),
    )
    trace.add("tie/tied_after_set_input_embeddings", tied(model))
    if model.get_output_embeddings() is not None:
        new_head = copy.deepcopy(model.get_output_embeddings())
        trace.run("tie/set_output_embeddings", lambda: model.set_output_embeddings(new_head))
        trace.add("tie/tied_after_set_output_embeddings", tied(model))
    trace.run("tie/tie_weights", model.tie_weights)
    trace.add("tie/tied", tied(model))
    trace.add("tie/num_parameters", model.num_parameters())
    trace.add("tie/forward", outputs(family, model, new_ids, mask))

    # prune_heads -----------------------------------------------------------------------------------------
    if family.prune is not None:
        for i, heads_to_prune in enumerate(family.prune):
            trace.run(f"prune/{i}/prune_heads", lambda h=heads_to_prune: model.prune_heads(h))
            trace.add(f"prune/{i}/config", config_view(family, model.config))
            trace.add(f"prune/{i}/state_dict_shapes", shapes(model))
            counts(model, trace, f"prune/{i}")
            trace.add(f"prune/{i}/forward", outputs(family, model, new_ids, mask))

    # casts ---------------------------------------------------------------------------------------------
    trace.run("cast/half", model.half)
    trace.add("cast/half/dtype", model.dtype)
    trace.add("cast/half/parameter_dtypes", sorted({str(p.dtype) for p in model.parameters()}))
    trace.add("cast/half/forward", outputs(family, model, new_ids, mask))
    trace.add("cast/half/get_extended_attention_mask", model.get_extended_attention_mask(mask, ids.shape))
    trace.add("cast/half/invert_attention_mask", model.invert_attention_mask(mask))
    footprint(family, model, trace, "cast/half")
    trace.run("cast/float", model.float)
    trace.add("cast/float/dtype", model.dtype)
    trace.add("cast/float/forward", outputs(family, model, new_ids, mask))
    trace.add("cast/float/tied", tied(model))
    trace.run("cast/float64", lambda: model.to(torch.float64))
    trace.add("cast/float64/dtype", model.dtype)
    trace.add("cast/float64/forward", outputs(family, model, new_ids, mask))
    trace.add("cast/float64/tied", tied(model))
    trace.run("cast/back", lambda: model.to("cpu", dtype=torch.float32))
    trace.add("cast/back/dtype", model.dtype)
    trace.add("cast/back/device", str(model.device))
    footprint(family, model, trace, "cast/back")

    # save and reload in the same library ----------------------------------------------------------------
    saved = tmp_path / f"saved-{lib.__name__}"
    trace.run("save/save_pretrained", lambda: model.save_pretrained(saved))
    files = saved_files(saved)
    trace.add("save/file_names", files.pop("files"))
    trace.add("save/contents", files)
    trace.add("save/forward_before", outputs(family, model, new_ids, mask))
    reload_and_forward(lib, family, saved, trace, "reload")

    # one optimizer step, gradient checkpointing off then on ------------------------------------------------
    for checkpointing in (False, True):
        train_step(lib, family, saved, trace, checkpointing)
    return trace.steps


# -- the tests --------------------------------------------------------------------------------------------

_TRACES: dict[str, tuple[list, list]] = {}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spin-waits
    make each forward ~50x slower; restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def traces(family_id: str, tmp_path_factory) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(fmodel's trace, Transformers' trace) for a family, with the cross-library steps; computed once."""
    if family_id not in _TRACES:
        family = BY_ID[family_id]
        root = tmp_path_factory.mktemp(family_id)
        torch.manual_seed(0)
        _perturb(family.build()).save_pretrained(root / "checkpoint")
        torch.manual_seed(0)
        theirs = run_script(transformers, family, root / "checkpoint", root / "hf")
        torch.manual_seed(0)
        ours = run_script(facade, family, root / "checkpoint", root / "fm")
        # cross-library: each library loads the other's save and must see what Transformers
        # saw reloading its own ("reload/..." steps)
        expected = {name.removeprefix("reload/"): v for name, v in theirs if name.startswith("reload/")}
        for step, lib, saved in (
            ("cross/transformers_loads_fmodel", transformers, root / "fm" / f"saved-{facade.__name__}"),
            ("cross/fmodel_loads_transformers", facade, root / "hf" / f"saved-{transformers.__name__}"),
        ):
            cross = Trace()
            reload_and_forward(lib, family, saved, cross, step)
            for name, value in cross.steps:
                ours.append((name, value))
                theirs.append((name, expected[name.removeprefix(step + "/")]))
        _TRACES[family_id] = ours, theirs
    return _TRACES[family_id]


@pytest.mark.parametrize("family_id", list(BY_ID))
def test_same_script_same_results(family_id, tmp_path_factory):
    ours, theirs = traces(family_id, tmp_path_factory)
    assert_same_trace(family_id, ours, theirs)
    # the script covered what it should (no step silently missing)
    names = {n for n, _ in theirs}
    family = BY_ID[family_id]
    assert ("prune/1/forward" in names) == (family.prune is not None), family.prune_skip
    assert {"train/checkpointing=on/updated_parameters", "cross/fmodel_loads_transformers/forward"} <= names


_GAP_CASES = sorted(
    {(f.id, step) for fam, step in KNOWN_GAPS for f in FAMILIES if fnmatch.fnmatchcase(f.id, fam)}
)


@pytest.mark.parametrize(
    ("family_id", "step"), _GAP_CASES or [pytest.param(None, None, marks=pytest.mark.skip)]
)
def test_known_gap(family_id, step, tmp_path_factory):
    """Skips, saying how fmodel differs, while a KNOWN_GAPS step differs; fails once it matches."""
    ours, theirs = traces(family_id, tmp_path_factory)
    ours_by_name = dict(ours)
    matched = [n for n, _ in theirs if fnmatch.fnmatchcase(n, step)]
    assert matched, f"KNOWN_GAPS entry {step!r} names no step of the script: remove or fix it"
    differences = [why for n, v in theirs if n in matched and (why := same(ours_by_name.get(n), v, n))]
    if differences:
        pytest.skip(f"known gap in fmodel's facade: {'; '.join(differences)}")
    pytest.fail(f"{family_id}: {step!r} now matches Transformers: remove it from KNOWN_GAPS")


@pytest.mark.parametrize("family_id", [f.id for f in FAMILIES if f.prune is None])
def test_prune_heads_has_no_oracle(family_id):
    """Why Llama-like families leave prune_heads out of the script: Transformers 4.57 cannot prune
    them. Fails (so the step gets enabled) once the oracle can."""
    model = BY_ID[family_id].build()
    assert not hasattr(model.base_model, "_prune_heads")
    with pytest.raises(AttributeError, match="_prune_heads"):
        model.prune_heads({0: [0, 1]})
    pytest.skip(BY_ID[family_id].prune_skip)


def test_the_comparison_names_the_first_differing_step():
    a = [("x", 1), ("y", torch.ones(2)), ("z", 3)]
    b = [("x", 1), ("y", torch.ones(2) + 1e-3), ("z", 4)]
    with pytest.raises(AssertionError, match=r"first differing step is y: max abs difference"):
        assert_same_trace("demo", a, b)
    with pytest.raises(AssertionError, match=r"Transformers-only \['w'\]"):
        assert_same_trace("demo", a, [*b, ("w", 0)])
    assert same(torch.ones(2, dtype=torch.float16), torch.ones(2)) is not None  # dtypes must match
    assert same(Close(torch.ones(2), 1e-2), Close(torch.ones(2) + 1e-3, 1e-2)) is None
    assert same({"a": (1, 2)}, {"a": [1, 2]}) is None and same({"a": 1}, {"b": 1}) is not None
    assert same(Below(3), Below(4)) is None and same(Below(4), Below(4)) is not None
    assert same(Raised("KeyError", "x"), Raised("KeyError", "y")) is None
    assert same(Raised("KeyError", "x"), None) is not None
