"""fmodel, llama.cpp and Transformers side by side on one GGUF file (issue 15), for compare.py.

One table per thread count (default 1 and 2): greedy decode tokens/s (batch 1, a fixed prompt
of `PROMPT_TOKENS` random ids, `new_tokens` new tokens, no EOS: every engine runs the full
length; tokens/s = new tokens / wall time of the whole call, prompt included, for every engine
alike), prefill of `PREFILL_TOKENS` tokens (an empty cache, logits of the last position only:
what a generation's first step computes), each variant's weight bytes read per decode step and
the ceiling the read bandwidth allows (bandwidth probe at that thread count / bytes per token),
the ratios fmodel / llama.cpp and fmodel / Transformers with issue 15's targets (PASS/MISS).
Then peak RSS (each variant alone in a fresh subprocess: load, one short greedy run), the chat
demo's answer per variant, and top-1 agreement with float32 over a fixed probe.

Engines and variants (selectable; a variant whose engine or option is missing is skipped with
the reason printed):
    fmodel       float32, bfloat16   the float32 checkpoint converted from the GGUF file, as is / cast
                 int8, int4          fmodel.quantize of it (int4: group 32)
                 gguf                fmodel.load(the GGUF file, quantized=True): its Q4_1 kept
                 +act8               suffix: activations="int8" (where fmodel.load / quantize take it)
                 +compile            suffix: fmodel.generate(..., compile=True) (where it takes it)
    llama.cpp    Q4_1 (the file as shipped), Q8_0, F16, F32, BF16: llama_model_quantize conversions
                 of the file, cached under benchmarks/.cache/ (llama_cpp_peer.py)
    transformers float32, bfloat16   from_pretrained of the float32 checkpoint, "sdpa"

Pairs (fmodel variant -> llama.cpp peer, Transformers reference, issue 15 target on the peer):
float32 -> F32 (>= 1.0x), bfloat16 -> F16 (>= 1.0x), gguf -> Q4_1 (>= 1.0x at every thread
count), int8 -> Q8_0 and int4 -> Q4_1 (reported). Prefill float32 >= 1.0x llama.cpp F32's.
Issue 6's targets against Transformers are printed in the same rows (float32 and bfloat16
>= 2.5x Transformers in that dtype, int8 >= 6x Transformers float32).

Timing: all engines live in this process; each round calls every variant once, back to back,
the order flipping every round, after an untimed warm-up call each; a ratio is the median over
rounds of the two speeds' ratio in the same round (other processes' load comes and goes).
torch.set_num_threads and llama.cpp's n_threads are set to the same count. The CPU time other
processes used meanwhile (from /proc/stat, less this process's) is printed as the noise.

Quality (fmodel and llama.cpp variants): the probe is fmodel float32's greedy answers to fixed
chat questions (`PROBE_QUESTIONS`, the demo's first; each answer to its EOS or
`PROBE_ANSWER_TOKENS`, `PROBE_TOKENS` tokens in all; fmodel float32 = Transformers float32).
Each variant decodes every answer teacher-forced through its own decode path (prefill of the
question, then one step per token: a logits processor in fmodel.generate records the argmax
and forces the answer's token; llama.cpp the same with llama_decode), so kernels that differ
between one token and many (activation quantization) are the ones measured; the agreement is
the fraction of steps whose argmax is the answer's token. Targets for
quantized variants: agreement >= 0.95 and the chat demo's greedy answer to "What is the capital of
France?" is "The capital of France is Paris.". RSS target for fmodel's GGUF-loaded variants:
peak <= torch's own baseline + 1.10 x the file's size, where torch's own baseline is its RSS
once torch alone has run a decoder's CPU ops on toy tensors (`torch_runtime_rss`: its code
paged in, its runtime's buffers; the "torch ops" column is that over the RSS after
`import torch`). Measured so because those pages are part of every torch engine's peak and of
no model's: on this project's VM they are 11-15 MiB, and SmolLM2's 92 MiB of tensors plus them
already exceed the bare-import baseline + 1.1 x its 94 MiB file, whatever a library does.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE_DIR = HERE / ".cache"
ATTN = "sdpa"
PROMPT_TOKENS = 16
PREFILL_TOKENS = 128
PROBE_TOKENS = 256
CHAT_QUESTION = "What is the capital of France?"
CHAT_ANSWER = "The capital of France is Paris."
CHAT_NEW_TOKENS = 32
# The probe: float32's greedy answers to these chat questions (each to its EOS, at most
# PROBE_ANSWER_TOKENS), PROBE_TOKENS answer tokens in all. One long continuation of a single
# prompt loops on a 135M model, and a loop is trivially easy to predict once forced.
PROBE_QUESTIONS = (
    CHAT_QUESTION,
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about the sea.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for learning to play the guitar.",
    "How do vaccines train the immune system?",
    "Describe the water cycle in simple words.",
    "Write a Python function that reverses a string.",
    "What is the difference between weather and climate?",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Suggest a healthy breakfast for a busy morning.",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What is photosynthesis?",
)
PROBE_ANSWER_TOKENS = 48
N_CTX = 512  # llama.cpp's context: holds the probe, the chat and prompt + new tokens
RSS_NEW_TOKENS = 16
WARMUP_TOKENS = 8  # new tokens of the untimed decode call before the rounds
INT4_GROUP = 32

DECODE_TARGET = 1.0  # fmodel tok/s >= 1.0 x its llama.cpp peer's (float32, bfloat16, the GGUF's Q4_1)
PREFILL_TARGET = 1.0  # fmodel float32 prefill >= 1.0 x llama.cpp F32's
AGREEMENT_TARGET = 0.95
RSS_FILE_FACTOR = 1.10  # GGUF-loaded peak RSS <= torch baseline + 1.1 x file size
TRANSFORMERS_TARGETS = {"float32": 2.5, "bfloat16": 2.5, "int8": 6.0}  # issue 6, vs Transformers

FMODEL_VARIANTS = ("float32", "bfloat16", "int8", "int4", "gguf")
# added to the defaults where fmodel offers them: the compiled step of each target's variant
FMODEL_OPTIONAL = ("float32+compile", "bfloat16+compile", "gguf+compile", "gguf+act8", "gguf+act8+compile")
LLAMA_VARIANTS = ("F32", "F16", "Q8_0", "Q4_1")
TRANSFORMERS_VARIANTS = ("float32", "bfloat16")  # compare.py's default runs float32 only (time)
PEERS = {"float32": "F32", "bfloat16": "F16", "int8": "Q8_0", "int4": "Q4_1", "gguf": "Q4_1"}
PEER_TARGETS = {"float32", "bfloat16", "gguf"}  # bases with issue 15's decode target
SUFFIXES = ("act8", "compile")
RSS_MARKER = "@@engines-rss@@ "
MIB = 1024 * 1024


# --------------------------------------------------------------------------- variant names


@dataclass(frozen=True)
class FmodelVariant:
    """An fmodel variant label, parsed: base ("float32", ..., "gguf") and option suffixes."""

    base: str
    act8: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, label: str) -> FmodelVariant:
        base, *suffixes = label.split("+")
        if base not in FMODEL_VARIANTS:
            raise ValueError(f"fmodel variant {label!r}: base {base!r} is none of {FMODEL_VARIANTS}")
        unknown = [s for s in suffixes if s not in SUFFIXES]
        if unknown or len(set(suffixes)) != len(suffixes):
            raise ValueError(f"fmodel variant {label!r}: suffixes are +{' +'.join(SUFFIXES)}, each once")
        if "act8" in suffixes and base in ("float32", "bfloat16"):
            raise ValueError(f"fmodel variant {label!r}: +act8 needs quantized weights (int8, int4, gguf)")
        return cls(base, "act8" in suffixes, "compile" in suffixes)

    @property
    def label(self) -> str:
        return "+".join([self.base, *(s for s in SUFFIXES if getattr(self, s))])

    @property
    def quantized(self) -> bool:
        return self.base not in ("float32", "bfloat16")


def key(engine: str, variant: str) -> str:
    """The name of a variant in tables and JSON: "fmodel int4", "llama.cpp Q4_1", ..."""
    return f"{engine} {variant}"


def split_list(text: str) -> list[str]:
    """A comma-separated flag value as a list ('' = none)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_threads(text: str) -> list[int]:
    """'1,2' -> [1, 2]; each a positive int, no repeats."""
    try:
        threads = [int(t) for t in split_list(text)]
    except ValueError:
        raise ValueError(f"thread counts are comma-separated integers, got {text!r}") from None
    if not threads or min(threads) < 1 or len(set(threads)) != len(threads):
        raise ValueError(f"thread counts must be distinct integers >= 1, got {text!r}")
    return threads


