"""Bad input to every `fmodel` command: one line on stderr, a documented exit status, no traceback.

Exit statuses (fmodel/cli/__init__.py, `fmodel --help`, README): 0 ok, 1 bad input, 2 usage,
70 internal error (a bug in fmodel), 130 interrupted. Each case runs through `main([...])`; a few
run in a real subprocess (`python -m fmodel ...`). A small seeded fuzz corrupts a GGUF file's
header and checks that `inspect` only ever answers 0 or 1 with one line.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch

import fmodel
import fmodel.cli
from fmodel.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, main

from . import test_cli
from .test_cli import HAS_TOKENIZERS, run

# test_cli's fixtures: its tiny Llama folder (with tokenizer) and its synthetic GGUF file.
backend = test_cli.backend
folder = test_cli.folder
gguf_file = test_cli.gguf_file
one_thread = test_cli.one_thread

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not HAS_TOKENIZERS, reason="the `tokenizers` package is not installed")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No test here may reach for the network: the hub is offline and the cache empty."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))


def assert_one_line(code: int, err: str, command: str, expected_code: int = EXIT_BAD_INPUT) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"fmodel {command}: error: "), err


def corrupt_copies(gguf_path: str, tmp_path: Path) -> dict[str, Path]:
    data = Path(gguf_path).read_bytes()
    out = {
        "truncated": data[: len(data) // 2],
        "header only": data[:64],
        "bad magic": b"GGUX" + data[4:],
        "bad version": data[:4] + (99).to_bytes(4, "little") + data[8:],
        "huge counts": data[:8] + b"\xff" * 16 + data[24:],
        "junk": b"GGUF" + b"\x00" * 12,
    }
    paths = {}
    for name, payload in out.items():
        path = tmp_path / (name.replace(" ", "-") + ".gguf")
        path.write_bytes(payload)
        paths[name] = path
    return paths


def generate_cases(folder: Path, tmp_path: Path) -> dict[str, tuple[list, str]]:
    no_bos = tmp_path / "no-bos"
    if not no_bos.exists():
        no_bos.mkdir()
        for f in folder.iterdir():
            (no_bos / f.name).write_bytes(f.read_bytes())
        config = json.loads((no_bos / "config.json").read_text())
        config["bos_token_id"] = None
        (no_bos / "config.json").write_text(json.dumps(config))
    cases = {
        "device banana": (["--device", "banana"], "--device='banana' is not a device torch knows"),
        "device meta": (["--device", "meta"], "--device meta holds no data"),
        "device cuda:99": (["--device", "cuda:99"], "--device='cuda:99'"),
        "dtype banana": (["--dtype", "banana"], "dtype 'banana' is not understood"),
        "dtype int8": (["--dtype", "int8"], "dtype 'int8' is not understood"),
        "negative max-new-tokens": (["-n", "-1"], "--max-new-tokens must be >= 1, got -1"),
        "nan temperature": (["-t", "nan"], "--temperature must be a finite number"),
        "negative temperature": (["-t", "-1"], "--temperature must be a finite number >= 0"),
        "infinite temperature": (["-t", "inf"], "--temperature"),
        "nan top-p": (["-t", "1", "--top-p", "nan"], "--top-p"),
        "top-p 2": (["-t", "1", "--top-p", "2"], "top_p"),
        "negative top-k": (["-t", "1", "--top-k", "-3"], "top_k"),
        "huge seed": (["-t", "1", "--seed", str(2**70)], "--seed"),
        "a billion threads": (["--threads", str(10**9)], "--threads must be between 1 and"),
        "zero threads": (["--threads", "0"], "--threads"),
        "bad attention": (["--attn", "banana"], "banana"),
        "system without chat": (["--system", "s"], "--system needs --chat"),
    }
    if not torch.cuda.is_available():
        cases["device cuda"] = (["--device", "cuda"], "CUDA is not available here")
    argv = {
        name: (["generate", folder, "-p", "hi", "-n", "2", *extra], msg)
        for name, (extra, msg) in cases.items()
    }
    argv["nonexistent path"] = (["generate", tmp_path / "nope", "-p", "hi"], "no such folder")
    argv["nonexistent gguf"] = (["generate", tmp_path / "nope.gguf", "-p", "hi"], "no such GGUF file")
    argv["empty prompt, no BOS"] = (["generate", no_bos, "-p", ""], "the prompt is empty")
    argv["hub id offline, not cached"] = (
        ["generate", "tiny-org/absent", "-p", "hi"],
        "offline mode is on: HF_HUB_OFFLINE=1",
    )
    argv["invalid repo id"] = (["generate", "a b/c", "-p", "hi"], "not a valid hub repo id")
    return argv


def test_generate_bad_inputs(folder, tmp_path, capsys):
    for case, (argv, message) in generate_cases(folder, tmp_path).items():
        code, out, err = run(argv, capsys)
        assert_one_line(code, err, "generate")
        assert message in err, (case, err)
        assert out == "", case


def test_generate_huge_max_new_tokens_is_bounded_by_the_context(folder, capsys, monkeypatch):
    calls = []
    real = fmodel.generate

    def spy(state, ids, **kwargs):
        calls.append(kwargs["generation_config"].max_new_tokens)
        return real(state, ids, **kwargs)

    monkeypatch.setattr(fmodel, "generate", spy)
    code, _, err = run(["generate", folder, "-p", "hi", "-n", str(10**12)], capsys)
    assert code == 0, err
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    assert calls and calls[0] < context


def test_inspect_bad_inputs(folder, gguf_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = {
        "nonexistent": ([tmp_path / "nope"], "no such folder"),
        "a json file": ([folder / "config.json"], "not a GGUF file"),
        "empty string": ([""], "not a valid hub repo id"),
        "folder without config": ([tmp_path / "empty"], "no config.json"),
        "missing --gguf-file": ([folder, "--gguf-file", "x.gguf"], "no GGUF file 'x.gguf'"),
        "hub id offline": (["tiny-org/absent"], "HF_HUB_OFFLINE=1"),
    }
    for name, path in corrupt_copies(gguf_file[0], tmp_path).items():
        cases[f"corrupt gguf: {name}"] = ([path], str(path))
    for case, (argv, message) in cases.items():
        code, _, err = run(["inspect", *argv], capsys)
        assert_one_line(code, err, "inspect")
        assert message in err, (case, err)


def test_convert_bad_inputs(folder, gguf_file, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    dst = tmp_path / "out"
    corrupt = corrupt_copies(gguf_file[0], tmp_path)["truncated"]
    cases = {
        "dtype banana": ([folder, dst, "--dtype", "banana"], "dtype 'banana'"),
        "dtype int8": ([folder, dst, "--dtype", "int8"], "dtype 'int8'"),
        "negative shard size": ([folder, dst, "--max-shard-size", "-1"], "--max-shard-size '-1'"),
        "zero shard size": ([folder, dst, "--max-shard-size", "0"], "max_shard_size"),
        "negative group size": ([folder, dst, "--quantize", "int4", "--group-size", "-1"], "-1"),
        "destination is a file": ([folder, tmp_path / "file"], "exists and is not a folder"),
        "nonexistent source": ([tmp_path / "nope", dst], "no such folder"),
        "corrupt gguf source": ([corrupt, dst], str(corrupt)),
    }
    for case, (argv, message) in cases.items():
        code, _, err = run(["convert", *argv], capsys)
        assert_one_line(code, err, "convert")
        assert message in err, (case, err)
        assert not dst.exists(), case
    assert (tmp_path / "file").read_text() == "x"


def test_mutated_gguf_headers_never_crash_inspect(gguf_file, tmp_path, capsys):
    """Seeded byte flips in the first 2 KB (header, metadata, tensor infos): 0 or 1, one line."""
    data = Path(gguf_file[0]).read_bytes()
    rng = random.Random(12)
    outcomes = {"loaded": 0, "named error": 0}
    for i in range(40):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(0, min(2048, len(data)))] = rng.randrange(256)
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(bytes(mutated))
        code, _, err = run(["inspect", path, "--json"], capsys)
        assert code in (0, EXIT_BAD_INPUT), err
        assert "Traceback" not in err and "internal error" not in err, err
        outcomes["loaded" if code == 0 else "named error"] += 1
        path.unlink()
    assert outcomes["named error"] > 0


def test_unexpected_exception_is_reported_as_a_bug(folder, monkeypatch, capsys):
    def boom(loaded):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(fmodel.cli._inspect, "describe", boom)
    code, _, err = run(["inspect", folder], capsys)
    assert_one_line(code, err, "inspect", EXIT_INTERNAL)
    assert "internal error (builtins.RuntimeError: boom; second line)" in err
    assert "bug in fmodel" in err and "--traceback" in err
    code, _, err = run(["inspect", folder, "--traceback"], capsys)
    assert code == EXIT_INTERNAL and "Traceback" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("fmodel inspect: error: internal error")


def test_interrupt_exits_130(folder, monkeypatch, capsys):
    def interrupted(loaded):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmodel.cli._inspect, "describe", interrupted)
    code, _, err = run(["inspect", folder], capsys)
    assert code == EXIT_INTERRUPTED and err == "fmodel inspect: interrupted\n"


@pytest.mark.parametrize(
    "argv",
    [["inspect"], ["inspect", "x", "--bogus"], ["generate", "x"], ["convert", "x"], ["-n", "3"], ["nosuch"]],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


def test_exit_statuses_are_documented(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    for code in ("0", "1", "2", "70", "130"):
        assert f"\n  {code} " in help_text, code
        assert f"\n    {code} " in fmodel.cli.__doc__, code
    assert "internal error" in help_text and "bug in fmodel" in help_text
    assert "2 usage error" in readme and "70 internal error" in readme and "130 interrupted" in readme


def _python_m(argv: list, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run(
        [sys.executable, "-m", "fmodel", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )


def test_real_process_exit_statuses(folder, gguf_file, tmp_path):
    corrupt = corrupt_copies(gguf_file[0], tmp_path)["huge counts"]
    cases = [
        (["generate", folder, "-p", "hi", "--device", "banana"], EXIT_BAD_INPUT),
        (["inspect", corrupt], EXIT_BAD_INPUT),
        (["inspect", folder, "--bogus"], EXIT_USAGE),
    ]
    for argv, expected in cases:
        result = _python_m(argv, tmp_path)
        assert result.returncode == expected, (argv, result.stderr)
        assert "Traceback" not in result.stderr, (argv, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith(("fmodel", "usage")), result.stderr
