"""The facade's remaining Transformers methods: initialisation, position embeddings, legacy
names, `_load_pretrained_model`, device maps, memory hooks, module lookup and the faster-path
switches. Each compares with Transformers 4.57 where Transformers has the behaviour."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fmodel
import fmodel.facade as facade

from .conftest import make_hf_model, requires_transformers, transformers

pytestmark = requires_transformers


@pytest.fixture
def llama_dir(tmp_path):
    make_hf_model("llama", pad_token_id=0).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def _tiny_gpt2(path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _tiny_bert(path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(path)
    return model


# -- initialisation ---------------------------------------------------------------------------


def test_init_weights_redraws_nothing_like_transformers_after_post_init(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.init_weights()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    their_before = {n: p.clone() for n, p in theirs.named_parameters()}
    theirs.init_weights()
    assert all(torch.equal(p, their_before[n]) for n, p in theirs.named_parameters())


def test_init_weights_module_redraws_in_place_by_the_family_rules(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    params = dict(model.named_parameters())
    proj = model.model.layers[0].self_attn.q_proj
    embed = model.model.embed_tokens
    norm = model.model.norm
    torch.manual_seed(3)
    model._init_weights(proj)
    first = proj.weight.clone()
    model._init_weights(embed)
    model._init_weights(norm)
    # same Parameter objects (optimizers keep them), new values
    assert dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"] is params[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    std = model.config.initializer_range
    assert proj.weight.std().item() == pytest.approx(std, rel=0.15)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(embed.weight[0], torch.zeros_like(embed.weight[0]))  # padding row, as Transformers
    # untouched modules keep their values; torch's seed makes it reproducible
    other = dict(facade.AutoModelForCausalLM.from_pretrained(llama_dir).named_parameters())
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, other["model.layers.1.mlp.up_proj.weight"])
    torch.manual_seed(3)
    model._init_weights(proj)
    assert torch.equal(proj.weight, first)
    with pytest.raises(ValueError, match="not a submodule"):
        model._init_weights(nn.Linear(2, 2))


def test_init_zeroes_the_padding_row_like_transformers():
    config = fmodel.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50, pad_token_id=3
    )
    state = fmodel.init(config)
    assert torch.equal(state.params["model.embed_tokens.weight"][3], torch.zeros(32))
    assert state.params["model.embed_tokens.weight"][4].abs().sum() > 0
    assert torch.equal(state.params["lm_head.weight"][3] == 0, torch.zeros(32, dtype=torch.bool))


# -- position embeddings ------------------------------------------------------------------------


def test_resize_position_embeddings_and_get_position_embeddings(tmp_path):
    folder = _tiny_gpt2(tmp_path / "gpt2")
    model = facade.GPT2LMHeadModel.from_pretrained(folder)
    old = model.get_position_embeddings().weight.clone()
    ids = torch.randint(0, 100, (1, 12))
    before = model(ids).logits
    model.resize_position_embeddings(32)
    wpe = model.get_position_embeddings()
    assert isinstance(wpe, nn.Embedding) and wpe.weight.shape == (32, 32)
    assert torch.equal(wpe.weight[:16], old) and model.config.n_positions == 32
    torch.testing.assert_close(model(ids).logits, before)
    assert model(torch.randint(0, 100, (1, 30))).logits.shape == (1, 30, 100)


def test_rotary_models_have_no_position_embedding(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="rotary"):
        model.get_position_embeddings()


# -- shape changes keep hooks and untouched parameters --------------------------------------------


def test_resize_and_prune_keep_hooks_and_untouched_parameters(tmp_path):
    folder = _tiny_gpt2(tmp_path / "gpt2")
    model = facade.GPT2LMHeadModel.from_pretrained(folder)
    calls = []
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, o: calls.append("h1"))
    model.transformer.wte.register_forward_pre_hook(lambda m, a: calls.append("wte"))
    ln = model.transformer.ln_f.weight
    model.resize_token_embeddings(104)
    model.prune_heads({0: [1]})
    model(torch.tensor([[1, 2, 3]]))
    assert calls == ["wte", "h1"]
    assert model.transformer.ln_f.weight is ln  # an optimizer holding it still updates the model
    handle.remove()
    model(torch.tensor([[1, 2, 3]]))
    assert calls == ["wte", "h1", "wte"]


# -- legacy names and _load_pretrained_model -------------------------------------------------------

KEYS = [
    "bert.embeddings.LayerNorm.gamma",
    "bert.encoder.layer.0.output.LayerNorm.beta",
    "encoder.conv.weight_g",
    "encoder.conv.weight_v",
    "model.layers.0.self_attn.q_proj.weight",
]


@pytest.mark.parametrize("key", KEYS)
def test_fix_state_dict_key_on_load_equals_transformers(key):
    assert facade.PreTrainedModel._fix_state_dict_key_on_load(key) == (
        transformers.PreTrainedModel._fix_state_dict_key_on_load(key)
    )


def test_fix_state_dict_keys_on_save_keeps_names(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    sd = model.state_dict()
    assert list(model._fix_state_dict_keys_on_save(sd)) == list(sd)


def test_load_pretrained_model_reads_legacy_names_and_key_mapping(tmp_path):
    theirs = _tiny_bert(tmp_path / "bert")
    legacy = {}
    for name, tensor in theirs.state_dict().items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[name.replace("bert.encoder.", "old_encoder.")] = tensor.clone()
    legacy["something.else"] = torch.zeros(1)
    model = facade.BertForMaskedLM._from_config(fmodel.load_config(tmp_path / "bert"))
    model, missing, unexpected, mismatched, offload, errors = facade.BertForMaskedLM._load_pretrained_model(
        model, legacy, None, "legacy-bert", key_mapping={r"^old_encoder\.": "bert.encoder."}
    )
    assert unexpected == ["something.else"] and mismatched == [] and offload is None and errors == []
    assert "cls.predictions.decoder.weight" not in missing
    model.eval()  # built by _from_config: in training mode, as Transformers' (its dropout would run)
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_load_pretrained_model_from_checkpoint_files(llama_dir):
    model = facade.LlamaForCausalLM._from_config(fmodel.load_config(llama_dir))
    files = [str(llama_dir / "model.safetensors")]
    model, missing, unexpected, *_ = facade.LlamaForCausalLM._load_pretrained_model(model, None, files, llama_dir)
    assert (missing, unexpected) == ([], [])
    model.eval()
    ids = torch.tensor([[1, 2, 3]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_dequantize_refuses_an_unquantized_model(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="first quantize"):
        model.dequantize()


# -- device maps ------------------------------------------------------------------------------------


def test_device_map_dict_places_each_module(llama_dir):
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "": "cpu"}
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir, device_map=device_map)
    plain = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids).logits, plain(ids).logits)
    assert model.model.embed_tokens._forward_pre_hooks  # inputs are moved to each module's device
    with pytest.raises(ValueError, match="does not cover"):
        facade.AutoModelForCausalLM.from_pretrained(llama_dir, device_map={"model.layers": "cpu"})


def test_place_is_pure_and_follows_ties(llama_dir):
    state = fmodel.load(llama_dir)
    placed = fmodel.transforms.place(state, {"": "cpu"})
    assert all(placed.params[n] is t for n, t in state.params.items())
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        fmodel.transforms.place(state, {"model.layers": "cpu", "lm_head": "cpu", "model.embed_tokens": "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moves_the_state(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir).cuda()
    assert model.device.type == "cuda" and model.state.device.type == "cuda"


# -- memory hooks -------------------------------------------------------------------------------------


def test_memory_hooks_record_rss_per_module_like_transformers(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    model.add_memory_hooks()
    with torch.no_grad():
        model(torch.randint(0, 96, (4, 64)))
    for module in model.modules():
        assert isinstance(module.mem_rss_diff, int)
    assert model.model.layers[0].mem_rss_post_forward > 0
    model.reset_memory_hooks_state()
    assert all(m.mem_rss_diff == 0 and m.mem_rss_pre_forward == 0 for m in model.modules())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    theirs.add_memory_hooks()
    theirs(torch.randint(0, 96, (1, 4)))
    assert hasattr(theirs.model.layers[0], "mem_rss_diff")


# -- outputs and module lookup ----------------------------------------------------------------------


def test_can_record_outputs_names_layer_and_attention_classes(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    recorded = model.can_record_outputs
    assert recorded["hidden_states"] is type(model.model.layers[0])
    assert recorded["attentions"] is type(model.model.layers[0].self_attn)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    assert set(recorded) == set(theirs.can_record_outputs)


@pytest.mark.parametrize(
    ("names", "kwargs"),
    [
        (["model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"], {}),
        (["layers.1.mlp.up_proj.weight", "norm.weight"], {"add_prefix": True}),
        (["layers.1.mlp.up_proj.weight"], {"remove_prefix": True}),
    ],
)
def test_retrieve_modules_from_names_equals_transformers(llama_dir, names, kwargs):
    ours = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)

    def paths(model, modules):
        index = {id(m): n for n, m in model.named_modules()}
        return [index[id(m)] for m in modules]

    assert paths(ours, ours.retrieve_modules_from_names(names, **kwargs)) == paths(
        theirs, theirs.retrieve_modules_from_names(names, **kwargs)
    )


# -- faster paths ----------------------------------------------------------------------------------


def test_bettertransformer_switches_to_sdpa_and_back(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager")
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(ids).logits
    assert model.to_bettertransformer() is model and model.state.attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, before)
    with pytest.raises(ValueError, match="already"):
        model.to_bettertransformer()
    assert model.reverse_bettertransformer() is model and model.state.attn_implementation == "eager"
    with pytest.raises(ValueError, match="not called"):
        model.reverse_bettertransformer()


def test_kernelize_picks_the_fastest_kernel_here_and_use_kernels_undoes_it(llama_dir, caplog):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager")
    assert not model.use_kernels
    model.use_kernels = True
    expected = "flash_attention_2" if torch.cuda.is_available() and _has("flash_attn") else "sdpa"
    assert model.use_kernels and model.state.attn_implementation == expected
    model.use_kernels = False
    assert not model.use_kernels and model.state.attn_implementation == "eager"
    sdpa_model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="fmodel"):
            sdpa_model.kernelize()
        assert "no faster kernel" in caplog.text and sdpa_model.use_kernels


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def test_get_compiled_call_is_cached_per_config(llama_dir):
    model = facade.AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = torch.tensor([[1, 2, 3]])
    compiled = model.get_compiled_call({"backend": "eager"})
    assert model.get_compiled_call({"backend": "eager"}) is compiled
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    assert model.get_compiled_call({"backend": "aot_eager"}) is not compiled
