"""The pure helpers of benchmarks/engines.py, llama_cpp_peer.py and compare.py's engine flags:
variant names, ratio math, targets and the tables built from given numbers (nothing is timed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import compare  # noqa: E402
import engines  # noqa: E402
import llama_cpp_peer  # noqa: E402


def test_fmodel_variant_labels_parse_and_round_trip():
    v = engines.FmodelVariant.parse("gguf+compile+act8")
    assert (v.base, v.act8, v.compile) == ("gguf", True, True)
    assert v.label == "gguf+act8+compile"
    assert v.quantized
    assert not engines.FmodelVariant.parse("bfloat16").quantized
    for bad in ("float16", "int4+fast", "int8+act8+act8", "float32+act8"):
        with pytest.raises(ValueError, match="fmodel variant"):
            engines.FmodelVariant.parse(bad)


def test_thread_lists():
    assert engines.parse_threads("1, 2") == [1, 2]
    for bad in ("", "0", "1,1", "two"):
        with pytest.raises(ValueError, match="thread counts"):
            engines.parse_threads(bad)
    assert engines.split_list(" a,,b ,") == ["a", "b"]


def test_round_ratio_is_the_median_of_same_round_speed_ratios():
    # round 1: ours 1 s, theirs 2 s -> 2x; round 2: 2 s vs 2 s -> 1x; round 3: 1 s vs 3 s -> 3x
    assert engines.round_ratio([1.0, 2.0, 1.0], [2.0, 2.0, 3.0]) == 2.0
    with pytest.raises(ValueError, match="equally many"):
        engines.round_ratio([1.0], [1.0, 2.0])


def test_speed_ceiling_and_agreement_math():
    assert engines.tokens_per_s(128, [2.0, 1.0, 4.0]) == 64.0
    assert engines.ceiling_tokens_per_s(20.0, 100_000_000) == pytest.approx(200.0)
    assert engines.top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        engines.top1_agreement([1], [1, 2])


def test_chat_answer_check_and_rss_budget():
    assert engines.answer_ok(" The capital of France is Paris.\n")
    assert engines.answer_ok("The capital of France is Paris. It is known for ...")
    assert not engines.answer_ok("La capitale de la France est Paris.")
    assert not engines.answer_ok("The capital of France is Paris")  # no full stop: not the demo's answer
    assert engines.rss_budget(300, 100) == pytest.approx(410.0)


def test_pairing_of_fmodel_variants():
    assert engines.pairing("float32") == ("F32", "float32", 1.0, 2.5)
    assert engines.pairing("bfloat16") == ("F16", "bfloat16", 1.0, 2.5)
    assert engines.pairing("int8") == ("Q8_0", "float32", None, 6.0)
    assert engines.pairing("int4") == ("Q4_1", "float32", None, None)
    assert engines.pairing("gguf+act8") == ("Q4_1", "float32", 1.0, None)


def _report(decode: dict[str, list[float]], prefill: dict[str, list[float]]) -> engines.EnginesReport:
    selection = engines.Selection(fmodel=[], llama=[], transformers=[], threads=[1], new_tokens=100)
    report = engines.EnginesReport(selection, Path("m.Q4_1.gguf"), 100 * 2**20, Path("ckpt"))
    report.runs = [engines.ThreadResult(1, 10.0, decode, prefill, 0.25)]
    report.step_bytes = dict.fromkeys(decode, 100_000_000)
    return report


def test_decode_table_ratios_targets_and_ceiling():
    decode = {
        "fmodel gguf": [1.0, 1.0, 1.0],  # 100 tok/s
        "llama.cpp Q4_1": [0.8, 0.8, 0.8],  # 125 tok/s: fmodel is 0.8x -> MISS
        "fmodel float32": [1.0, 1.0, 1.0],
        "llama.cpp F32": [2.0, 2.0, 2.0],  # fmodel 2.0x -> PASS
        "transformers float32": [4.0, 4.0, 4.0],  # fmodel float32 4.0x -> PASS (>= 2.5x)
    }
    report = _report(decode, {})
    text, checks = engines.decode_table(report, report.runs[0])
    by_name = {c.name: c for c in checks}
    assert by_name["decode 1T fmodel gguf vs llama.cpp Q4_1"].passed is False
    assert by_name["decode 1T fmodel gguf vs llama.cpp Q4_1"].value == "0.80x"
    assert by_name["decode 1T fmodel float32 vs llama.cpp F32"].passed is True
    assert by_name["decode 1T fmodel float32 vs transformers float32"].value == "4.00x"
    assert "decode 1T fmodel gguf vs transformers float32" not in by_name  # no issue 6 target for it
    line = next(row for row in text.splitlines() if row.startswith("fmodel gguf"))
    # 100 tok/s, 100 MB/token, 10 GB/s achieved, ceiling 10 GB/s / 100 MB = 100 tok/s = 100%
    assert line.split()[2:7] == ["100.0", "100", "10.0", "100", "100%"]


def test_prefill_table_target_only_for_float32():
    prefill = {"fmodel float32": [0.2, 0.2], "llama.cpp F32": [0.1, 0.1], "fmodel int8": [0.2, 0.2]}
    prefill["llama.cpp Q8_0"] = [0.1, 0.1]
    report = _report({}, prefill)
    _, checks = engines.prefill_table(report, report.runs[0])
    assert [(c.name, c.value, c.passed) for c in checks] == [
        ("prefill 1T fmodel float32 vs llama.cpp F32", "0.50x", False)
    ]


def test_quality_table_targets_for_quantized_variants_only():
    report = _report({"fmodel float32": [1.0], "fmodel gguf": [1.0], "llama.cpp Q4_1": [1.0]}, {})
    report.agreement = {"fmodel float32": 1.0, "fmodel gguf": 0.97, "llama.cpp Q4_1": 0.80}
    report.answers = {
        "fmodel float32": "The capital of France is Paris.",
        "fmodel gguf": "The capital of France is Paris.",
        "llama.cpp Q4_1": "La capitale de la France est Paris.",
    }
    mib = 2**20
    report.rss = {"fmodel gguf": {"baseline_rss": 300 * mib, "peak_rss": 450 * mib, "load_s": 1.0}}
    text, checks = engines.quality_table(report)
    results = {c.name: c.passed for c in checks}
    assert results == {
        "RSS fmodel gguf": False,  # 450 MiB > 300 + 1.1 x 100 MiB
        "top-1 fmodel gguf": True,
        "chat fmodel gguf": True,
        "top-1 llama.cpp Q4_1": False,
        "chat llama.cpp Q4_1": False,
    }
    assert "<= 410 MiB" in text

    # the budget counts from torch's runtime baseline (torch after running ops) where measured
    report.rss = {
        "fmodel gguf": {
            "baseline_rss": 300 * mib,
            "runtime_rss": 345 * mib,
            "peak_rss": 450 * mib,
            "load_s": 1.0,
        }
    }
    text, checks = engines.quality_table(report)
    assert {c.name: c.passed for c in checks}["RSS fmodel gguf"] is True  # 450 <= 345 + 110
    assert "<= 455 MiB" in text and "+45 MiB" in text


def test_report_text_counts_targets_and_lists_skips():
    report = _report({"fmodel float32": [1.0], "llama.cpp F32": [2.0]}, {"fmodel float32": [0.1]})
    report.skipped = {"llama.cpp Q8_0": "llama-cpp-python is not installed"}
    text, checks = engines.report_text(report)
    assert len(checks) == 1 and checks[0].passed
    assert "skipped llama.cpp Q8_0: llama-cpp-python is not installed" in text
    assert "engines: 1/1 targets met" in text
    assert "other processes used 0.25 cores" in text
    payload = engines.json_payload(report, checks)
    assert payload["threads"][0]["decode_tokens_per_s"]["llama.cpp F32"] == 50.0


def test_llama_cpp_missing_is_reported_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a)
    )
    reason = llama_cpp_peer.missing_reason()
    assert reason is not None
    assert "not installed" in reason
    assert llama_cpp_peer.INSTALL_COMMAND in reason
    assert "--no-binary llama-cpp-python" in llama_cpp_peer.INSTALL_COMMAND
    assert "-mno-amx-int8" in llama_cpp_peer.INSTALL_COMMAND


def test_converted_file_names():
    path = llama_cpp_peer.converted_path(Path("/x/SmolLM2.Q4_1.gguf"), "F16", Path("/c"))
    assert path == Path("/c/SmolLM2.Q4_1.to-F16.gguf")
    with pytest.raises(ValueError, match="kind"):
        llama_cpp_peer.convert(Path("/x/a.gguf"), "Q5_K", Path("/c"))


def test_compare_engine_flags():
    args = compare.parse_args(["--engines-only", "--engine-threads", "1", "--fmodel-variants", "gguf,int4"])
    assert args.selection.threads == [1]
    assert args.selection.fmodel == ["gguf", "int4"]
    assert args.selection.llama == ["F32", "F16", "Q8_0", "Q4_1"]
    assert args.decode_variants == ""  # decode.py's own section is off by default
    assert compare.parse_args([]).selection.fmodel is None  # defaults chosen at run time
    for bad in (
        ["--llama-variants", "Q5_K"],
        ["--fmodel-variants", "float16"],
        ["--engine-threads", "0"],
        ["--engine-repeats", "0"],
        ["--engines-only", "--no-engines"],
    ):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)


class _Scripted(engines.Engine):
    """An engine whose greedy answers are given (no model)."""

    engine, variant, step_bytes = "fmodel", "float32", 0

    def __init__(self, answers: list[list[int]]) -> None:
        self.answers = answers
        self.asked: list[int] = []

    def greedy(self, prompt, new_tokens, stop_ids=()):
        self.asked.append(new_tokens)
        return self.answers[len(self.asked) - 1][:new_tokens]

    def prefill(self, ids):
        pass

    def forced(self, prompt, continuation):
        return list(continuation)


class _Tokenizer:
    eos_token_ids = (2,)

    def apply_chat_template(self, messages, add_generation_prompt):
        return messages[0]["content"]

    def encode(self, text, add_special_tokens):
        return [len(text)]


def test_probe_segments_add_up_to_the_probe_length(monkeypatch):
    monkeypatch.setattr(engines, "PROBE_TOKENS", 100)
    monkeypatch.setattr(engines, "PROBE_ANSWER_TOKENS", 48)
    reference = _Scripted([[5] * 30 + [2], [6] * 48, [7] * 48])
    segments = engines.probe_segments(reference, _Tokenizer())
    assert [len(answer) for _, answer in segments] == [31, 48, 21]  # the last one cut to fit
    assert reference.asked == [48, 48, 21]
    assert segments[0][0] == [len(engines.CHAT_QUESTION)]  # the demo's question comes first
    monkeypatch.setattr(engines, "PROBE_TOKENS", 10**6)
    with pytest.raises(RuntimeError, match="fewer than"):
        engines.probe_segments(_Scripted([[5]] * len(engines.PROBE_QUESTIONS)), _Tokenizer())


def test_forcer_records_the_argmax_and_forces_the_given_tokens():
    import torch

    forcer = engines.Forcer([4, 1])
    out = forcer(None, torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0]]))
    assert forcer.argmax == [1]
    assert int(out[0].argmax()) == 4 and torch.isinf(out[0, :4]).all()
    out = forcer(None, torch.tensor([[9.0, 0.0, 1.0, 0.0, 2.0]]))
    assert forcer.argmax == [1, 0] and int(out[0].argmax()) == 1


def test_summary_table_has_one_row_per_variant():
    report = _report({"fmodel gguf": [1.0, 2.0], "llama.cpp Q4_1": [0.5, 0.5]}, {"fmodel gguf": [0.128]})
    report.agreement = {"llama.cpp Q4_1": 0.957}
    report.answers = {"fmodel gguf": engines.CHAT_ANSWER, "llama.cpp Q4_1": "La capitale"}
    report.probe_reference = "fmodel float32"
    lines = engines.summary_table(report).splitlines()
    assert lines[0].split() == ["variant", "decode", "1T", "prefill", "1T", "peak", "RSS", "top-1", "Paris"]
    assert lines[2].split() == ["fmodel", "gguf", "66.7", "1000", "yes"]  # 100 tokens / 1.5 s
    assert lines[3].split() == ["llama.cpp", "Q4_1", "200.0", "0.957", "no"]
