"""The PreTrainedModel facade: Transformers code runs unchanged by swapping the import."""

from __future__ import annotations

import pytest
import torch

import fmodel
import fmodel.facade as facade

from .conftest import make_hf_model, requires_transformers, transformers

pytestmark = requires_transformers


def fine_tune(lib, folder, out_dir, steps: int = 6) -> tuple[list[float], torch.Tensor]:
    """A typical Transformers fine-tuning snippet; `lib` is `transformers` or `fmodel.facade`."""
    torch.manual_seed(0)
    model = lib.AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    reloaded = lib.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return losses, reloaded(input_ids=batch).logits


@pytest.mark.parametrize("tied", [False, True])
def test_unmodified_fine_tuning_snippet_matches_transformers(tmp_path, tied):
    make_hf_model("llama", tie_word_embeddings=tied).save_pretrained(tmp_path / "base")
    theirs, their_logits = fine_tune(transformers, tmp_path / "base", tmp_path / "hf")
    ours, our_logits = fine_tune(facade, tmp_path / "base", tmp_path / "fm")
    assert ours[-1] < 0.8 * ours[0]
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert (our_logits - their_logits).abs().max().item() < 1e-3
    # each library reads the other's fine-tuned checkpoint
    cross = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fm").eval()
    batch = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(cross(input_ids=batch).logits, our_logits)


def test_state_shares_the_parameters_an_optimizer_updates(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    model = facade.LlamaForCausalLM.from_pretrained(tmp_path)
    before = model.state
    name = "model.norm.weight"
    assert before.params[name] is dict(model.named_parameters())[name]
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    assert torch.equal(model.state.params[name], before.params[name])  # same storage: the update shows
    frozen = fmodel.load(tmp_path)
    wrapped = facade.LlamaForCausalLM.from_state(frozen)
    assert dict(wrapped.named_parameters())[name].data_ptr() == frozen.params[name].data_ptr()


def test_surgery_methods_match_transformers_on_gpt2(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    ours = facade.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(ours).__name__ == "GPT2LMHeadModel" and not ours.training
    for model in (hf, ours):
        embedding = model.resize_token_embeddings(101, pad_to_multiple_of=8, mean_resizing=False)
        assert embedding.weight.shape == (104, 64)
        model.prune_heads({0: [1, 2]})
    assert ours.config.pruned_heads == hf.config.pruned_heads == {0: [1, 2]}
    assert ours.num_parameters() == hf.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = hf(ids).logits[..., :96]
    assert (ours(ids).logits[..., :96] - expected).abs().max().item() < 1e-4


def test_outputs_read_like_transformers(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    model = facade.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids)
    loss, logits = out[:2]
    assert loss is out.loss and logits is out["logits"] and out.hidden_states is None
    assert isinstance(model(input_ids=ids, return_dict=False), tuple)
    base = facade.AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "LlamaModel" and base(ids).last_hidden_state.shape == (1, 4, 64)
    assert model.can_generate() and not base.can_generate()
    _, info = facade.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_counting_matches_transformers(tmp_path, family):
    torch.manual_seed(0)
    if family == "llama":
        hf = make_hf_model("llama", tie_word_embeddings=True)
        cls = facade.LlamaForCausalLM
    elif family == "gpt2":
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4)
        )
        cls = facade.GPT2LMHeadModel
    else:
        hf = transformers.BertForMaskedLM(
            transformers.BertConfig(
                vocab_size=96,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=112,
            )
        )
        cls = facade.BertForMaskedLM
    hf.save_pretrained(tmp_path)
    ours = cls.from_pretrained(tmp_path)
    inputs = {"input_ids": torch.ones(3, 11, dtype=torch.long)}
    for flags in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert ours.num_parameters(**flags) == hf.num_parameters(**flags), flags
    assert ours.estimate_tokens(inputs) == hf.estimate_tokens(inputs) == 33
    assert ours.floating_point_ops(inputs) == hf.floating_point_ops(inputs)
    assert ours.floating_point_ops(inputs, exclude_embeddings=False) == hf.floating_point_ops(
        inputs, exclude_embeddings=False
    )
    # Transformers' GPT-2 keeps a [1, 1, n_positions, n_positions] causal-mask buffer per layer;
    # fmodel builds masks per call and has no such buffers.
    mask_buffers = sum(
        b.numel() * b.element_size()
        for n, b in hf.named_buffers()
        if n.endswith(("attn.bias", "masked_bias"))
    )
    assert ours.get_memory_footprint() == hf.get_memory_footprint() - mask_buffers
    assert ours.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)


def test_stats_are_pure_functions_of_a_state():
    from fmodel import stats

    state = fmodel.init(
        fmodel.LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            tie_word_embeddings=True,
        )
    )
    embed = 50 * 32
    total = stats.num_parameters(state)
    assert total == sum(t.numel() for t in state.unique_params().values())
    assert stats.num_parameters(state, exclude_embeddings=True) == total - embed
    assert stats.get_memory_footprint(state, return_buffers=False) == 4 * total  # the tied head counted once
    assert stats.floating_point_ops(state, {"input_ids": torch.ones(2, 5)}) == 6 * 10 * (total - embed)


def test_hooks_on_submodules_fire_and_input_grads_can_be_enabled(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    model = facade.LlamaForCausalLM.from_pretrained(tmp_path)
    seen = []
    model.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o[0].shape))
    ids = torch.tensor([[1, 2, 3]])
    model(ids)
    assert seen == [torch.Size([1, 3, 64])]
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen base
    assert not model(ids).logits.requires_grad
    model.enable_input_require_grads()
    assert model(ids).logits.requires_grad
    model.disable_input_require_grads()
    assert not model(ids).logits.requires_grad