# --------------------------------------------------------------------------- ratio math


def round_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Speed ratio ours / theirs from seconds measured in the same rounds: the median over
    rounds of theirs[i] / ours[i] (> 1: ours is faster)."""
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"need equally many samples, got {len(ours)} and {len(theirs)}")
    return statistics.median(b / a for a, b in zip(ours, theirs, strict=True))


def tokens_per_s(tokens: int, seconds: Sequence[float]) -> float:
    return tokens / statistics.median(seconds)


def ceiling_tokens_per_s(bandwidth_gb_s: float, step_bytes: int) -> float:
    """The most tokens/s a decode reading `step_bytes` per token allows at that bandwidth."""
    return bandwidth_gb_s * 1e9 / step_bytes


def top1_agreement(predicted: Sequence[int], reference: Sequence[int]) -> float:
    if not reference or len(predicted) != len(reference):
        raise ValueError(f"need equally long non-empty sequences, got {len(predicted)} and {len(reference)}")
    return sum(int(a == b) for a, b in zip(predicted, reference, strict=True)) / len(reference)


def answer_ok(text: str) -> bool:
    """The chat demo's answer is the expected sentence (surrounding whitespace aside)."""
    return text.strip().startswith(CHAT_ANSWER)


def rss_budget(torch_rss: int, file_bytes: int) -> float:
    return torch_rss + RSS_FILE_FACTOR * file_bytes


# --------------------------------------------------------------------------- machine load


def _busy_jiffies() -> int:
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def _own_jiffies() -> int:
    with open("/proc/self/stat", encoding="ascii") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    return int(after_name[11]) + int(after_name[12])  # utime + stime (all threads)


