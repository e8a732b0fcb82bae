"""Shared fixtures: tiny random-weight checkpoints written by Transformers (the oracle)."""

from __future__ import annotations

import pytest
import torch

try:
    import transformers
except ImportError:  # only the parity tests need it; CI installs it, so there they always run
    transformers = None

NO_ORACLE = "Transformers (the parity oracle) is not installed; pip install -e '.[test]'"
requires_transformers = pytest.mark.skipif(transformers is None, reason=NO_ORACLE)

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def make_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random Transformers causal LM of `model_type` in eval mode (float32)."""
    if transformers is None:
        pytest.skip(NO_ORACLE)
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[model_type]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[model_type]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **overrides})
    model = model_cls(config).eval()
    # Random init leaves biases at zero and norms at one; perturb them so parity tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytest.mark.usefixtures("one_thread")`): tiny models
    gain nothing from a second thread on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A saved tiny Llama checkpoint (GQA, untied) and its Transformers model."""
    model = make_hf_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    return path, model


def padded_batch(vocab: int = 96, seq: int = 11, seed: int = 0):
    """input_ids [2, seq] and a mask with left padding on row 0 and right padding on row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, seq - 4 :] = 0
    return ids, mask
