"""Every command and code block in README.md runs, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fmodel import attention

from .conftest import requires_transformers

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_one_install_command_and_one_test_command():
    bash = blocks("bash")
    assert len(bash) == 2, bash
    assert bash[0].startswith("pip install -e '.[test]' && python -c \"")
    assert bash[1].strip() == "python -m pytest -q"


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert blocks("bash")[1].strip() in script.splitlines()


@requires_transformers
def test_readme_code_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = re.search(r'python -c "\n(.*?)\n"\n', blocks("bash")[0], flags=re.S)
    assert run is not None
    exec(compile(run.group(1), "README install command", "exec"), {})
    assert "tensor(" in capsys.readouterr().out
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
