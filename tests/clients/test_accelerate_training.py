"""An accelerate training loop on fmodel's facade: the same script, only the model's import changed.

`Accelerator.prepare(model, optimizer, dataloader)`, `accelerator.backward(loss)`, AdamW steps,
`save_state` after two steps, then `unwrap_model(model).save_pretrained(...)` the way accelerate's
examples call it (`is_main_process`, `save_function=accelerator.save`,
`state_dict=accelerator.get_state_dict(model)`). A tiny tied Llama written by Transformers is
loaded with `transformers.AutoModelForCausalLM` and with `fmodel.AutoModelForCausalLM`: the loss
of every step and the trained weights agree within 1e-4 (float32), and a run resumed with
`load_state` from the saved state ends where the uninterrupted run ends.

The loader shuffles with accelerate's seedable sampler (`use_seedable_sampler=True`: the order
is a function of the seed and the epoch), so a resumed run that skips the first two batches
sees the batches the uninterrupted one saw.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import fmodel

from .conftest import LIBS, TRAIN_TEXTS, max_diff

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

TOL = 1e-4
STEPS = 4


def _loop(lib: str, folder: str, out: str, resume: str | None = None) -> dict:
    """The client script: 4 steps of batch 2; the state is saved after step 2 (or, with
    `resume`, loaded from there and the first 2 batches skipped); the model is saved at the end."""
    accelerate.utils.set_seed(0)
    accelerator = accelerate.Accelerator(
        cpu=True, dataloader_config=accelerate.DataLoaderConfiguration(use_seedable_sampler=True)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [dict(tokenizer(t)) for t in TRAIN_TEXTS]
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True, collate_fn=collator)
    model = LIBS[lib].AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    start = 0
    if resume is not None:
        accelerator.load_state(resume)
        start = 2
        loader = accelerator.skip_first_batches(loader, start)
    losses = []
    for step, batch in enumerate(loader, start=start):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 1 and resume is None:
            accelerator.save_state(os.path.join(out, "state"))
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        os.path.join(out, "model"),
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    accelerator.save_model(model, os.path.join(out, "accelerate_model"))
    return {"losses": losses, "model": unwrapped, "out": out}


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    made: dict = {}

    def run(lib: str, resumed: bool = False) -> dict:
        if (lib, resumed) not in made:
            out = str(tmp_path_factory.mktemp(f"accelerate-{lib}{'-resumed' if resumed else ''}"))
            resume = os.path.join(run(lib)["out"], "state") if resumed else None
            made[lib, resumed] = _loop(lib, checkpoint("llama"), out, resume)
        return made[lib, resumed]

    return run


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(pa) == set(pb)
    assert max(max_diff(pa[n], pb[n]) for n in pa) < TOL


def test_loop_matches_transformers(runs):
    hf, fm = runs("transformers"), runs("fmodel")
    assert isinstance(fm["model"], fmodel.PreTrainedModel)
    assert len(fm["losses"]) == len(hf["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(hf["losses"], fm["losses"], strict=True)) < TOL, (hf, fm)
    assert fm["losses"][-1] < fm["losses"][0]  # it trained
    _assert_same_weights(hf["model"], fm["model"])
    assert fm["model"].lm_head.weight is fm["model"].model.embed_tokens.weight


def test_resume_from_saved_state(runs):
    """`load_state` restores weights, optimizer and RNG: steps 3 and 4 give the uninterrupted
    run's losses and weights."""
    full, resumed = runs("fmodel"), runs("fmodel", resumed=True)
    assert len(resumed["losses"]) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(full["losses"][2:], resumed["losses"], strict=True)) < TOL
    _assert_same_weights(full["model"], resumed["model"])
    assert os.path.isfile(os.path.join(full["out"], "state", "optimizer.bin"))