def test_half_float_and_train_eval(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    model = facade.LlamaForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.float32 and not model.training and not model._tree.training
    model.train()
    assert model._tree.training and model.model.layers[0].training
    model.eval().half()
    assert model.dtype == torch.float16 and model.state.dtype == torch.float16
    assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.float16
    model.float()
    assert model.state.params["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("is_decoder", [False, True])
def test_mask_helpers_match_transformers(tmp_path, is_decoder):
    hf = make_hf_model("llama", is_decoder=is_decoder)
    hf.save_pretrained(tmp_path)
    ours = facade.LlamaForCausalLM.from_pretrained(tmp_path)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert torch.equal(ours.invert_attention_mask(mask), hf.invert_attention_mask(mask))
    assert torch.equal(
        ours.invert_attention_mask(mask[:, None].expand(2, 5, 5)),
        hf.invert_attention_mask(mask[:, None].expand(2, 5, 5)),
    )
    for shape in ((2, 5), (2, 3)):  # a 3-token step over a 2-token prefix too
        assert torch.equal(
            ours.get_extended_attention_mask(mask, shape), hf.get_extended_attention_mask(mask, shape)
        )
        assert torch.equal(
            ours.create_extended_attention_mask_for_decoder(shape, mask),
            hf.create_extended_attention_mask_for_decoder(shape, mask),
        )
    for head_mask in (None, torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.ones(2, 4)):
        a, b = ours.get_head_mask(head_mask, 2), hf.get_head_mask(head_mask, 2)
        if head_mask is None:
            assert a == b == [None, None]
        else:
            assert torch.equal(a, b)
    assert torch.equal(ours.get_head_mask(torch.ones(4), 2, True), hf.get_head_mask(torch.ones(4), 2, True))


def test_attention_selection_is_truthful_about_this_machine(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    model = facade.LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    reference = model(ids).logits
    model.set_attn_implementation({"": "eager"})
    assert model.state.attn_implementation == "eager"
    assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    assert model._sdpa_can_dispatch() and model._flex_attn_can_dispatch()
    assert model.get_correct_attn_implementation(None) == "sdpa"
    if not torch.cuda.is_available():
        with pytest.raises(fmodel.AttentionUnavailableError, match="flash_attention_2"):
            model._flash_attn_2_can_dispatch()
    assert model.framework == "pt" and model.dummy_inputs["input_ids"].shape == (3, 5)
    assert model.get_decoder() is model.model


def test_set_decoder_installs_another_models_base(tmp_path):
    make_hf_model("llama", seed=0).save_pretrained(tmp_path / "a")
    make_hf_model("llama", seed=1).save_pretrained(tmp_path / "b")
    a = facade.LlamaForCausalLM.from_pretrained(tmp_path / "a")
    b = facade.LlamaForCausalLM.from_pretrained(tmp_path / "b")
    a.set_decoder(b.get_decoder())
    assert torch.equal(a.model.norm.weight, b.model.norm.weight)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def _saved_bytes(fn) -> int:
    """Bytes of the activations autograd keeps for backward while `fn` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_gradient_checkpointing_same_gradients_less_memory(tmp_path, family):
    torch.manual_seed(0)
    if family == "llama":
        make_hf_model("llama", num_hidden_layers=4).save_pretrained(tmp_path)
        cls = facade.LlamaForCausalLM
    elif family == "gpt2":
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=4, n_head=4)
        ).save_pretrained(tmp_path)
        cls = facade.GPT2LMHeadModel
    else:
        transformers.BertForMaskedLM(
            transformers.BertConfig(
                vocab_size=96,
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=112,
            )
        ).save_pretrained(tmp_path)
        cls = facade.BertForMaskedLM
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))

    def grads(checkpointing: bool, frozen_embeddings: bool):
        model = cls.from_pretrained(tmp_path)
        model.train()
        for module in model.modules():  # dropout off, so both runs compute the same thing
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.0
        if frozen_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable()
        saved = _saved_bytes(lambda: model(input_ids=ids, labels=ids).loss.backward())
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, saved

    for frozen in (False, True):
        plain, plain_bytes = grads(False, frozen)
        ckpt, ckpt_bytes = grads(True, frozen)
        assert set(plain) == set(ckpt) and all(g is not None for g in ckpt.values())
        for name in plain:
            assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name
        assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_gradient_checkpointing_reaches_adapters_on_a_frozen_base(tmp_path):
    """A frozen base with trainable low-rank adapters (hooked onto q/v projections, the way
    adapter libraries attach them): checkpointed gradients equal plain ones. Transformers'
    reentrant default gives the adapters no gradient at all here."""
    make_hf_model("llama").save_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))

    def adapter_grads(lib, checkpointing: bool):
        model = lib.AutoModelForCausalLM.from_pretrained(tmp_path)
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        adapters = []
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                a = torch.nn.Parameter(torch.randn(proj.in_features, 4, generator=gen) * 0.1)
                b = torch.nn.Parameter(torch.randn(4, proj.out_features, generator=gen) * 0.1)
                adapters += [a, b]
                proj.register_forward_hook(lambda m, i, o, a=a, b=b: o + i[0] @ a @ b)
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(input_ids=ids, labels=ids).loss
        if loss.requires_grad:
            loss.backward()
        return [p.grad for p in adapters]

    plain = adapter_grads(facade, False)
    ckpt = adapter_grads(facade, True)
    assert all(g is not None for g in ckpt)
    for g, h in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)
    theirs = adapter_grads(transformers, False)
    for g, h in zip(theirs, plain, strict=True):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)
    reentrant = adapter_grads(transformers, True)  # Transformers 4.57 default: use_reentrant=True
    assert all(g is None for g in reentrant)
