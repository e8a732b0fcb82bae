"""`import fmodel` and the CLI's startup import only what the functional API / demo needs.

Behavioural, not timed (benchmarks/startup.py measures the time): each check runs in a fresh
interpreter and looks at `sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "transformers",
    "torch.distributed.tensor",
    "jinja2",
    "tokenizers",
    "huggingface_hub",
    "fmodel.facade",
)


def _modules_after(code: str) -> dict:
    probe = f"import json, sys\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_fmodel_imports_no_heavy_optional_module():
    loaded = _modules_after("import fmodel")
    assert not any(loaded.values()), [m for m, present in loaded.items() if present]


def test_cli_parser_and_logging_setup_import_no_hub_for_local_or_default_model(tmp_path):
    code = (
        "from fmodel import cli\n"
        f"args = cli.build_parser().parse_args(['inspect', {str(tmp_path)!r}])\n"
        "assert not cli._may_use_hub(args)\n"
        "args = cli.build_parser().parse_args(['generate', '--prompt', 'x'])\n"
        "assert not cli._may_use_hub(args)\n"
        "handler, previous = cli._configure_logging(0, False, hub=cli._may_use_hub(args))\n"
    )
    loaded = _modules_after(code)
    assert not any(loaded.values()), [m for m, present in loaded.items() if present]


def test_a_hub_id_still_sets_up_hub_logging():
    code = (
        "import logging\n"
        "from fmodel import cli\n"
        "args = cli.build_parser().parse_args(['inspect', 'no-such-owner/no-such-repo'])\n"
        "assert cli._may_use_hub(args)\n"
        "cli._configure_logging(0, False, hub=True)\n"
        "assert logging.getLogger('huggingface_hub').level == logging.ERROR\n"
    )
    assert _modules_after(code)["huggingface_hub"]


def test_lazy_public_names_still_resolve():
    import fmodel
    from fmodel import AutoModelForCausalLM, PreTrainedModel
    from fmodel.facade import AutoModel

    assert fmodel.AutoModel is AutoModel
    assert AutoModelForCausalLM.__module__.startswith("fmodel.facade.")
    assert PreTrainedModel is fmodel.facade.PreTrainedModel
    assert set(fmodel.__all__) <= set(dir(fmodel))
    assert all(getattr(fmodel, name) is not None for name in fmodel.__all__)


def test_every_public_name_resolves_in_a_fresh_process():
    """In-process tests see modules other tests imported; a fresh interpreter shows a name that
    only resolved as a side effect (fmodel.stats once did, through the eager facade)."""
    code = "import fmodel\nmissing = [n for n in fmodel.__all__ if getattr(fmodel, n, None) is None]\nprint(missing)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