@pytest.mark.parametrize("folder", ["model", "accelerate_model"])
def test_saved_model_loads_in_both_libraries(runs, checkpoint, folder):
    """`save_pretrained(state_dict=accelerator.get_state_dict(model), save_function=...)` and
    `accelerator.save_model` write the tied embedding once, under the names Transformers'
    model writes; both libraries load the files to the trained model's logits (`from_pretrained`
    for the first, accelerate's `load_checkpoint_in_model` into the untrained model for the
    second, which writes weights only)."""
    hf, fm = runs("transformers"), runs("fmodel")
    keys = {}
    for name, run in (("hf", hf), ("fm", fm)):
        with safe_open(os.path.join(run["out"], folder, "model.safetensors"), "pt") as f:
            keys[name] = set(f.keys())
    assert keys["fm"] == keys["hf"]
    assert "lm_head.weight" not in keys["fm"]
    ids = torch.tensor([[1, 7, 8, 9, 10, 2]])
    expected = hf["model"].eval()(ids).logits
    for lib in (transformers, fmodel):
        if folder == "model":
            loaded = lib.AutoModelForCausalLM.from_pretrained(os.path.join(fm["out"], folder))
        else:
            loaded = lib.AutoModelForCausalLM.from_pretrained(checkpoint("llama"))
            accelerate.load_checkpoint_in_model(loaded, os.path.join(fm["out"], folder, "model.safetensors"))
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert max_diff(loaded(ids).logits, expected) < TOL


def _files(folder: str) -> set[str]:
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


@pytest.mark.parametrize(
    "options",
    [
        {"safe_serialization": False, "save_function": "accelerator.save"},
        {"max_shard_size": "20KB"},
        {"is_main_process": False},
        {"scaled_state_dict": True},
    ],
    ids=["pickle", "sharded", "not-main-process", "given-state-dict"],
)
def test_save_pretrained_arguments_as_transformers(checkpoint, tmp_path, options):
    """The `save_pretrained` arguments distributed scripts pass, on both libraries' models of one
    checkpoint: pickle weights through `save_function`, shards with an index, no config from a
    process that is not the main one, and a given `state_dict` (here with the embedding scaled,
    tied alias included as `state_dict()` has it) saved instead of the model's own tensors, the
    tie stored once. Weight files, index keys and the reloaded values agree with Transformers'."""
    options = dict(options)
    accelerator = accelerate.Accelerator(cpu=True)
    if options.get("save_function") == "accelerator.save":
        options["save_function"] = accelerator.save
    scaled = options.pop("scaled_state_dict", False)
    saved = {}
    for name, lib in LIBS.items():
        model = lib.AutoModelForCausalLM.from_pretrained(checkpoint("llama"))
        if scaled:
            state_dict = model.state_dict()
            state_dict["model.embed_tokens.weight"] = state_dict["model.embed_tokens.weight"] * 2
            state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
            options["state_dict"] = state_dict
        folder = str(tmp_path / name)
        model.save_pretrained(folder, **options)
        saved[name] = folder
    hf_files, fm_files = _files(saved["transformers"]), _files(saved["fmodel"])
    if options.get("is_main_process") is False:
        # Transformers still writes the weights from every process (and no config); fmodel
        # writes nothing there: the main process writes the whole checkpoint, atomically.
        assert "config.json" not in hf_files and fm_files == set()
        return
    weights = {f for f in hf_files if f.startswith(("model", "pytorch_model"))}
    assert weights == {f for f in fm_files if f.startswith(("model", "pytorch_model"))}
    assert "config.json" in fm_files
    if options.get("max_shard_size"):
        assert "model.safetensors.index.json" in weights and len(weights) > 2
        maps = []
        for folder in saved.values():
            with open(os.path.join(folder, "model.safetensors.index.json")) as f:
                maps.append(json.load(f)["weight_map"])
        assert maps[1] == maps[0]  # the same tensors in the same shard files
    ids = torch.tensor([[1, 7, 8, 9, 10, 2]])
    expected = transformers.AutoModelForCausalLM.from_pretrained(saved["transformers"])(ids).logits
    for lib in LIBS.values():
        loaded = lib.AutoModelForCausalLM.from_pretrained(saved["fmodel"])
        assert max_diff(loaded(ids).logits, expected) < TOL
    if scaled:
        original = fmodel.AutoModelForCausalLM.from_pretrained(checkpoint("llama"))
        assert max_diff(loaded.model.embed_tokens.weight, original.model.embed_tokens.weight * 2) == 0