class OtherLoad:
    """How many cores other processes kept busy between `start()` and `cores()` (Linux)."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start()

    def start(self) -> None:
        self._t = time.monotonic()
        try:
            self._busy, self._own = _busy_jiffies(), _own_jiffies()
        except OSError:
            self._busy = self._own = None

    def cores(self) -> float | None:
        if self._busy is None:
            return None
        elapsed = time.monotonic() - self._t
        others = (_busy_jiffies() - self._busy) - (_own_jiffies() - self._own)
        return max(0.0, others / self._tick / elapsed) if elapsed > 0 else None


# --------------------------------------------------------------------------- engines


class Engine(abc.ABC):
    """One variant of one engine: greedy decode, prefill and all-position logits on token ids."""

    engine: str
    variant: str
    step_bytes: int

    @property
    def key(self) -> str:
        return key(self.engine, self.variant)

    def set_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    @abc.abstractmethod
    def greedy(self, prompt: Sequence[int], new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        """Greedy new tokens after `prompt`: `new_tokens` of them, fewer only at a stop id."""

    @abc.abstractmethod
    def prefill(self, ids: Sequence[int]) -> None:
        """`ids` into an empty cache, logits of the last position only."""

    @abc.abstractmethod
    def forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[int]:
        """Teacher-forced decode: after `prompt`, at each step the argmax of the logits is
        recorded and the continuation's token is fed instead (the decode path, one step per
        token, as `greedy` runs it)."""


class Forcer:
    """A logits processor (fmodel's and Transformers' protocol: (input_ids, scores) -> scores)
    that records each step's argmax and forces the next token of `tokens`."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self.argmax: list[int] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.argmax.append(int(scores[0].argmax()))
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[len(self.argmax) - 1]] = 0.0
        return forced


def module_step_bytes(module: Any) -> int:
    """A decode step's weight reads of a torch module: every distinct parameter and buffer,
    less an input embedding that is not also its output embedding."""
    tensors = {t.data_ptr(): t for t in (*module.parameters(), *module.buffers())}
    embedding = module.get_input_embeddings().weight
    output = module.get_output_embeddings()
    if output is None or output.weight.data_ptr() != embedding.data_ptr():
        tensors.pop(embedding.data_ptr(), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FmodelEngine(Engine):
    engine = "fmodel"

    def __init__(self, variant: FmodelVariant, state: Any) -> None:
        from decode import step_bytes

        self.variant = variant.label
        self.state = state
        self.options = {"compile": True} if variant.compile else {}
        self.step_bytes = step_bytes(state)

    def greedy(self, prompt: Sequence[int], new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        import torch

        import fmodel

        stop = list(stop_ids)
        config = fmodel.GenerationConfig()  # no EOS: the full length
        if stop:
            config = config.replace(eos_token_id=stop)
        ids = torch.tensor([list(prompt)])
        with torch.inference_mode():
            out = fmodel.generate(
                self.state,
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                generation_config=config,
                **self.options,
            )
        return out[0, len(prompt) :].tolist()

    def prefill(self, ids: Sequence[int]) -> None:
        import torch

        import fmodel

        x = torch.tensor([list(ids)])
        with torch.inference_mode():
            cache = fmodel.init_cache(self.state, 1, len(ids))
            fmodel.forward(self.state, x, past_key_values=cache, logits_to_keep=1)

    def forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[int]:
        import torch

        import fmodel

        forcer = Forcer(continuation)
        ids = torch.tensor([list(prompt)])
        with torch.inference_mode():
            fmodel.generate(
                self.state,
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(continuation),
                generation_config=fmodel.GenerationConfig(),
                logits_processor=[forcer],
                **self.options,
            )
        return forcer.argmax


class TransformersEngine(Engine):
    engine = "transformers"

    def __init__(self, variant: str, model: Any) -> None:
        self.variant = variant
        self.model = model
        self.step_bytes = module_step_bytes(model)

    def greedy(self, prompt: Sequence[int], new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        import torch

        stop = list(stop_ids)
        ids = torch.tensor([list(prompt)])
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=stop or None,
                pad_token_id=stop[0] if stop else 0,
            )
        return out[0, len(prompt) :].tolist()

    def prefill(self, ids: Sequence[int]) -> None:
        import torch

        with torch.inference_mode():
            self.model(torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)

    def forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[int]:
        import torch
        from transformers import LogitsProcessorList

        forcer = Forcer(continuation)
        ids = torch.tensor([list(prompt)])
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(continuation),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([forcer]),
            )
        return forcer.argmax


class LlamaEngine(Engine):
    engine = "llama.cpp"

    def __init__(self, variant: str, path: Path, threads: int) -> None:
        import llama_cpp_peer

        self.variant = variant
        self.path = path
        self.model = llama_cpp_peer.LlamaCppModel(path, n_ctx=N_CTX, threads=threads)
        self.step_bytes = llama_cpp_peer.step_bytes(path)

    def set_threads(self, threads: int) -> None:
        self.model.set_threads(threads)

    def greedy(self, prompt: Sequence[int], new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        return self.model.greedy(prompt, new_tokens, stop_ids)

    def prefill(self, ids: Sequence[int]) -> None:
        self.model.prefill(ids)

    def forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[int]:
        return self.model.forced(prompt, continuation)


# --------------------------------------------------------------------------- building them


def fmodel_option_missing(variant: FmodelVariant) -> str | None:
    """Why fmodel cannot run `variant` here (an option its functions do not take), or None."""
    import inspect

    import fmodel

    if variant.compile and "compile" not in inspect.signature(fmodel.generate).parameters:
        return "fmodel.generate takes no compile= option"
    if variant.act8:
        where = fmodel.load if variant.base == "gguf" else fmodel.quantize
        if "activations" not in inspect.signature(where).parameters:
            return f"fmodel.{where.__name__} takes no activations= option"
    return None


def load_fmodel_state(variant: FmodelVariant, checkpoint: Path, gguf: Path, cache: dict[str, Any]) -> Any:
    """The state of `variant`; float bases are loaded once into `cache` and shared."""
    import fmodel

    act = {"activations": "int8"} if variant.act8 else {}
    if variant.base == "gguf":
        return fmodel.load(gguf, quantized=True, attn_implementation=ATTN, **act)
    dtype = "bfloat16" if variant.base == "bfloat16" else "float32"
    if dtype not in cache:
        # float32 is stored so: mmap=False copies it out of the file mapping, which this VM's
        # decode reads 8-10 % faster (fmodel.load's mmap); llama.cpp measured the same either
        # way here (F32 54.1 / 54.0 tok/s with / without mmap, one thread), so its default stays.
        cache[dtype] = fmodel.load(checkpoint, dtype=dtype, attn_implementation=ATTN, mmap=dtype != "float32")
    base = cache[dtype]
    if variant.base in ("float32", "bfloat16"):
        return base
    group = {"group_size": INT4_GROUP} if variant.base == "int4" else {}
    return fmodel.quantize(base, variant.base, **group, **act)


def load_transformers(variant: str, checkpoint: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, variant), attn_implementation=ATTN
    ).eval()


def llama_file(variant: str, gguf: Path, source_type: str) -> Path:
    """The GGUF file llama.cpp runs for `variant`: the shipped file for its own type, else a
    cached conversion of it."""
    import llama_cpp_peer

    if variant == source_type:
        return gguf
    return llama_cpp_peer.convert(gguf, variant, CACHE_DIR)


def gguf_type(gguf: Path) -> str:
    """The file's own quantization: the most common type of its 2-D tensors ("Q4_1")."""
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(gguf).tensors if len(t.shape) == 2)
    return counts.most_common(1)[0][0]


