"""Head masks (`head_mask=`) honoured by GPT-2 and BERT, equal to Transformers' eager path."""

from __future__ import annotations

import pytest
import torch

import fmodel
from fmodel.facade import AutoModel

from .conftest import make_hf_model, requires_transformers, transformers

pytestmark = requires_transformers


def _tiny(kind: str, tmp_path):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100
        )
        model = transformers.BertModel(config)
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()


HEAD_MASKS = {
    "per-head": lambda: torch.tensor([1.0, 0.0, 1.0, 0.5]),
    "per-layer": lambda: torch.rand(2, 4, generator=torch.Generator().manual_seed(1)),
}


@pytest.mark.parametrize("head_mask", sorted(HEAD_MASKS))
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_head_mask_matches_transformers_eager(kind, attn, head_mask, tmp_path):
    hf = _tiny(kind, tmp_path)
    state = fmodel.load(tmp_path, attn_implementation=attn)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    hm = HEAD_MASKS[head_mask]()
    want = hf(ids, attention_mask=mask, head_mask=hm, output_attentions=True)
    got = fmodel.forward(state, ids, attention_mask=mask, head_mask=hm, output_attentions=True)
    real = mask.bool()
    want_out = want.logits if kind == "gpt2" else want.last_hidden_state
    got_out = got.logits if kind == "gpt2" else got.last_hidden_state
    torch.testing.assert_close(got_out[real], want_out[real], atol=1e-6, rtol=1e-5)
    for w, g in zip(want.attentions, got.attentions, strict=True):
        rows = real[:, None, :, None].expand_as(w)
        torch.testing.assert_close(g[rows], w[rows], atol=1e-6, rtol=1e-5)
    # a zeroed head really is silent
    assert got.attentions[0][:, 1].abs().max() == 0 if head_mask == "per-head" else True


def test_head_mask_changes_the_output_and_ones_do_not(tmp_path):
    _tiny("bert", tmp_path)
    state = fmodel.load(tmp_path)
    ids = torch.randint(0, 100, (1, 5))
    plain = fmodel.forward(state, ids).last_hidden_state
    ones = fmodel.forward(state, ids, head_mask=torch.ones(4)).last_hidden_state
    zeros = fmodel.forward(state, ids, head_mask=torch.zeros(2, 4)).last_hidden_state
    torch.testing.assert_close(ones, plain)
    assert not torch.allclose(zeros, plain)


def test_facade_forward_takes_head_mask(tmp_path):
    hf = _tiny("gpt2", tmp_path)
    model = AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 100, (1, 6))
    hm = torch.tensor([0.0, 1.0, 1.0, 1.0])
    want = hf.transformer(ids, head_mask=hm).last_hidden_state
    torch.testing.assert_close(model(ids, head_mask=hm).last_hidden_state, want, atol=1e-6, rtol=1e-5)


def test_llama_refuses_head_mask_by_name(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    state = fmodel.load(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM does not take a head_mask"):
        fmodel.forward(state, torch.tensor([[1, 2]]), head_mask=torch.ones(4))


def test_head_mask_with_wrong_layer_count_is_named(tmp_path):
    _tiny("bert", tmp_path)
    state = fmodel.load(tmp_path)
    with pytest.raises(ValueError, match="expected 2 layers"):
        fmodel.forward(state, torch.tensor([[1, 2]]), head_mask=torch.ones(3, 4))
