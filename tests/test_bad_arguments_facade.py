"""Bad arguments to the facade's public methods: a named error, the natural builtin family, and
the model untouched.

Each case asserts (a) an `FModelError` subclass, (b) that it is also the builtin exception a
Transformers client would catch (`ValueError`, `TypeError`, `RuntimeError` for `model.to` as
torch, `IndexError` for token ids, `OSError` for paths), (c) that the message names the argument,
and (d) that the model's parameters (values, objects, version counters) and config are unchanged.
A missing attribute stays an `AttributeError` (peft and accelerate probe with `hasattr`).
"""

from __future__ import annotations

import pytest
import torch

import fmodel
from fmodel.facade import AutoModel, AutoModelForCausalLM, LlamaForCausalLM
from fmodel.facade.arg_checks import CastDtypeError, DeviceArgumentError

CONFIG = fmodel.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
IDS = torch.tensor([[1, 2, 3]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("facade-bad") / "ckpt"
    fmodel.save(fmodel.init(CONFIG, seed=0), path)
    (path.parent / "file.txt").write_text("x")
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return LlamaForCausalLM.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def quantized(model):
    return LlamaForCausalLM.from_state(fmodel.quantize(model.state, "int8"))


def cases(checkpoint, model, quantized):
    """name -> (call, builtin family, text the message must contain)."""
    nope = str(checkpoint.parent / "nope")
    file = str(checkpoint.parent / "file.txt")
    return {
        "from_pretrained(None)": (
            lambda: LlamaForCausalLM.from_pretrained(None),
            TypeError,
            "pretrained_model_name_or_path",
        ),
        "from_pretrained(123)": (
            lambda: LlamaForCausalLM.from_pretrained(123),
            TypeError,
            "pretrained_model_name_or_path",
        ),
        "from_pretrained('')": (
            lambda: LlamaForCausalLM.from_pretrained(""),
            ValueError,
            "pretrained_model_name_or_path",
        ),
        "from_pretrained(nonexistent)": (lambda: LlamaForCausalLM.from_pretrained(nope), OSError, nope),
        "from_pretrained(a file)": (lambda: LlamaForCausalLM.from_pretrained(file), OSError, file),
        "Auto.from_pretrained(None)": (
            lambda: AutoModelForCausalLM.from_pretrained(None),
            TypeError,
            "pretrained_model_name_or_path",
        ),
        "Auto.from_pretrained(123)": (
            lambda: AutoModel.from_pretrained(123),
            TypeError,
            "pretrained_model_name_or_path",
        ),
        "Auto.from_pretrained(nonexistent)": (
            lambda: AutoModelForCausalLM.from_pretrained(nope),
            OSError,
            nope,
        ),
        "Auto.from_pretrained(a file)": (lambda: AutoModelForCausalLM.from_pretrained(file), OSError, file),
        "Auto.from_config(None)": (
            lambda: AutoModelForCausalLM.from_config(None),
            TypeError,
            "from_config(config)",
        ),
        "Auto.from_config(str)": (
            lambda: AutoModelForCausalLM.from_config("llama"),
            TypeError,
            "from_config(config)",
        ),
        "Auto.from_config(dict)": (
            lambda: AutoModel.from_config({"model_type": "llama"}),
            TypeError,
            "from_config(config)",
        ),
        "LlamaForCausalLM(None)": (lambda: LlamaForCausalLM(None), TypeError, "config"),
        "LlamaForCausalLM(5)": (lambda: LlamaForCausalLM(5), TypeError, "config"),
        "resize_token_embeddings(-1)": (
            lambda: model.resize_token_embeddings(-1),
            ValueError,
            "new_num_tokens",
        ),
        "resize_token_embeddings(10**12)": (
            lambda: model.resize_token_embeddings(10**12),
            ValueError,
            "new_num_tokens",
        ),
        "resize_token_embeddings('x')": (
            lambda: model.resize_token_embeddings("x"),
            TypeError,
            "new_num_tokens",
        ),
        "resize_token_embeddings(pad_to_multiple_of=-3)": (
            lambda: model.resize_token_embeddings(70, pad_to_multiple_of=-3),
            ValueError,
            "pad_to_multiple_of",
        ),
        "generate(id >= vocab)": (
            lambda: model.generate(torch.tensor([[1, 64]]), max_new_tokens=2),
            IndexError,
            "64",
        ),
        "generate(id < 0)": (
            lambda: model.generate(torch.tensor([[1, -1]]), max_new_tokens=2),
            IndexError,
            "-1",
        ),
        "generate(max_new_tokens=-1)": (
            lambda: model.generate(IDS, max_new_tokens=-1),
            ValueError,
            "max_new_tokens",
        ),
        "generate(max_new_tokens='5')": (
            lambda: model.generate(IDS, max_new_tokens="5"),
            TypeError,
            "max_new_tokens",
        ),
        "generate(list)": (lambda: model.generate([[1, 2]], max_new_tokens=2), TypeError, "input_ids"),
        "generate(str)": (lambda: model.generate("hello", max_new_tokens=2), TypeError, "input_ids"),
        "generate(float ids)": (
            lambda: model.generate(IDS.float(), max_new_tokens=2),
            TypeError,
            "input_ids",
        ),
        "forward(float ids)": (lambda: model(IDS.float()), ValueError, "input_ids"),
        "forward(rank 3)": (lambda: model(IDS[None]), ValueError, "input_ids"),
        "forward(rank 0)": (lambda: model(torch.tensor(3)), ValueError, "input_ids"),
        "forward(list)": (lambda: model([[1, 2]]), TypeError, "input_ids"),
        "forward(id >= vocab)": (lambda: model(torch.tensor([[70]])), IndexError, "70"),
        "forward(inputs_embeds rank 2)": (
            lambda: model(inputs_embeds=torch.zeros(3, 32)),
            ValueError,
            "inputs_embeds",
        ),
        "to('nodevice')": (lambda: model.to("nodevice"), RuntimeError, "nodevice"),
        "to(device='banana:0')": (lambda: model.to(device="banana:0"), RuntimeError, "banana"),
        "to(torch.int8)": (lambda: model.to(torch.int8), TypeError, "torch.int8"),
        "to(torch.bool)": (lambda: model.to(torch.bool), TypeError, "torch.bool"),
        "to(dtype=torch.int8)": (lambda: model.to(dtype=torch.int8), TypeError, "dtype"),
        "half() on int8": (lambda: quantized.half(), TypeError, "half()"),
        "to(float16) on int8": (lambda: quantized.to(torch.float16), TypeError, "float16"),
        "prune_heads(None)": (lambda: model.prune_heads(None), TypeError, "heads_to_prune"),
        "prune_heads('x')": (lambda: model.prune_heads("x"), TypeError, "heads_to_prune"),
        "prune_heads({0: [99]})": (lambda: model.prune_heads({0: [99]}), ValueError, "99"),
        "prune_heads({99: [0]})": (lambda: model.prune_heads({99: [0]}), ValueError, "99"),
        "prune_heads on int8": (lambda: quantized.prune_heads({0: [0]}), ValueError, "prune_heads"),
        "save_pretrained(None)": (lambda: model.save_pretrained(None), TypeError, "directory"),
        "save_pretrained(123)": (lambda: model.save_pretrained(123), TypeError, "directory"),
        "save_pretrained(max_shard_size=-1)": (
            lambda: model.save_pretrained(str(checkpoint.parent / "s"), max_shard_size=-1),
            ValueError,
            "max_shard_size",
        ),
        "push_to_hub(None)": (lambda: model.push_to_hub(None), TypeError, "repo_id"),
        "push_to_hub(123)": (lambda: model.push_to_hub(123), TypeError, "repo_id"),
        "push_to_hub('')": (lambda: model.push_to_hub(""), ValueError, "repo_id"),
        "push_to_hub('a/b/c')": (lambda: model.push_to_hub("a/b/c"), ValueError, "repo_id"),
        "set_attn_implementation('banana')": (
            lambda: model.set_attn_implementation("banana"),
            RuntimeError,
            "banana",
        ),
        "set_attn_implementation(None)": (
            lambda: model.set_attn_implementation(None),
            TypeError,
            "set_attn_implementation",
        ),
        "set_attn_implementation(5)": (
            lambda: model.set_attn_implementation(5),
            TypeError,
            "set_attn_implementation",
        ),
        "from_pretrained(device_map='banana')": (
            lambda: LlamaForCausalLM.from_pretrained(checkpoint, device_map="banana"),
            RuntimeError,
            "device_map",
        ),
        "from_pretrained(dtype=torch.int8)": (
            lambda: LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.int8),
            ValueError,
            "dtype",
        ),
        "from_pretrained(attn_implementation='banana')": (
            lambda: LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="banana"),
            RuntimeError,
            "banana",
        ),
        "from_config(dtype='banana')": (
            lambda: AutoModelForCausalLM.from_config(CONFIG, dtype="banana"),
            ValueError,
            "from_config(dtype)",
        ),
        "generate(attention_mask=list)": (
            lambda: model.generate(IDS, max_new_tokens=2, attention_mask=[[1, 1, 1]]),
            TypeError,
            "attention_mask",
        ),
        "generate(num_beams=-1)": (
            lambda: model.generate(IDS, max_new_tokens=2, num_beams=-1),
            ValueError,
            "num_beams",
        ),
        "forward(attention_mask=list)": (
            lambda: model(IDS, attention_mask=[[1, 1, 1]]),
            TypeError,
            "attention_mask",
        ),
        "forward(labels=list)": (lambda: model(IDS, labels=[[1, 1, 1]]), TypeError, "labels"),
        "resize_token_embeddings(1.5)": (
            lambda: model.resize_token_embeddings(1.5),
            TypeError,
            "new_num_tokens",
        ),
        "resize_position_embeddings(-1)": (
            lambda: model.resize_position_embeddings(-1),
            ValueError,
            "new_num_position_embeddings",
        ),
        "dequantize() of a float model": (lambda: model.dequantize(), ValueError, "quantize"),
        "Tokenizer.from_folder(nonexistent)": (lambda: fmodel.Tokenizer.from_folder(nope), OSError, nope),
        "Tokenizer.from_folder(no tokenizer)": (
            lambda: fmodel.Tokenizer.from_folder(checkpoint),
            OSError,
            "tokenizer.json",
        ),
    }