@dataclass
class Selection:
    """What to run: variant labels per engine, thread counts, rounds."""

    fmodel: list[str] | None  # None: default_fmodel_variants()
    llama: list[str]
    transformers: list[str]
    threads: list[int]
    repeats: int = 3
    prefill_repeats: int = 5
    new_tokens: int = 128
    rss: bool = True
    quality: bool = True


def default_fmodel_variants() -> list[str]:
    """The base variants, plus the optional ones fmodel offers now."""
    labels = list(FMODEL_VARIANTS)
    labels += [v for v in FMODEL_OPTIONAL if fmodel_option_missing(FmodelVariant.parse(v)) is None]
    return labels


def build_engines(
    selection: Selection, checkpoint: Path, gguf: Path, skipped: dict[str, str], log: Callable[[str], None]
) -> list[Engine]:
    """Every selected engine that can run here; the others go into `skipped` with the reason."""
    import llama_cpp_peer

    engines: list[Engine] = []
    cache: dict[str, Any] = {}
    for label in selection.fmodel:
        variant = FmodelVariant.parse(label)
        reason = fmodel_option_missing(variant)
        if reason:
            skipped[key("fmodel", label)] = reason
            continue
        start = time.perf_counter()
        engines.append(FmodelEngine(variant, load_fmodel_state(variant, checkpoint, gguf, cache)))
        log(f"  fmodel {label}: {time.perf_counter() - start:.1f} s")
    missing = llama_cpp_peer.missing_reason() if selection.llama else None
    if missing:
        for label in selection.llama:
            skipped[key("llama.cpp", label)] = missing
    else:
        source_type = gguf_type(gguf) if selection.llama else ""
        broken = llama_cpp_peer.batch_check(gguf) if selection.llama else None
        for label in selection.llama:
            if broken:
                skipped[key("llama.cpp", label)] = broken
                continue
            start = time.perf_counter()
            path = llama_file(label, gguf, source_type)
            engines.append(LlamaEngine(label, path, selection.threads[0]))
            log(f"  llama.cpp {label} ({path.name}): {time.perf_counter() - start:.1f} s")
    for label in selection.transformers:
        start = time.perf_counter()
        engines.append(TransformersEngine(label, load_transformers(label, checkpoint)))
        log(f"  transformers {label}: {time.perf_counter() - start:.1f} s")
    return engines


# --------------------------------------------------------------------------- measuring


