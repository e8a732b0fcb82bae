"""T5 in Transformers' clients, through fmodel's facade: `Seq2SeqTrainer` with
`DataCollatorForSeq2Seq` (which builds decoder inputs with the model's
`prepare_decoder_input_ids_from_labels`) and the `text2text-generation` pipeline, each run once
with Transformers' model and once with fmodel's over the same checkpoint and compared.

The checkpoint is a tiny random T5 v1.1 (gated GELU, untied head) written by Transformers with
the word-level tokenizer of conftest.py (pad 0, EOS "</s>" = 2, decoder start = pad). Both
sides run eager attention, the only one Transformers' T5 has: dropout (0.1, on) then draws
the same masks in the same order, so Trainer's losses, gradients and trained weights agree.
"""

from __future__ import annotations

import pytest
import torch

import fmodel

from .conftest import LIBS, TRAIN_TEXTS, make_tokenizer, max_diff

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
CONFIG = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=12,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=0,
)
# (source, target) pairs: the targets are the sources' last words, reversed
PAIRS = [(text, " ".join(reversed(text.split()[-3:]))) for text in TRAIN_TEXTS]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**CONFIG))
    path = tmp_path_factory.mktemp("t5")
    model.save_pretrained(path)
    make_tokenizer()[0].save_pretrained(path)
    return str(path)


def _train(lib: str, folder: str, out: str):
    model = LIBS[lib].AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [{**tok(source), "labels": tok(target)["input_ids"]} for source, target in PAIRS]
    collator = transformers.DataCollatorForSeq2Seq(tok, model=model)
    args = transformers.Seq2SeqTrainingArguments(
        out,
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Seq2SeqTrainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=collator
    )
    trainer.train()
    trainer.__dict__["eval_metrics"] = trainer.evaluate()
    return trainer


def test_seq2seq_trainer_matches_transformers(folder, tmp_path):
    hf = _train("transformers", folder, str(tmp_path / "hf"))
    fm = _train("fmodel", folder, str(tmp_path / "fm"))
    assert isinstance(fm.model, fmodel.PreTrainedModel)
    assert fm.model_accepts_loss_kwargs == hf.model_accepts_loss_kwargs is False
    hf_steps = [h for h in hf.state.log_history if "loss" in h]
    fm_steps = [h for h in fm.state.log_history if "loss" in h]
    assert [h["step"] for h in fm_steps] == [h["step"] for h in hf_steps] == [1, 2, 3, 4]
    for a, b in zip(hf_steps, fm_steps, strict=True):
        assert abs(a["loss"] - b["loss"]) <= TOL + 1e-9, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < TOL, (a, b)
    assert abs(hf.eval_metrics["eval_loss"] - fm.eval_metrics["eval_loss"]) < TOL
    theirs = dict(hf.model.named_parameters())
    ours = dict(fm.model.named_parameters())
    assert set(ours) == set(theirs)
    assert max(max_diff(theirs[n], ours[n]) for n in theirs) < TOL


def test_text2text_generation_pipeline_matches_transformers(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [source for source, _ in PAIRS[:4]]
    outputs = {}
    for lib in ("transformers", "fmodel"):
        model = LIBS[lib].AutoModelForSeq2SeqLM.from_pretrained(folder)
        pipe = transformers.pipeline("text2text-generation", model=model, tokenizer=tok)
        outputs[lib] = pipe(texts, max_new_tokens=6, do_sample=False, batch_size=2)
    assert outputs["fmodel"] == outputs["transformers"]
    assert all(row["generated_text"] for row in outputs["fmodel"])


def test_peft_lora_seq2seq_matches_transformers(folder):
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[7, 8, 9, 10, 11, 2], [12, 13, 14, 2, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[15, 16, 2], [17, 2, -100]])
    results = {}
    for lib in ("transformers", "fmodel"):
        model = LIBS[lib].AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation="eager")
        torch.manual_seed(1)  # the LoRA matrices are drawn from the global generator
        lora = peft.LoraConfig(
            task_type="SEQ_2_SEQ_LM", r=4, target_modules=["q", "v"], init_lora_weights=False
        )
        wrapped = peft.get_peft_model(model, lora).eval()
        with torch.no_grad():
            out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
            tokens = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        results[lib] = (out.loss, out.logits, tokens)
    (hf_loss, hf_logits, hf_tokens), (loss, logits, tokens) = results["transformers"], results["fmodel"]
    assert abs(loss.item() - hf_loss.item()) < TOL and max_diff(logits, hf_logits) < TOL
    assert torch.equal(tokens, hf_tokens)
