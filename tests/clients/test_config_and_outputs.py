"""The facade's `model.config` (a mutable Transformers-shaped view of the frozen config),
`from_pretrained` / `from_config` keyword handling, and the output classes, each compared with
what Transformers 4.57 does on the same checkpoint."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import fmodel
from fmodel.errors import ConfigError
from fmodel.facade import outputs as own_outputs

from .conftest import max_diff, transformers

IDS = torch.tensor([[4, 11, 9, 13, 8, 5], [4, 12, 14, 10, 5, 0]])
MASK = (IDS != 0).long()


def both(kind, checkpoint, auto="AutoModelForCausalLM", **kwargs):
    folder = checkpoint(kind)
    hf = getattr(transformers, auto).from_pretrained(folder, **kwargs).eval()
    ours = getattr(fmodel, auto).from_pretrained(folder, **kwargs)
    return folder, hf, ours


# --------------------------------------------------------------------------- the config view


def test_config_reads_like_transformers(checkpoint):
    _, hf, ours = both("llama", checkpoint)
    assert type(ours.config).__name__ == type(hf.config).__name__ == "LlamaConfig"
    theirs = hf.config.to_dict()
    mine = ours.config.to_dict()
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                "tie_word_embeddings", "pad_token_id", "id2label", "label2id", "task_specific_params",
                "prefix", "problem_type", "output_hidden_states", "return_dict", "is_encoder_decoder"):
        assert mine[key] == theirs[key], key
    for name in ("_commit_hash", "task_specific_params", "prefix", "use_return_dict", "num_labels",
                 "is_encoder_decoder", "use_cache", "name_or_path", "_attn_implementation"):
        assert getattr(ours.config, name) == getattr(hf.config, name), name
    assert ours.config.get_text_config() is ours.config
    assert ours.name_or_path == hf.name_or_path
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        _ = ours.config.not_a_field


def test_writes_that_change_nothing_structural_keep_the_module_tree(checkpoint):
    _, _, ours = both("llama", checkpoint)
    layer = ours.model.layers[0]
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    before = ours(IDS).logits
    ours.config.use_cache = False
    ours.config.pad_token_id = 3
    ours.config.my_note = {"kept": True}  # an unknown key is stored, as Transformers stores it
    assert ours.model.layers[0] is layer and ours.state.config.pad_token_id == 3
    assert ours.config.use_cache is False and ours.state.config.extra["my_note"] == {"kept": True}
    assert torch.equal(ours(IDS).logits, before) and len(calls) == 2


def test_a_write_that_changes_numerics_installs_a_new_state(checkpoint, tmp_path):
    folder, _, ours = both("llama", checkpoint)
    ours.config.rms_norm_eps = 0.5
    assert ours.state.config.rms_norm_eps == 0.5
    # the model now computes what its config says: equal to a Transformers model built with it
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.rms_norm_eps == 0.5
    assert max_diff(hf(IDS).logits, ours(IDS).logits) < 1e-4
    assert max_diff(hf(IDS).logits, transformers.AutoModelForCausalLM.from_pretrained(folder)(IDS).logits) > 1e-3


def test_a_write_the_tensors_cannot_follow_is_refused_by_name(checkpoint):
    _, _, ours = both("llama", checkpoint)
    before = ours.state
    with pytest.raises(ConfigError, match=r"hidden_size|embed_tokens.*resize_token_embeddings"):
        ours.config.hidden_size = 32
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        ours.config.rms_norm_eps = "small"
    assert ours.state.config is before.config


def test_attn_implementation_num_labels_and_update(checkpoint):
    _, hf, ours = both("bert-cls", checkpoint, "AutoModelForSequenceClassification")
    ours.config._attn_implementation = "eager"
    assert ours.state.attn_implementation == "eager" == ours.config._attn_implementation
    for config in (hf.config, ours.config):
        config.update({"finetuning_task": "demo"})
        config.update_from_string("hidden_dropout_prob=0.25,output_hidden_states=true")
    for key in ("id2label", "label2id", "finetuning_task", "hidden_dropout_prob", "output_hidden_states"):
        assert getattr(ours.config, key) == getattr(hf.config, key), key
    # Transformers lets num_labels disagree with its classifier; fmodel's state cannot, and says how
    with pytest.raises(ConfigError, match=r"classifier\.weight: \[2, 64\] -> \[4, 64\].*num_labels"):
        ours.config.num_labels = 4
    llama = fmodel.AutoModelForCausalLM.from_pretrained(checkpoint("llama"))
    llama.config.num_labels = 4  # no classifier: only the label maps change, as in Transformers
    assert llama.config.id2label == {i: f"LABEL_{i}" for i in range(4)} and llama.config.num_labels == 4


def test_config_save_json_and_copies(checkpoint, tmp_path):
    _, hf, ours = both("llama", checkpoint)
    ours.config.save_pretrained(tmp_path)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.hidden_size == hf.config.hidden_size and loaded.model_type == "llama"
    assert json.loads(ours.config.to_json_string()) == json.loads((tmp_path / "config.json").read_text())
    detached = copy.deepcopy(ours.config)
    detached.pad_token_id = 7
    assert ours.config.pad_token_id == 0 and detached.pad_token_id == 7
    # a Transformers config and a view are accepted wherever a config is
    model = fmodel.AutoModelForCausalLM.from_config(hf.config)
    assert model.config.hidden_size == 64 and model.state.config.tie_word_embeddings
    assert fmodel.AutoModelForCausalLM.from_config(detached).config.pad_token_id == 7
    # replacing the whole config
    ours.config = detached
    assert ours.state.config.pad_token_id == 7


# --------------------------------------------------------------------------- loading keywords


def test_from_pretrained_config_keywords_as_transformers(checkpoint):
    folder = checkpoint("bert-cls")
    labels = {0: "neg", 1: "neu", 2: "pos"}
    kwargs = dict(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
                  ignore_mismatched_sizes=True)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    ours = fmodel.AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    assert ours.config.id2label == hf.config.id2label == labels
    assert ours.config.label2id == hf.config.label2id
    assert ours.classifier.weight.shape == hf.classifier.weight.shape == (3, 64)
    hidden = fmodel.AutoModelForSequenceClassification.from_pretrained(folder, output_hidden_states=True)
    assert len(hidden(IDS, attention_mask=MASK).hidden_states) == 3
    for cls in (transformers.AutoModelForSequenceClassification, fmodel.AutoModelForSequenceClassification):
        with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'"):
            cls.from_pretrained(folder, not_an_option=1)


def test_from_pretrained_with_a_config_and_no_config_json(checkpoint, tmp_path):
    folder = checkpoint("llama")
    weights = tmp_path / "weights-only"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes((__import__("pathlib").Path(folder) / "model.safetensors").read_bytes())
    config = transformers.AutoConfig.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(weights, config=config)
    ours = fmodel.AutoModelForCausalLM.from_pretrained(weights, config=config)
    assert max_diff(hf(IDS).logits, ours(IDS).logits) < 1e-4


def test_from_config_keywords(checkpoint):
    config = transformers.AutoConfig.from_pretrained(checkpoint("llama"))
    model = fmodel.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        fmodel.AutoModelForCausalLM.from_config(config, bogus=1)


def test_transformers_base_class_attributes(checkpoint):
    _, hf, ours = both("llama", checkpoint)
    assert isinstance(ours, transformers.PreTrainedModel) and isinstance(ours, fmodel.PreTrainedModel)
    import inspect

    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(hf.forward).parameters.values())
    assert ours.accepts_loss_kwargs == getattr(hf, "accepts_loss_kwargs", takes_kwargs)  # Trainer's test
    for name in ("main_input_name", "supports_gradient_checkpointing", "_supports_sdpa", "is_parallelizable",
                 "_tied_weights_keys", "can_generate"):
        mine, theirs = getattr(ours, name, "?"), getattr(hf, name, "?")
        if callable(mine):
            mine, theirs = mine(), theirs()
        assert mine == theirs, name
    assert ours._no_split_modules == [type(ours.model.layers[0]).__name__]
    assert ours.loss_type == hf.loss_type == "ForCausalLM"
    # pickling and deep copies keep the class and the numbers
    for copied in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(copied) is type(ours) and torch.equal(copied(IDS).logits, ours(IDS).logits)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    ("kind", "auto"),
    [("llama", "AutoModelForCausalLM"), ("gpt2", "AutoModelForCausalLM"), ("bert", "AutoModel"),
     ("bert-mlm", "AutoModelForMaskedLM"), ("bert-cls", "AutoModelForSequenceClassification")],
)
def test_outputs_are_transformers_output_classes(kind, auto, checkpoint):
    _, hf, ours = both(kind, checkpoint, auto)
    labels = torch.tensor([0, 1]) if kind == "bert-cls" else IDS
    kwargs = {} if kind == "bert" else {"labels": labels}
    theirs = hf(IDS, attention_mask=MASK, **kwargs)
    mine = ours(IDS, attention_mask=MASK, **kwargs)
    assert type(mine) is type(theirs)
    assert list(mine.keys()) == list(theirs.keys())  # decoders: a cache by default in eval, as config.use_cache
    for key in mine:
        if key != "past_key_values":  # fmodel's KVCache, Transformers' DynamicCache
            assert max_diff(mine[key], theirs[key]) < 1e-4, key
    assert max_diff(mine[0], theirs[0]) < 1e-4 and len(mine.to_tuple()) == len(mine)
    assert not hasattr(mine, "to") and not hasattr(mine, "not_a_field")
    as_tuple = ours(IDS, attention_mask=MASK, return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple) and max_diff(as_tuple[0], mine[0]) == 0


def test_own_output_classes_behave_as_transformers():
    out = own_outputs.CausalLMOutputWithPast(logits=torch.ones(1, 2, 3))
    assert list(out.keys()) == ["logits"] and out[0] is out.logits is out["logits"]
    assert out.loss is None and out.to_tuple() == (out.logits,)
    out.loss = torch.tensor(1.0)  # a field set later stays an attribute; keys are what __init__ set
    out["hidden_states"] = (torch.zeros(1),)
    assert out.hidden_states is out["hidden_states"]
    for refused in (lambda: out.pop("logits"), lambda: out.update(a=1), lambda: out.setdefault("a", 1)):
        with pytest.raises(TypeError):
            refused()
    with pytest.raises(AttributeError):
        _ = out.not_a_field
    assert not hasattr(out, "to")
    again = pickle.loads(pickle.dumps(out))
    assert type(again) is type(out) and torch.equal(again.logits, out.logits)
    flat, spec = torch.utils._pytree.tree_flatten(out)
    assert torch.utils._pytree.tree_unflatten(flat, spec).keys() == out.keys()


def test_use_cache_returns_a_cache_that_continues(checkpoint):
    _, hf, ours = both("llama", checkpoint)
    first = ours(IDS[:, :4], attention_mask=MASK[:, :4], use_cache=True)
    assert isinstance(first.past_key_values, fmodel.KVCache)
    step = ours(IDS[:, 4:5], attention_mask=MASK[:, :5], past_key_values=first.past_key_values)
    theirs = hf(IDS[:, :5], attention_mask=MASK[:, :5]).logits[:, -1]
    assert max_diff(step.logits[:, -1], theirs) < 1e-4
    assert step.past_key_values.length == 5


@pytest.mark.parametrize(("kind", "auto"), [("gpt2", "AutoModelForCausalLM"), ("bert-mlm", "AutoModelForMaskedLM")])
def test_every_family_pickles(kind, auto, checkpoint):
    model = getattr(fmodel, auto).from_pretrained(checkpoint(kind))
    again = pickle.loads(pickle.dumps(model))
    assert type(again) is type(model) and torch.equal(again(IDS).logits, model(IDS).logits)


def test_a_new_model_trains_and_a_loaded_one_evaluates(checkpoint):
    folder = checkpoint("gpt2")
    config = transformers.AutoConfig.from_pretrained(folder)
    for lib in (transformers, fmodel):
        assert lib.AutoModelForCausalLM.from_config(config).training
        assert not lib.AutoModelForCausalLM.from_pretrained(folder).training
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # the constructor follows the default dtype, from_config the config's, as Transformers'
        for lib in (transformers, fmodel):
            assert getattr(lib, "facade", lib).GPT2LMHeadModel(config).dtype == torch.float64
            assert lib.AutoModelForCausalLM.from_config(config).dtype == config.dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