def time_rounds(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    warmups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call; each round calls every function once, the order flipping every round,
    after one untimed call each of `warmups` (default: of `calls`)."""
    names = list(calls)
    for warm in (calls if warmups is None else warmups).values():
        warm()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


@dataclass
class ThreadResult:
    """Everything timed at one thread count."""

    threads: int
    bandwidth_gb_s: float
    decode_s: dict[str, list[float]]
    prefill_s: dict[str, list[float]]
    other_cores: float | None  # cores other processes kept busy meanwhile


@dataclass
class EnginesReport:
    selection: Selection
    gguf: Path
    gguf_bytes: int
    checkpoint: Path
    runs: list[ThreadResult] = field(default_factory=list)
    step_bytes: dict[str, int] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    rss: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # llama.cpp variant -> file
    llama_info: str = ""
    probe_text: list[str] = field(default_factory=list)  # the float32 answers the agreement is measured on
    probe_reference: str = ""  # the variant that made it
    seconds: float = 0.0


def _decode_prompt(vocab: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (PROMPT_TOKENS,), generator=generator).tolist()


def _prefill_ids(vocab: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(PREFILL_TOKENS)
    return torch.randint(0, vocab, (PREFILL_TOKENS,), generator=generator).tolist()


def measure_threads(engines: Sequence[Engine], selection: Selection, vocab: int) -> list[ThreadResult]:
    """Decode and prefill rounds at each thread count (see the module docstring)."""
    from decode import read_bandwidth_gb_s

    prompt, prefill_ids = _decode_prompt(vocab), _prefill_ids(vocab)
    n = selection.new_tokens
    results = []
    for threads in selection.threads:
        for engine in engines:
            engine.set_threads(threads)
        import torch

        torch.set_num_threads(threads)
        bandwidth = read_bandwidth_gb_s()
        load = OtherLoad()
        decode_calls = {e.key: (lambda e=e: e.greedy(prompt, n)) for e in engines}
        # A short warm-up call, except where the shape decides what is compiled.
        warmups = {
            e.key: (lambda e=e: e.greedy(prompt, n if _compiles(e) else WARMUP_TOKENS)) for e in engines
        }
        decode = time_rounds(decode_calls, selection.repeats, warmups)
        prefill_calls = {e.key: (lambda e=e: e.prefill(prefill_ids)) for e in engines}
        prefill = time_rounds(prefill_calls, selection.prefill_repeats)
        results.append(ThreadResult(threads, bandwidth, decode, prefill, load.cores()))
    return results


def _compiles(engine: Engine) -> bool:
    return isinstance(engine, FmodelEngine) and bool(engine.options.get("compile"))


def measure_quality(
    engines: Sequence[Engine], tokenizer: Any, report: EnginesReport, log: Callable[[str], None]
) -> None:
    """Each fmodel and llama.cpp variant's chat answer, and its top-1 agreement with float32
    over the probe (Transformers' engines only give the reference when fmodel float32 is off)."""
    checked = [e for e in engines if e.engine != "transformers"]
    reference = next((e for e in engines if e.key == key("fmodel", "float32")), None)
    if reference is None:
        reference = next((e for e in engines if e.key == key("transformers", "float32")), None)
    stop = tokenizer.eos_token_ids
    chat = _chat_ids(tokenizer, CHAT_QUESTION)
    for engine in checked:
        answer = engine.greedy(chat, CHAT_NEW_TOKENS, stop)
        report.answers[engine.key] = tokenizer.decode(answer, skip_special_tokens=True)
    if reference is None:
        report.skipped["top-1 agreement"] = "needs fmodel float32 or transformers float32 as the reference"
        return
    segments = probe_segments(reference, tokenizer)
    report.probe_text = [tokenizer.decode(answer) for _, answer in segments]
    report.probe_reference = reference.key
    reference_tokens = [t for _, answer in segments for t in answer]
    for engine in checked:
        if engine is reference:
            continue  # its forced argmax is its greedy continuation: 1.0 by construction
        start = time.perf_counter()
        predicted = [t for prompt, answer in segments for t in engine.forced(prompt, answer)]
        report.agreement[engine.key] = top1_agreement(predicted, reference_tokens)
        log(f"  {engine.key}: top-1 {report.agreement[engine.key]:.3f} ({time.perf_counter() - start:.1f} s)")


def probe_segments(reference: Engine, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt, float32 greedy answer) per probe question, the answers `PROBE_TOKENS` tokens in
    all (each to its EOS, which counts, or PROBE_ANSWER_TOKENS; the last one cut to fit)."""
    segments = []
    left = PROBE_TOKENS
    for question in PROBE_QUESTIONS:
        prompt = _chat_ids(tokenizer, question)
        answer = reference.greedy(prompt, min(PROBE_ANSWER_TOKENS, left), tokenizer.eos_token_ids)
        segments.append((prompt, answer))
        left -= len(answer)
        if left == 0:
            return segments
    raise RuntimeError(
        f"the probe questions gave {PROBE_TOKENS - left} answer tokens, fewer than {PROBE_TOKENS}"
    )


def _chat_ids(tokenizer: Any, question: str) -> list[int]:
    """The ids `fmodel generate --chat` sends for `question`."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def measure_engines(
    selection: Selection, checkpoint: Path, gguf: Path, log: Callable[[str], None] = print
) -> EnginesReport:
    """Build the engines, time them at each thread count, check their quality, and measure the
    peak RSS of each variant in its own subprocess."""
    import fmodel

    started = time.perf_counter()
    if selection.fmodel is None:
        selection = dataclasses.replace(selection, fmodel=default_fmodel_variants())
    report = EnginesReport(selection, gguf, gguf.stat().st_size, checkpoint)
    log("engines: loading the variants ...")
    engines = build_engines(selection, checkpoint, gguf, report.skipped, log)
    if not engines:
        raise RuntimeError("no engine to run")
    for engine in engines:
        report.step_bytes[engine.key] = engine.step_bytes
        if isinstance(engine, LlamaEngine):
            report.files[engine.variant] = str(engine.path)
    if any(isinstance(e, LlamaEngine) for e in engines):
        import llama_cpp_peer

        report.llama_info = f"llama-cpp-python {llama_cpp_peer.version()}: {llama_cpp_peer.system_info()}"
    tokenizer = fmodel.Tokenizer.from_gguf(gguf)
    if selection.quality:
        log(f"engines: chat answers and top-1 agreement over {PROBE_TOKENS} probe tokens ...")
        for engine in engines:
            engine.set_threads(max(selection.threads))
        measure_quality(engines, tokenizer, report, log)
    log(
        f"engines: {selection.repeats} decode rounds ({selection.new_tokens} new tokens) and "
        f"{selection.prefill_repeats} prefill rounds at threads {selection.threads} ..."
    )
    report.runs = measure_threads(engines, selection, tokenizer.vocab_size)
    for engine in engines:
        if isinstance(engine, LlamaEngine):
            engine.model.close()
    del engines
    if selection.rss:
        log("engines: peak RSS, one fresh subprocess per variant ...")
        for label in selection.fmodel:
            k = key("fmodel", label)
            if k not in report.skipped:
                report.rss[k] = run_rss_child("fmodel", label, checkpoint, gguf, max(selection.threads))
        for label, path in report.files.items():
            report.rss[key("llama.cpp", label)] = run_rss_child(
                "llama.cpp", label, checkpoint, Path(path), max(selection.threads)
            )
        for label in selection.transformers:
            report.rss[key("transformers", label)] = run_rss_child(
                "transformers", label, checkpoint, gguf, max(selection.threads)
            )
    report.seconds = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------- RSS children


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def rss_child(engine: str, variant: str, checkpoint: Path, file: Path, threads: int) -> dict[str, Any]:
    """In a fresh process: import the engine, load `variant`, one short greedy run; RSS numbers."""
    if engine == "llama.cpp":
        import llama_cpp_peer
        import numpy  # noqa: F401 (llama_cpp's import; part of its baseline)

        llama_cpp_peer.missing_reason()  # loads the shared libraries
        baseline = runtime = _rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        made: Engine = LlamaEngine(variant, file, threads)
    else:
        import torch

        baseline = _rss_kib("VmRSS") * 1024  # torch's own baseline
        torch.set_num_threads(threads)
        runtime = torch_runtime_rss()
        start = time.perf_counter()
        if engine == "fmodel":
            parsed = FmodelVariant.parse(variant)
            made = FmodelEngine(parsed, load_fmodel_state(parsed, checkpoint, file, {}))
        else:
            import transformers

            transformers.logging.set_verbosity_error()
            made = TransformersEngine(variant, load_transformers(variant, checkpoint))
    load_s = time.perf_counter() - start
    made.greedy(list(range(100, 100 + PROMPT_TOKENS)), RSS_NEW_TOKENS)
    return {
        "baseline_rss": baseline,
        "runtime_rss": runtime,
        "peak_rss": _rss_kib("VmHWM") * 1024,
        "load_s": load_s,
    }


def torch_runtime_rss() -> int:
    """VmRSS after torch alone has run, once, on toy tensors, the CPU ops a decoder step uses
    (an embedding, matrix products of 1 and 16 rows, RMS-norm arithmetic, RoPE's cat and
    trigonometry, causal SDPA, SiLU, argmax): what running torch costs before any model, its
    code paged in and its runtime's buffers, reported beside the baseline after `import torch`
    so that a peak's excess over it is what the model and its library hold."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        w = torch.randn(96, 64, generator=g)
        for rows in (1, 16):
            ids = torch.arange(rows)[None]
            x = F.embedding(ids, w)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            h = F.linear(x, w).view(1, rows, 6, 16).transpose(1, 2)
            angle = torch.arange(rows)[:, None] * torch.ones(8)
            rot = torch.cat((angle.cos(), angle.sin()), dim=-1)
            h = h * rot + torch.cat((-h[..., 8:], h[..., :8]), dim=-1)
            a = F.scaled_dot_product_attention(h, h, h, is_causal=True)
            y = F.linear(F.silu(a.transpose(1, 2).reshape(1, rows, 96)), w.T)
            y.argmax(-1)
    return _rss_kib("VmRSS") * 1024


def run_rss_child(engine: str, variant: str, checkpoint: Path, file: Path, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_rss", engine, variant]
    cmd += ["--checkpoint", str(checkpoint), "--file", str(file), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RSS_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{engine} {variant} RSS subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(RSS_MARKER) :])


# --------------------------------------------------------------------------- report


def _pass(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


def format_columns(rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Aligned text columns: the first `left` left-aligned, the rest right-aligned; a rule
    under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def fmt(row: Sequence[str]) -> str:
        cells = (
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(rows[0]), fmt(["-" * w for w in widths]), *map(fmt, rows[1:])])


def pairing(label: str) -> tuple[str, str, float | None, float | None]:
    """(llama.cpp peer, Transformers reference, target vs the peer, target vs Transformers) of
    an fmodel variant label."""
    base = FmodelVariant.parse(label).base
    reference = "bfloat16" if base == "bfloat16" else "float32"
    return (
        PEERS[base],
        reference,
        DECODE_TARGET if base in PEER_TARGETS else None,
        TRANSFORMERS_TARGETS.get(label),
    )


@dataclass
class Check:
    """One target of the engines section and whether it was met."""

    name: str
    value: str
    target: str
    passed: bool


def _ratio_cells(
    samples: dict[str, list[float]], ours: str, theirs: str, target: float | None
) -> tuple[str, str, str, bool | None]:
    """Ratio, target, result cells for ours vs theirs (empty where theirs did not run)."""
    if theirs not in samples:
        return "", "", "", None
    ratio = round_ratio(samples[ours], samples[theirs])
    ok = None if target is None else ratio >= target
    return f"{ratio:.2f}x", "" if target is None else f">= {target:.1f}x", _pass(ok), ok


def decode_table(report: EnginesReport, run: ThreadResult) -> tuple[str, list[Check]]:
    """The decode table at one thread count and the targets it checks."""
    n = report.selection.new_tokens
    header = ("variant", "tok/s", "MB/tok", "GB/s", "ceiling", "of ceil", "vs llama.cpp", "target", "")
    header += ("vs transformers", "target", "")
    rows: list[tuple[str, ...]] = [header]
    checks: list[Check] = []
    for name, samples in run.decode_s.items():
        speed = tokens_per_s(n, samples)
        nbytes = report.step_bytes[name]
        ceiling = ceiling_tokens_per_s(run.bandwidth_gb_s, nbytes)
        cells = [name, f"{speed:.1f}", f"{nbytes / 1e6:.0f}", f"{speed * nbytes / 1e9:.1f}"]
        cells += [f"{ceiling:.0f}", f"{speed / ceiling:.0%}"]
        if name.startswith("fmodel "):
            label = name.split(" ", 1)[1]
            peer, reference, peer_target, hf_target = pairing(label)
            llama = _ratio_cells(run.decode_s, name, key("llama.cpp", peer), peer_target)
            hf = _ratio_cells(run.decode_s, name, key("transformers", reference), hf_target)
            cells += [f"{llama[0]} {peer}" if llama[0] else "", *llama[1:3]]
            cells += [f"{hf[0]} {reference}" if hf[0] else "", *hf[1:3]]
            for (ratio, target, _, ok), other in (
                (llama, f"llama.cpp {peer}"),
                (hf, f"transformers {reference}"),
            ):
                if ok is not None:
                    checks.append(Check(f"decode {run.threads}T {name} vs {other}", ratio, target, ok))
        else:
            cells += [""] * 6
        rows.append(tuple(cells))
    return format_columns(rows), checks


def prefill_table(report: EnginesReport, run: ThreadResult) -> tuple[str, list[Check]]:
    header = ("variant", "ms", "tok/s", "vs llama.cpp", "target", "", "vs transformers")
    rows: list[tuple[str, ...]] = [header]
    checks = []
    for name, samples in run.prefill_s.items():
        ms = statistics.median(samples) * 1e3
        cells = [name, f"{ms:.1f}", f"{PREFILL_TOKENS / ms * 1e3:.0f}"]
        if name.startswith("fmodel "):
            label = name.split(" ", 1)[1]
            peer, reference, _, _ = pairing(label)
            target = PREFILL_TARGET if label == "float32" else None
            llama = _ratio_cells(run.prefill_s, name, key("llama.cpp", peer), target)
            hf = _ratio_cells(run.prefill_s, name, key("transformers", reference), None)
            cells += [
                f"{llama[0]} {peer}" if llama[0] else "",
                *llama[1:3],
                f"{hf[0]} {reference}" if hf[0] else "",
            ]
            if llama[3] is not None:
                checks.append(
                    Check(f"prefill {run.threads}T {name} vs llama.cpp {peer}", llama[0], llama[1], llama[3])
                )
        else:
            cells += [""] * 4
        rows.append(tuple(cells))
    return format_columns(rows), checks


def quality_table(report: EnginesReport) -> tuple[str, list[Check]]:
    """Peak RSS, chat answer and top-1 agreement per variant, with their targets."""
    header = (
        "variant",
        "peak RSS",
        "baseline",
        "peak-base",
        "torch ops",
        "RSS target",
        "",
        "top-1",
        "",
        "chat answer",
        "",
    )
    rows: list[tuple[str, ...]] = [header]
    checks = []
    names = dict.fromkeys([*report.step_bytes, *report.rss])
    for name in names:
        cells = [name]
        rss = report.rss.get(name)
        if rss:
            cells += [f"{rss['peak_rss'] / MIB:.0f} MiB", f"{rss['baseline_rss'] / MIB:.0f} MiB"]
            cells.append(f"{(rss['peak_rss'] - rss['baseline_rss']) / MIB:.0f} MiB")
            ops = rss.get("runtime_rss", rss["baseline_rss"]) - rss["baseline_rss"]
            cells.append(f"+{ops / MIB:.0f} MiB" if ops else "")
            if name.startswith("fmodel gguf"):
                budget = rss_budget(rss.get("runtime_rss", rss["baseline_rss"]), report.gguf_bytes)
                ok = rss["peak_rss"] <= budget
                cells += [f"<= {budget / MIB:.0f} MiB", _pass(ok)]
                checks.append(Check(f"RSS {name}", cells[1], cells[-2], ok))
            else:
                cells += ["", ""]
        else:
            cells += [""] * 6
        quantized = _is_quantized(name)
        agreement = report.agreement.get(name)
        if name == report.probe_reference:
            cells += ["ref", ""]
        elif agreement is None:
            cells += ["", ""]
        else:
            ok = agreement >= AGREEMENT_TARGET if quantized else None
            cells += [f"{agreement:.3f}", _pass(ok)]
            if ok is not None:
                checks.append(Check(f"top-1 {name}", f"{agreement:.3f}", f">= {AGREEMENT_TARGET}", ok))
        answer = report.answers.get(name)
        if answer is None:
            cells += ["", ""]
        else:
            shown = answer.strip().replace("\n", " ")
            shown = shown if len(shown) <= 48 else shown[:45] + "..."
            ok = answer_ok(answer) if quantized else None
            cells += [repr(shown), _pass(ok)]
            if ok is not None:
                checks.append(Check(f"chat {name}", repr(shown), repr(CHAT_ANSWER), ok))
        rows.append(tuple(cells))
    return format_columns(rows), checks


def summary_table(report: EnginesReport) -> str:
    """One row per variant, issue 15's table: decode and prefill tokens/s per thread count,
    peak RSS, top-1 agreement and whether the chat answer is the demo's."""
    n = report.selection.new_tokens
    header = ["variant"]
    header += [f"decode {run.threads}T" for run in report.runs]
    header += [f"prefill {run.threads}T" for run in report.runs]
    header += ["peak RSS", "top-1", "Paris"]
    rows = [tuple(header)]
    names = dict.fromkeys([*report.step_bytes, *report.rss])
    for name in names:
        cells = [name]
        cells += [
            f"{tokens_per_s(n, run.decode_s[name]):.1f}" if name in run.decode_s else ""
            for run in report.runs
        ]
        cells += [
            f"{tokens_per_s(PREFILL_TOKENS, run.prefill_s[name]):.0f}" if name in run.prefill_s else ""
            for run in report.runs
        ]
        rss = report.rss.get(name)
        cells.append(f"{rss['peak_rss'] / MIB:.0f} MiB" if rss else "")
        agreement = report.agreement.get(name)
        cells.append(
            "ref" if name == report.probe_reference else "" if agreement is None else f"{agreement:.3f}"
        )
        answer = report.answers.get(name)
        cells.append("" if answer is None else ("yes" if answer_ok(answer) else "no"))
        rows.append(tuple(cells))
    return format_columns(rows)


def _is_quantized(name: str) -> bool:
    engine, variant = name.split(" ", 1)
    if engine == "fmodel":
        return FmodelVariant.parse(variant).quantized
    return engine == "llama.cpp" and variant not in ("F32", "F16", "BF16")


def report_text(report: EnginesReport) -> tuple[str, list[Check]]:
    """The engines section as text, and every target it checked."""
    lines = [
        f"fmodel vs llama.cpp vs Transformers on {report.gguf.name} ({report.gguf_bytes / 1e6:.1f} MB); "
        f"float32 checkpoint {report.checkpoint.name}",
    ]
    if report.llama_info:
        lines.append(report.llama_info)
    checks: list[Check] = []
    for run in report.runs:
        others = "unknown" if run.other_cores is None else f"{run.other_cores:.2f} cores"
        lines += [
            "",
            f"greedy decode, {run.threads} thread(s), batch 1, prompt {PROMPT_TOKENS} + "
            f"{report.selection.new_tokens} new tokens, {report.selection.repeats} rounds "
            f"(bandwidth probe {run.bandwidth_gb_s:.1f} GB/s; other processes used {others} meanwhile)",
        ]
        text, found = decode_table(report, run)
        lines.append(text)
        checks += found
        lines += [
            "",
            f"prefill {PREFILL_TOKENS} tokens, {run.threads} thread(s), {report.selection.prefill_repeats} rounds",
        ]
        text, found = prefill_table(report, run)
        lines.append(text)
        checks += found
    if report.rss or report.agreement or report.answers:
        lines += [
            "",
            f"peak RSS (fresh subprocess per variant), top-1 agreement with float32 over {PROBE_TOKENS} "
            f"probe tokens, chat answer to {CHAT_QUESTION!r}",
        ]
        text, found = quality_table(report)
        lines.append(text)
        checks += found
    if report.runs:
        lines += [
            "",
            "summary (tokens/s; decode: prompt included, median over rounds)",
            summary_table(report),
        ]
    lines.append(
        "tok/s: new tokens / whole call (prompt included); MB/tok: weights read per decode step; GB/s: "
        "achieved weight reads; ceiling: bandwidth / MB per token; ratios: fmodel speed / the other's, "
        "median over same-round pairs"
    )
    for name, reason in report.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    met = sum(c.passed for c in checks)
    lines.append(f"engines: {met}/{len(checks)} targets met ({report.seconds:.0f} s)")
    return "\n".join(lines), checks


def json_payload(report: EnginesReport, checks: Sequence[Check]) -> dict[str, Any]:
    n = report.selection.new_tokens
    return {
        "gguf": str(report.gguf),
        "gguf_bytes": report.gguf_bytes,
        "checkpoint": str(report.checkpoint),
        "llama_cpp": report.llama_info,
        "files": report.files,
        "new_tokens": n,
        "prompt_tokens": PROMPT_TOKENS,
        "prefill_tokens": PREFILL_TOKENS,
        "step_bytes": report.step_bytes,
        "threads": [
            {
                "threads": run.threads,
                "bandwidth_gb_s": run.bandwidth_gb_s,
                "other_cores": run.other_cores,
                "decode_tokens_per_s": {k: tokens_per_s(n, v) for k, v in run.decode_s.items()},
                "decode_samples_s": run.decode_s,
                "prefill_median_s": {k: statistics.median(v) for k, v in run.prefill_s.items()},
                "prefill_samples_s": run.prefill_s,
            }
            for run in report.runs
        ],
        "agreement": report.agreement,
        "answers": report.answers,
        "probe_text": report.probe_text,
        "probe_reference": report.probe_reference,
        "rss": report.rss,
        "skipped": report.skipped,
        "checks": [c.__dict__ for c in checks],
        "seconds": report.seconds,
    }


def child_main(argv: Sequence[str]) -> int:
    """`engines.py --_rss ENGINE VARIANT --checkpoint P --file F --threads N` (run_rss_child)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--_rss", nargs=2, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    engine, variant = args._rss
    result = rss_child(engine, variant, args.checkpoint, args.file, args.threads)
    print(RSS_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # decode.py and llama_cpp_peer.py beside this file
    sys.exit(child_main(sys.argv[1:]))
