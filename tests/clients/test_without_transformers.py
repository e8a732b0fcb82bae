"""The facade without Transformers' interop (`FMODEL_NO_TRANSFORMERS=1`, as on a machine without
Transformers): plain `nn.Module`s with fmodel's own output classes and config view, the same
numbers. Run in a fresh process, since the interop choice is made once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch
    import fmodel
    folder = sys.argv[1]
    model = fmodel.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[4, 11, 9, 13, 8, 5]])
    out = model(ids, labels=ids)
    model.config.pad_token_id = 3
    model.config.rms_norm_eps = 0.5
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        again = fmodel.AutoModelForCausalLM.from_pretrained(tmp)
    json.dump({
        "module": type(out).__module__,
        "class": type(out).__name__,
        "bases": [c.__module__.split(".")[0] for c in type(model).__mro__],
        "keys": list(out.keys()),
        "loss": out.loss.item(),
        "has_to": hasattr(out, "to"),
        "config": type(model.config).__name__,
        "saved_eps": again.config.rms_norm_eps,
        "saved_pad": again.config.pad_token_id,
        "generated": model.generate(ids, max_new_tokens=3, do_sample=False).tolist(),
    }, sys.stdout)
    """
)


def run(folder: str, disable: bool) -> dict:
    env = {**os.environ, "FMODEL_NO_TRANSFORMERS": "1" if disable else "0"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, folder], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_facade_without_transformers_gives_the_same_numbers(checkpoint):
    folder = checkpoint("llama")
    alone, bridged = run(folder, disable=True), run(folder, disable=False)
    assert alone["module"] == "fmodel.facade.outputs" and "transformers" not in alone["bases"]
    assert bridged["module"] == "transformers.modeling_outputs" and "transformers" in bridged["bases"]
    for key in ("class", "keys", "loss", "has_to", "config", "saved_eps", "saved_pad", "generated"):
        assert alone[key] == bridged[key], key
    assert alone["class"] == "CausalLMOutputWithPast" and alone["keys"] == ["loss", "logits", "past_key_values"]
    assert alone["has_to"] is False and alone["saved_eps"] == 0.5 and alone["saved_pad"] == 3
