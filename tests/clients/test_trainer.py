"""`transformers.Trainer` on fmodel's facade: the same script, only the model's import changed.

Each scenario trains a tiny checkpoint written by Transformers, once loaded with
`transformers.AutoModel*` and once with `fmodel.AutoModel*`, with the same seeds, and compares
what Trainer reports: the loss of every micro-batch (recorded unrounded by `_Recording`, the same
subclass in both runs; `log_history` rounds losses to 4 decimals), every logged step of
`trainer.state.log_history` (loss, grad_norm, learning rate), `train_loss`, `eval_loss` and the
trained weights, within 1e-4 (float32).

Both models are loaded from the same saved checkpoint, so the runs compare training only (no
init-time draws). The rest of the randomness is drawn by Trainer from torch's global generator
after `set_seed(args.seed)`: the sampler's shuffling, and BERT's dropout (left at its default
0.1: the facade's dropout draws exactly what Transformers' does, in the same order).

`gradient_accumulation_steps=2` with padded batches (labels -100 on padding) makes
`num_items_in_batch` matter: Trainer passes it to a model whose `accepts_loss_kwargs` is true (the
causal LM) and divides by the accumulation steps itself for one that is false (BERT), so a
facade that took the wrong path would give other gradients.
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

TOL = 1e-4


class _Recording(transformers.Trainer):
    """Trainer that records each micro-batch's loss unrounded (both runs use it)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training:
            self.__dict__.setdefault("losses", []).append(loss.item())
        return out


def _data(kind: str, folder: str):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if kind == "llama":
        rows = [dict(tok(t)) for t in TRAIN_TEXTS]
        return rows, transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    rows = [{**tok(t), "labels": i % 2} for i, t in enumerate(TRAIN_TEXTS)]
    return rows, transformers.DataCollatorWithPadding(tok)


