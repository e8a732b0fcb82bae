"""The parity table: every fmodel class against Transformers 4.57 on tiny random checkpoints.

For each class: Transformers builds a random model with the family's special features switched
on (soft-capping, sliding windows shorter than the sequence, more experts than top-k, relative
buckets wider than the sequence, ...) and saves it; fmodel loads the folder. Printed per class
and attention implementation: the max abs logit difference over the real positions of a batch
padded on the left (row 0) and on the right (row 1), against Transformers' eager result (its
own sdpa drops Gemma 2's soft-cap); and whether greedy generation (12 new tokens, KV cache) is
token for token equal to Transformers' `generate` (Phi-3 past its longrope threshold: without
a cache, see NO_CACHE_GENERATE_REFERENCE).

    python benchmarks/parity_table.py [--only Gemma2ForCausalLM,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmodel
from tests.parity_helpers import max_diff

ATTENTIONS = ("eager", "sdpa", "flex_attention")
VOCAB, SEQ = 128, 12
_DEC = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SLIDING = dict(sliding_window=4)

CASES: dict[str, tuple[str, str, dict]] = {
    # class: (Transformers config class, Transformers model class, config overrides)
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM", {}),
    "Qwen2ForCausalLM": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, max_window_layers=1, **SLIDING),
    ),
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM", SLIDING),
    "Qwen3ForCausalLM": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=16, use_sliding_window=True, max_window_layers=1, **SLIDING),
    ),
    "OlmoForCausalLM": ("OlmoConfig", "OlmoForCausalLM", dict(clip_qkv=0.5)),
    "Olmo2ForCausalLM": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "Gemma2ForCausalLM": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=20,
            **SLIDING,
        ),
    ),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            num_hidden_layers=4,
            sliding_window_pattern=2,
            rope_local_base_freq=100.0,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=20,
            **SLIDING,
        ),
    ),
    "Phi3ForCausalLM": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            original_max_position_embeddings=8,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.5, 2.0, 1.2, 1.1, 1.3, 1.0, 1.4],
                "long_factor": [2.0, 3.0, 4.0, 2.5, 2.2, 3.3, 2.0, 1.4],
            },
            **SLIDING,
        ),
    ),
    "MixtralForCausalLM": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, **SLIDING),
    ),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
    "T5ForConditionalGeneration": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=96,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=20,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
    "T5ForConditionalGeneration (v1.1)": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=96,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
}


# Phi-3 with longrope: generating past original_max_position_embeddings, Transformers drops the
# cache and reruns the sequence with a one-row mask (eager then lets every token see later ones;
# with a sliding window its sdpa goes wrong too); fmodel reruns causally. The reference is
# Transformers' generation without a cache, which recomputes every step in full.
NO_CACHE_GENERATE_REFERENCE = {"Phi3ForCausalLM"}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _hf_model(case: str):
    config_name, model_name, overrides = CASES[case]
    config_cls = getattr(transformers, config_name)
    kwargs = dict(overrides) if config_name == "T5Config" else {**_DEC, **overrides}
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # Gemma's norms start at zero and OLMo's clip must bite: perturb
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def measure(case: str) -> dict:
    hf = _hf_model(case)
    seq2seq = hf.config.is_encoder_decoder
    ids, mask = _batch()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        state = fmodel.load(folder)
    row: dict = {}
    with torch.no_grad():
        if seq2seq:
            dec = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
            ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        else:
            ref = hf(input_ids=ids, attention_mask=mask).logits
        for attn in ATTENTIONS:
            try:
                if seq2seq:
                    out = fmodel.forward(
                        state, ids, attention_mask=mask, decoder_input_ids=dec, attn_implementation=attn
                    )
                    row[attn] = max_diff(out.logits, ref)
                else:
                    out = fmodel.forward(state, ids, attention_mask=mask, attn_implementation=attn)
                    row[attn] = max_diff(out.logits, ref, mask)
            except fmodel.FModelError as exc:
                row[attn] = f"refused: {type(exc).__name__}"
        prompt = ids[1:, :6]
        want = hf.generate(
            prompt,
            max_new_tokens=12,
            do_sample=False,
            min_new_tokens=12,
            use_cache=case not in NO_CACHE_GENERATE_REFERENCE,
        )
        got = fmodel.generate(state, prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        got = got if isinstance(got, torch.Tensor) else got.sequences
        row["generate"] = torch.equal(want, got)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated class names (rows of CASES)")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c in args.only.split(",")]
    print(f"| class | {' | '.join(ATTENTIONS)} | greedy generate equal |")
    print(f"|---|{'---|' * len(ATTENTIONS)}---|")
    for case in cases:
        try:
            row = measure(case)
        except Exception as exc:  # a row that fails is reported, and the table goes on
            print(f"| {case} | failed: {type(exc).__name__}: {str(exc)[:120]} |")
            continue
        cells = [f"{row[a]:.1e}" if isinstance(row[a], float) else row[a] for a in ATTENTIONS]
        print(f"| {case} | {' | '.join(cells)} | {'yes' if row['generate'] else 'NO'} |")


if __name__ == "__main__":
    main()
