"""TensorFlow (tf_model.h5) and Flax (flax_model.msgpack) checkpoints load exactly, without
TensorFlow or JAX.

The fixtures under tests/fixtures/legacy/ were written once by Transformers 4.57's TF and Flax
classes (tests/fixtures/legacy/make_fixtures.py, in a separate venv with tensorflow-cpu 2.21 and
flax 0.12.8) from tiny random PyTorch models; `expected.safetensors` beside each holds the
PyTorch model's outputs on fixed ids. Nothing here imports TensorFlow, Keras, JAX or Flax.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fmodel
import fmodel.facade as facade
from fmodel.cli import main
from fmodel.errors import CheckpointError, MissingDependencyError
from fmodel.io.legacy import read_legacy_files

from .conftest import requires_transformers, transformers

pytest.importorskip("h5py")
pytest.importorskip("msgpack")

ROOT = Path(__file__).parent / "fixtures" / "legacy"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())["fixtures"]
NAMES = sorted(MANIFEST)
OUTPUT_KEYS = ("logits", "last_hidden_state", "pooler_output")
ATOL = 1e-5


def folder_of(name: str) -> Path:
    return ROOT / name


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder_of(name) / "expected.safetensors"))


def weight_files(name: str) -> list[str]:
    folder = folder_of(name)
    return sorted(str(p) for p in folder.iterdir() if p.suffix in (".h5", ".msgpack"))


def max_diff(out, want: dict[str, torch.Tensor]) -> float:
    diffs = [float((getattr(out, k) - v).abs().max()) for k, v in want.items() if k in OUTPUT_KEYS]
    assert diffs, "the fixture stores no outputs"
    return max(diffs)


def run_state(state, want):
    with torch.no_grad():
        return fmodel.forward(state, want["input_ids"], attention_mask=want["attention_mask"])


def run_model(model, want):
    with torch.no_grad():
        return model.eval()(input_ids=want["input_ids"], attention_mask=want["attention_mask"])


def test_fixture_set_covers_every_family_format_and_sharding():
    seen = {(name.split("/")[0], name.split("/")[1].split("-")[0]) for name in NAMES}
    assert seen == {
        ("tf", "bert"), ("tf", "gpt2"), ("tf", "mistral"),
        ("flax", "bert"), ("flax", "gpt2"), ("flax", "llama"), ("flax", "mistral"),
    }  # fmt: skip
    assert {MANIFEST[n]["format"] for n in NAMES if MANIFEST[n]["sharded"]} == {"tf", "flax"}
    for name in NAMES:  # Transformers' own converters gave the PyTorch outputs on the whole files
        diff = MANIFEST[name]["converter_max_abs_diff"]
        assert (diff is None and MANIFEST[name]["sharded"]) or diff == 0.0, name


@pytest.mark.parametrize("name", NAMES)
def test_load_equals_the_pytorch_model(name):
    want = expected(name)
    state, report = fmodel.load_with_report(folder_of(name), attn_implementation="eager")
    assert state.architecture == MANIFEST[name]["architecture"]
    assert not report.missing and not report.unexpected and not report.mismatched
    assert max_diff(run_state(state, want), want) <= ATOL


@pytest.mark.parametrize("name", NAMES)
def test_facade_from_pretrained(name):
    want = expected(name)
    flag = {"from_tf": True} if name.startswith("tf/") else {"from_flax": True}
    cls = getattr(facade, MANIFEST[name]["architecture"])
    model = cls.from_pretrained(folder_of(name), attn_implementation="eager", **flag)
    assert max_diff(run_model(model, want), want) <= ATOL
    auto = facade.AutoModel.from_pretrained(folder_of(name), **flag)  # the base model, prefix dropped
    assert type(auto).__name__.endswith("Model")


@pytest.mark.parametrize(
    "name", ["tf/bert-mlm", "tf/gpt2-lm-sharded", "flax/mistral-lm", "flax/bert-cls-sharded"]
)
def test_load_from_tf_and_flax_classmethods(name):
    """Transformers' signatures: `_load_from_tf(model, config, files) -> (model, info)`,
    `_load_from_flax(model, files) -> model`, into a freshly initialised model."""
    want = expected(name)
    cls = getattr(facade, MANIFEST[name]["architecture"])
    config = fmodel.load_config(str(folder_of(name) / "config.json"))
    model = cls(config)
    if name.startswith("tf/"):
        model, info = cls._load_from_tf(model, config, weight_files(name))
        assert info == {"missing_keys": [], "unexpected_keys": []}
    else:
        model = cls._load_from_flax(model, weight_files(name))
    model.set_attn_implementation("eager")
    assert max_diff(run_model(model, want), want) <= ATOL


@requires_transformers
@pytest.mark.parametrize("name", NAMES)
def test_save_then_transformers_reload(name, tmp_path):
    want = expected(name)
    fmodel.save(fmodel.load(folder_of(name)), tmp_path / "out")
    cls = getattr(transformers, MANIFEST[name]["architecture"])
    model = cls.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert max_diff(run_model(model, want), want) <= ATOL


@pytest.mark.parametrize("name", ["tf/bert-mlm", "tf/bert-mlm-sharded", "flax/llama-lm-sharded"])
def test_convert_command(name, tmp_path, capsys):
    want = expected(name)
    assert main(["convert", str(folder_of(name)), str(tmp_path / "out")]) == 0
    assert "safetensors file(s)" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("*.h5")) and not list((tmp_path / "out").glob("*.msgpack"))
    state = fmodel.load(tmp_path / "out", attn_implementation="eager")
    assert max_diff(run_state(state, want), want) <= ATOL


def test_safetensors_stays_preferred(tmp_path):
    """A folder with both formats loads its safetensors (here deliberately different weights)."""
    folder = tmp_path / "both"
    shutil.copytree(folder_of("tf/gpt2-lm"), folder)
    state = fmodel.load(folder)
    changed = fmodel.transforms.init(state.config, architecture=state.architecture, seed=3)
    fmodel.save(changed, tmp_path / "pt")
    shutil.copy(tmp_path / "pt" / "model.safetensors", folder / "model.safetensors")
    loaded = fmodel.load(folder)
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(loaded.params[name], changed.params[name])
    assert not torch.equal(loaded.params[name], state.params[name])
    facade.GPT2LMHeadModel.from_pretrained(folder, from_tf=True)  # TF file present: accepted


def test_from_tf_on_a_folder_without_tf_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"from_tf=True but the folder has no tf_model.h5"):
        facade.BertModel.from_pretrained(folder_of("flax/bert-base"), from_tf=True)
    with pytest.raises(CheckpointError, match=r"from_flax=True but the folder has no flax_model.msgpack"):
        facade.BertModel.from_pretrained(folder_of("tf/bert-base"), from_flax=True)
    folder = tmp_path / "tf1"
    folder.mkdir()
    shutil.copy(folder_of("tf/bert-base") / "config.json", folder)
    (folder / "model.ckpt.index").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="TensorFlow 1 checkpoint"):
        facade.BertModel.from_pretrained(folder, from_tf=True)
    with pytest.raises(CheckpointError, match="TensorFlow 1 checkpoint"):
        read_legacy_files([folder / "model.ckpt.index"], "tf")


def test_no_weights_message_names_the_legacy_files(tmp_path):
    shutil.copy(folder_of("tf/bert-base") / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"tf_model.h5.*flax_model.msgpack"):
        fmodel.load(tmp_path)


@pytest.mark.parametrize(("name", "package"), [("tf/bert-base", "h5py"), ("flax/bert-base", "msgpack")])
def test_missing_reader_names_the_extra(name, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'fmodel\[legacy\]'") as info:
        fmodel.load(folder_of(name))
    assert isinstance(info.value, ImportError) and package in str(info.value)


def test_tf_bert_mlm_stores_the_embeddings_twice_and_they_load_once():
    import h5py

    with h5py.File(folder_of("tf/bert-mlm") / "tf_model.h5") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["mlm___cls"].attrs["weight_names"]]
    assert any(n.endswith("bert/embeddings/word_embeddings/weight:0") for n in names)
    tensors = read_legacy_files(weight_files("tf/bert-mlm"), "tf")
    assert "bert.embeddings.word_embeddings.weight" in tensors
    assert "cls.predictions.decoder.weight" not in tensors  # tied: absent from the file
    assert tensors["bert.encoder.layer.1.attention.self.query.weight"].shape == (8, 8)


def test_gpt2_tf_conv1d_is_not_transposed_and_biases_are_flat():
    tensors = read_legacy_files(weight_files("tf/gpt2-lm"), "tf")
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)  # Conv1D: (in, out) as PyTorch
    assert tensors["transformer.h.0.attn.c_attn.bias"].shape == (24,)  # stored (1, 24)
    flax = read_legacy_files(weight_files("flax/gpt2-lm"), "flax")
    assert flax["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)  # Flax stores (out, in): transposed


@pytest.mark.parametrize("name", ["tf/gpt2-lm-sharded", "flax/llama-lm-sharded"])
def test_hub_id_from_the_cache(name, tmp_path, monkeypatch):
    from .test_hub_cache import cache_repo

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    want = expected(name)
    snapshot = cache_repo(tmp_path / "cache", "org/legacy", folder_of(name), "a" * 40)
    files = fmodel.io.resolve_checkpoint("org/legacy", cache_dir=tmp_path / "cache", local_files_only=True)
    assert files.format == name.split("/")[0] and files.index is not None
    assert sorted(files.weights) == sorted(str(snapshot / Path(p).name) for p in weight_files(name))
    flag = {"from_tf": True} if name.startswith("tf/") else {"from_flax": True}
    cls = getattr(facade, MANIFEST[name]["architecture"])
    model = cls.from_pretrained(
        "org/legacy", cache_dir=tmp_path / "cache", local_files_only=True, attn_implementation="eager", **flag
    )
    assert max_diff(run_model(model, want), want) <= ATOL


def test_dtype_cast_and_the_load_report():
    state, report = fmodel.load_with_report(folder_of("tf/mistral-lm"), dtype="bfloat16")
    assert {t.dtype for t in state.params.values()} == {torch.bfloat16}
    assert not report.unexpected and not report.missing


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tf/bert-mlm", "tf"),
        ("tf/gpt2-lm-sharded", "tf"),
        ("flax/llama-lm-sharded", "flax"),
        ("tf/bert-mlm-safetensors", "tf-safetensors"),
        ("tf/gpt2-lm-safetensors-sharded", "tf-safetensors"),
        ("flax/gpt2-lm-safetensors", "flax-safetensors"),
    ],
)
def test_resolved_format(name, kind):
    """Safetensors written by TF / Flax `save_pretrained(safe_serialization=True)` keep TF /
    Flax names; their metadata (`format: tf / flax`) routes them to the same converters."""
    assert fmodel.io.resolve_checkpoint(folder_of(name)).format == kind