def _train(lib: str, kind: str, folder: str, out: str, resume: str | None = None, **args) -> _Recording:
    """The client script: load `folder` with `lib`'s Auto class, train 4 optimizer steps (2 micro-
    batches each, a checkpoint every 2 steps), evaluate."""
    auto = "AutoModelForCausalLM" if kind == "llama" else "AutoModelForSequenceClassification"
    model = getattr(LIBS[lib], auto).from_pretrained(folder)
    rows, collator = _data(kind, folder)
    training_args = transformers.TrainingArguments(
        out,
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **args,
    )
    trainer = _Recording(
        model=model, args=training_args, train_dataset=rows, eval_dataset=rows, data_collator=collator
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.__dict__["eval_metrics"] = trainer.evaluate()
    return trainer


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    """`runs(lib, kind, name="plain", resume=None, **args)`: a finished Trainer, made once."""
    made: dict = {}

    def run(lib: str, kind: str, name: str = "plain", resume: str | None = None, **args) -> _Recording:
        key = (lib, kind, name)
        if key not in made:
            folder = checkpoint("llama" if kind == "llama" else "bert-cls")
            out = str(tmp_path_factory.mktemp(f"{lib}-{kind}-{name}"))
            made[key] = _train(lib, kind, folder, out, resume=resume, **args)
        return made[key]

    return run


def _steps(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def _summary(trainer) -> dict:
    return next(h for h in trainer.state.log_history if "train_loss" in h)


def _assert_same_training(hf, fm) -> None:
    assert len(fm.losses) == len(hf.losses) == 8
    assert max(abs(a - b) for a, b in zip(hf.losses, fm.losses, strict=True)) < TOL, (hf.losses, fm.losses)
    hf_steps, fm_steps = _steps(hf), _steps(fm)
    assert [h["step"] for h in fm_steps] == [h["step"] for h in hf_steps] == [1, 2, 3, 4]
    for a, b in zip(hf_steps, fm_steps, strict=True):
        # the logged loss is rounded to 4 decimals: equal up to one unit of the last place
        assert abs(a["loss"] - b["loss"]) <= TOL + 1e-9, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < TOL, (a, b)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-12)
    assert abs(_summary(hf)["train_loss"] - _summary(fm)["train_loss"]) < TOL
    assert abs(hf.eval_metrics["eval_loss"] - fm.eval_metrics["eval_loss"]) < TOL
    hf_params = dict(hf.model.named_parameters())
    fm_params = dict(fm.model.named_parameters())
    assert set(fm_params) == set(hf_params)
    assert max(max_diff(hf_params[n], fm_params[n]) for n in hf_params) < TOL


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_training_matches_transformers(runs, kind):
    hf, fm = runs("transformers", kind), runs("fmodel", kind)
    assert fm.model_accepts_loss_kwargs == hf.model_accepts_loss_kwargs == (kind == "llama")
    assert isinstance(fm.model, fmodel.PreTrainedModel)
    _assert_same_training(hf, fm)


def test_checkpoint_files_and_loading(runs, checkpoint):
    """checkpoint-4 holds config.json + model.safetensors with the tied embedding stored once
    (the same tensor names as Transformers' checkpoint); both libraries load it to the trained
    model's logits, and `from_pretrained(folder, config=cfg)` takes the given config."""
    hf, fm = runs("transformers", "llama"), runs("fmodel", "llama")
    saved = {}
    for name, trainer in (("hf", hf), ("fm", fm)):
        folder = os.path.join(trainer.args.output_dir, "checkpoint-4")
        assert {"config.json", "model.safetensors", "trainer_state.json", "optimizer.pt"} <= set(
            os.listdir(folder)
        )
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            saved[name] = set(f.keys())
        saved[name + "_folder"] = folder
    assert saved["fm"] == saved["hf"]
    assert "lm_head.weight" not in saved["fm"] and "model.embed_tokens.weight" in saved["fm"]
    with open(os.path.join(saved["fm_folder"], "config.json")) as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]

    ids = torch.tensor([[1, 7, 8, 9, 10, 2]])
    expected = hf.model.eval()(ids).logits
    for lib in (transformers, fmodel):
        loaded = lib.AutoModelForCausalLM.from_pretrained(saved["fm_folder"])
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert max_diff(loaded(ids).logits, expected) < TOL
    cfg = transformers.AutoConfig.from_pretrained(saved["fm_folder"])
    cfg.output_hidden_states = True
    loaded = fmodel.AutoModelForCausalLM.from_pretrained(saved["fm_folder"], config=cfg)
    out = loaded(ids)
    assert loaded.config.output_hidden_states is True and len(out.hidden_states) == 3
    assert max_diff(out.logits, expected) < TOL


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_resume_matches_uninterrupted(runs, monkeypatch, checkpointing):
    """Resuming from checkpoint-2 (weights, optimizer, scheduler, RNG and data position) ends where
    the uninterrupted run ends, with and without gradient checkpointing (whose layer recomputation
    is counted, so a run that silently skipped it would fail). The checkpointed run is compared
    with Transformers' plain run: recomputation changes no number for a model without dropout."""
    from fmodel.models import _stack

    calls = []
    real = _stack.checkpoint
    monkeypatch.setattr(_stack, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    name = "gc" if checkpointing else "plain"
    hf = runs("transformers", "llama")
    full = runs("fmodel", "llama", name, gradient_checkpointing=checkpointing)
    if checkpointing:
        assert calls and full.model.is_gradient_checkpointing
        _assert_same_training(hf, full)
    start = os.path.join(full.args.output_dir, "checkpoint-2")
    resumed = runs("fmodel", "llama", name + "-resumed", resume=start, gradient_checkpointing=checkpointing)
    assert len(resumed.losses) == 4  # only steps 3 and 4 ran
    assert max(abs(a - b) for a, b in zip(full.losses[4:], resumed.losses, strict=True)) < TOL
    assert [h["loss"] for h in _steps(resumed)] == [h["loss"] for h in _steps(full)]  # steps 1-2 read back
    assert abs(resumed.eval_metrics["eval_loss"] - hf.eval_metrics["eval_loss"]) < TOL
    params = dict(resumed.model.named_parameters())
    assert max(max_diff(p, params[n]) for n, p in hf.model.named_parameters()) < TOL