def snapshot(model):
    params = {name: (p, p._version, p.detach().clone()) for name, p in model.named_parameters()}
    return params, model.config.to_dict()


def assert_unchanged(model, before, case):
    params, config = before
    now = dict(model.named_parameters())
    assert sorted(now) == sorted(params), case
    for name, (p, version, value) in params.items():
        assert now[name] is p and p._version == version, (case, name)
        assert torch.equal(p.detach(), value), (case, name)
    assert model.config.to_dict() == config, case


def test_bad_arguments_give_named_errors_and_change_nothing(checkpoint, model, quantized):
    counts = {"tried": 0, "named": 0, "foreign": []}
    before = snapshot(model)
    before_q = snapshot(quantized)
    for case, (call, family, text) in cases(checkpoint, model, quantized).items():
        counts["tried"] += 1
        with pytest.raises(Exception) as info:
            call()
        exc = info.value
        if not isinstance(exc, fmodel.FModelError):
            counts["foreign"].append((case, type(exc).__name__, str(exc)[:100]))
            continue
        counts["named"] += 1
        assert isinstance(exc, family), (case, type(exc).__mro__)
        assert text in str(exc), (case, str(exc))
        assert_unchanged(model, before, case)
        assert_unchanged(quantized, before_q, case)
    assert counts["foreign"] == [], counts
    assert counts["named"] == counts["tried"] >= 60


def test_model_to_keeps_torch_exception_families(model):
    with pytest.raises(RuntimeError):  # torch: RuntimeError for an unknown device string
        model.to("nodevice")
    with pytest.raises(TypeError):  # nn.Module.to: TypeError for a non-floating dtype
        model.to(torch.int8)
    with pytest.raises(DeviceArgumentError) as info:
        model.to("nodevice")
    assert isinstance(info.value, ValueError) and isinstance(info.value, fmodel.InvalidArgumentError)
    assert issubclass(CastDtypeError, fmodel.InvalidArgumentError)
    # valid calls still work and return the model
    assert model.to("cpu") is model and model.to(torch.device("cpu"), non_blocking=True) is model
    assert model.to(IDS.float()) is model  # a tensor's device and dtype: float32 is the model's own


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_to_cuda_without_cuda_is_named(model):
    with pytest.raises(DeviceArgumentError, match="CUDA is not available"):
        model.to("cuda")


def test_missing_attributes_stay_attribute_errors(model):
    with pytest.raises(AttributeError):
        model.no_such_attribute  # noqa: B018
    assert not hasattr(model, "hf_quantizer_that_does_not_exist")
    assert getattr(model, "no_such_attribute", "default") == "default"
