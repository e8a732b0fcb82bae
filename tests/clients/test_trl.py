"""TRL's `SFTTrainer` on fmodel's facade: the same script, only the model's import changed.

A tiny Llama checkpoint written by Transformers is loaded once with
`transformers.AutoModelForCausalLM` and once with `fmodel.AutoModelForCausalLM` and trained for
3 optimizer steps (2 micro-batches each, so `num_items_in_batch` matters) on an in-memory
`datasets.Dataset`: plain text, and chat messages rendered by the tokenizer's chat template.
Every logged step (loss, grad_norm, TRL's entropy / mean_token_accuracy / num_tokens), the
train loss and the trained weights agree within 1e-4.

What the facade has to provide here: `model.config.get_text_config()` written to
(`eos_token` moves the model's eos id, mirrored into `generation_config`), and the base model
called directly: TRL's fused LM head runs `model.base_model(**inputs)` for hidden states and
projects them through `get_output_embeddings()` itself.

`bf16=False`: SFTConfig defaults to bfloat16 autocast; the comparison is made in float32.
"""

from __future__ import annotations

import pytest

import fmodel

from .conftest import LIBS, TRAIN_TEXTS, max_diff

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TOL = 1e-4
QUESTIONS = ["what is the capital of france", "where is paris", "what is a city", "who was he"]
ANSWERS = ["paris is the capital", "paris is in france", "a city is a city", "he was the first"]
LOGGED = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")


def _dataset(kind: str):
    if kind == "text":
        return datasets.Dataset.from_dict({"text": TRAIN_TEXTS})
    messages = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(QUESTIONS * 2, ANSWERS * 2, strict=True)
    ]
    return datasets.Dataset.from_dict({"messages": messages})


def _train(lib: str, kind: str, folder: str, out: str):
    """The client script: SFT for 3 steps on `kind` data ("text" or "messages")."""
    model = LIBS[lib].AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    extra = {"eos_token": "[SEP]"} if kind == "messages" else {}
    args = trl.SFTConfig(
        out,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(kind), processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    made: dict = {}

    def run(lib: str, kind: str):
        if (lib, kind) not in made:
            out = str(tmp_path_factory.mktemp(f"sft-{lib}-{kind}"))
            made[lib, kind] = _train(lib, kind, checkpoint("llama"), out)
        return made[lib, kind]

    return run


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_sft_matches_transformers(runs, kind):
    hf, fm = runs("transformers", kind), runs("fmodel", kind)
    assert isinstance(fm.model, fmodel.PreTrainedModel)
    hf_steps = [h for h in hf.state.log_history if "loss" in h]
    fm_steps = [h for h in fm.state.log_history if "loss" in h]
    assert [h["step"] for h in fm_steps] == [h["step"] for h in hf_steps] == [1, 2, 3]
    for a, b in zip(hf_steps, fm_steps, strict=True):
        for key in LOGGED:
            # the logged loss is rounded to 4 decimals: equal up to one unit of the last place
            assert abs(a[key] - b[key]) <= TOL + 1e-9, (key, a, b)
    hf_end, fm_end = hf.state.log_history[-1], fm.state.log_history[-1]
    assert abs(hf_end["train_loss"] - fm_end["train_loss"]) < TOL
    hf_params = dict(hf.model.named_parameters())
    fm_params = dict(fm.model.named_parameters())
    assert set(fm_params) == set(hf_params)
    assert max(max_diff(hf_params[n], fm_params[n]) for n in hf_params) < TOL
    assert fm.model.lm_head.weight is fm.model.model.embed_tokens.weight  # still tied after training


def test_eos_token_written_to_the_model(runs):
    """`SFTConfig(eos_token=...)` writes the id into `model.config.get_text_config()` and puts
    it first in `generation_config.eos_token_id`, as on Transformers' model."""
    hf, fm = runs("transformers", "messages"), runs("fmodel", "messages")
    assert fm.model.config.get_text_config() is fm.model.config
    assert fm.model.config.eos_token_id == hf.model.config.eos_token_id == 5
    base = fm.model.model.config.eos_token_id, hf.model.model.config.eos_token_id  # the base model's config
    assert base == (5, 5)
    assert fm.model.generation_config.eos_token_id == hf.model.generation_config.eos_token_id == [5, 2]


def test_base_model_call_matches_transformers(checkpoint):
    """What the fused LM head relies on: the base model inside the head, called directly with
    Transformers' arguments (positional order included), gives Transformers' hidden states."""
    import torch

    folder = checkpoint("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    fm = fmodel.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 7, 8, 9, 10, 2], [1, 5, 6, 7, 0, 0]])
    mask = (ids != 0).long()
    assert fm.base_model is fm.model
    expected = hf.base_model(ids, mask, output_hidden_states=True)
    got = fm.base_model(ids, mask, output_hidden_states=True)
    assert type(got) is type(expected)
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) < TOL
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    got = fm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) < TOL
