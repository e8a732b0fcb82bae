"""Checkpoint I/O: sharded round trips, ties written once, memory mapping, dtype casts,
interchange with Transformers, atomic saves, and a named error for every bad checkpoint."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fmodel
from fmodel.models import ARCHITECTURES

from .conftest import make_hf_model, padded_batch, requires_transformers, transformers
from .families import tiny_config

save_module = importlib.import_module("fmodel.io.save")

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def random_state(*, tie: bool = False, seed: int = 0, **overrides) -> fmodel.ModelState:
    """A tiny Llama state with seeded random weights, built without Transformers."""
    config = fmodel.LlamaConfig(**{**TINY, "tie_word_embeddings": tie, **overrides})
    state, _ = fmodel.io.state_from_tensors(config, {}, allow_missing=True, seed=seed)
    return state


def assert_same_params(a: fmodel.ModelState, b: fmodel.ModelState) -> None:
    assert sorted(a.params) == sorted(b.params)
    for name in a.params:
        assert a.params[name].dtype == b.params[name].dtype, name
        assert torch.equal(a.params[name], b.params[name]), name


def stored_names(folder: Path) -> dict[str, set[str]]:
    """{weight file name: tensor names it holds}."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out[path.name] = set(f.keys())
    return out


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def saved(tmp_path) -> tuple[Path, fmodel.ModelState]:
    """A good single-file fmodel checkpoint (untied) and the state it was saved from."""
    state = random_state()
    folder = tmp_path / "ckpt"
    fmodel.save(state, folder)
    return folder, state


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_round_trip(tmp_path, tie):
    state = random_state(tie=tie)
    folder = tmp_path / "sharded"
    assert fmodel.save(state, folder, max_shard_size="60KB") == str(folder)

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = stored_names(folder)
    assert len(shards) >= 4, sorted(shards)
    assert not (folder / "model.safetensors").exists()
    assert all(name.startswith("model-") and "-of-" in name for name in shards)
    assert set(index["weight_map"].values()) == set(shards)
    for name, holder in index["weight_map"].items():
        assert name in shards[holder]
    stored = [name for names in shards.values() for name in names]
    assert len(stored) == len(set(stored)), "a tensor was written to two shards"
    expected = set(state.unique_params())
    assert set(stored) == expected and set(index["weight_map"]) == expected
    assert (HEAD in stored) is not tie  # a tied tensor is written once, under its source name
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.unique_params().values())
    for holder in shards:
        assert (folder / holder).stat().st_size <= 60_000 + 30_000  # one tensor may overflow a shard

    loaded, report = fmodel.load_with_report(folder)
    assert_same_params(loaded, state)
    assert loaded.architecture == "LlamaForCausalLM"
    assert loaded.config == fmodel.load_config(folder)
    written = {
        k: v for k, v in loaded.config.to_diff_dict().items() if k not in ("architectures", "torch_dtype")
    }
    assert written == state.config.to_diff_dict()
    assert report.missing == () and report.unexpected == () and report.mismatched == ()
    if tie:
        assert dict(loaded.ties) == {HEAD: EMBED}
        assert loaded.params[HEAD] is loaded.params[EMBED]
    else:
        assert dict(loaded.ties) == {}
        assert loaded.params[HEAD].data_ptr() != loaded.params[EMBED].data_ptr()


def test_saved_config_names_architecture_and_dtype(saved):
    folder, _ = saved
    on_disk = json.loads((folder / "config.json").read_text())
    assert on_disk["architectures"] == ["LlamaForCausalLM"]
    assert on_disk["torch_dtype"] == "float32"
    assert on_disk["model_type"] == "llama"
    assert {k: on_disk[k] for k in TINY} == TINY


def test_loaded_tensors_are_memory_mapped_copy_on_write(saved):
    folder, _ = saved
    path = folder / "model.safetensors"
    digest = hashlib.sha256(path.read_bytes()).digest()
    loaded = fmodel.load(folder)
    norm = loaded.params["model.norm.weight"]
    original = norm.clone()
    with torch.no_grad():
        norm.add_(1.0)  # our own throwaway state: writing into it must never reach the file
    assert torch.equal(norm, original + 1.0)
    assert hashlib.sha256(path.read_bytes()).digest() == digest
    assert torch.equal(fmodel.load(folder).params["model.norm.weight"], original)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_load_does_not_read_the_weights_into_memory(tmp_path):
    # A ~51 MB checkpoint (a large tied embedding) whose bytes must not be paged in by a load.
    folder = tmp_path / "big"
    fmodel.save(random_state(tie=True, vocab_size=200_000), folder)
    size = (folder / "model.safetensors").stat().st_size
    assert size > 50_000_000

    before = _rss_bytes()
    state = fmodel.load(folder)
    after_load = _rss_bytes()
    assert after_load - before < size // 5, f"load raised RSS by {(after_load - before) >> 20} MiB"

    # Control: touching every weight pages the file in, so the measurement above can fail.
    total = sum(float(t.sum()) for t in state.unique_params().values())
    assert total == total  # not NaN
    assert _rss_bytes() - before > size // 2


def test_dtype_casts_floating_tensors(saved):
    folder, state = saved
    for dtype in ("bfloat16", torch.bfloat16, "torch.bfloat16", "bf16"):
        loaded = fmodel.load(folder, dtype=dtype)
        assert loaded.dtype == torch.bfloat16
        for name, t in loaded.params.items():
            assert t.dtype == torch.bfloat16, name
            assert torch.equal(t, state.params[name].to(torch.bfloat16)), name
    fmodel.save(random_state(tie=True), folder.parent / "tied")
    tied = fmodel.load(folder.parent / "tied", dtype="float16")
    assert tied.params[HEAD] is tied.params[EMBED] and tied.params[HEAD].dtype == torch.float16


def test_unknown_dtype_names_the_dtype(saved):
    with pytest.raises(fmodel.ConfigError, match=r"dtype 'int7' is not understood"):
        fmodel.load(saved[0], dtype="int7")


# --------------------------------------------------------------------------- Transformers interchange


@requires_transformers
@pytest.mark.parametrize("tie", [False, True])
def test_transformers_checkpoint_through_fmodel_back_to_transformers(tmp_path, tie):
    hf = make_hf_model("llama", tie_word_embeddings=tie, num_key_value_heads=4 if tie else 2)
    hf.save_pretrained(tmp_path / "hf")
    state = fmodel.load(tmp_path / "hf")
    assert (dict(state.ties) == {HEAD: EMBED}) is tie
    assert (state.params[HEAD] is state.params[EMBED]) is tie
    for name, p in hf.state_dict().items():
        assert torch.equal(state.params[name], p), name

    fmodel.save(state, tmp_path / "fm", max_shard_size="60KB")
    assert (HEAD in {n for names in stored_names(tmp_path / "fm").values() for n in names}) is not tie
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fm").eval()
    assert (back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()) is tie
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(
            back(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits
        )


@requires_transformers
@pytest.mark.parametrize("tie", [False, True])
def test_fmodel_checkpoint_loads_in_transformers(tmp_path, tie):
    state = random_state(tie=tie, seed=3)
    fmodel.save(state, tmp_path / "fm")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fm").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tie
    for name, p in hf.state_dict().items():
        assert torch.equal(p, state.params[name]), name
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    got = fmodel.forward(state, ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- atomic save


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("where", ["weights", "config"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    import safetensors.torch

    good = random_state(seed=1)
    target = tmp_path / "ckpt"
    fmodel.save(good, target, max_shard_size="60KB")
    (target / "tokenizer.json").write_text('{"version": "1.0"}')
    before = folder_snapshot(target)

    if where == "weights":
        real = safetensors.torch.save_file

        def broken(tensors, filename, **kwargs):
            real(tensors, filename, **kwargs)  # a shard fully written, then the disk fills up
            raise OSError("No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", broken)
    else:
        real_dump = json.dump

        def broken_dump(obj, fp, **kwargs):
            if isinstance(obj, dict) and "model_type" in obj:
                fp.write('{"model_type": ')  # half a config.json
                raise OSError("No space left on device")
            return real_dump(obj, fp, **kwargs)

        monkeypatch.setattr(save_module.json, "dump", broken_dump)

    with pytest.raises(OSError, match="No space left on device"):
        fmodel.save(random_state(seed=2), target)
    monkeypatch.undo()

    assert folder_snapshot(target) == before
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_same_params(fmodel.load(target), good)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        fmodel.save(random_state(), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", ["fails", "unavailable"])
def test_failed_rename_into_place_restores_the_previous_checkpoint(tmp_path, monkeypatch, exchange):
    atomic = importlib.import_module("fmodel.io.atomic")
    good = random_state(seed=1)
    target = tmp_path / "ckpt"
    fmodel.save(good, target)
    before = folder_snapshot(target)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src) and os.fspath(dst) == str(target):
            raise OSError("rename failed")
        return real_rename(src, dst)

    def no_exchange(a, b):
        if exchange == "fails":
            raise OSError("rename failed")
        return False  # the fallback's two renames, the second of which fails

    monkeypatch.setattr(atomic, "exchange", no_exchange)
    monkeypatch.setattr(save_module.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        fmodel.save(random_state(seed=2), target)
    monkeypatch.undo()
    assert folder_snapshot(target) == before
    assert _leftovers(tmp_path) == []
    assert_same_params(fmodel.load(target), good)


def test_resave_keeps_other_files_and_replaces_old_weights(tmp_path):
    target = tmp_path / "ckpt"
    fmodel.save(random_state(seed=1), target, max_shard_size="60KB")
    (target / "tokenizer.json").write_text('{"version": "1.0"}')
    (target / "generation_config.json").write_text('{"max_new_tokens": 5}')  # stale: replaced
    (target / "extras").mkdir()
    (target / "extras" / "notes.txt").write_text("keep me")

    second = random_state(seed=2)
    fmodel.save(second, target)  # unsharded now: the old shards and index must go
    assert (target / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert json.loads((target / "generation_config.json").read_text()) == {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert (target / "extras" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in target.glob("model*")) == ["model.safetensors"]
    assert_same_params(fmodel.load(target), second)

    third = random_state(seed=3)
    fmodel.save(third, target, max_shard_size="60KB")  # sharded again: the single file must go
    assert not (target / "model.safetensors").exists()
    assert (target / "model.safetensors.index.json").exists()
    assert (target / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert_same_params(fmodel.load(target), third)
    assert _leftovers(tmp_path) == []


def test_save_does_not_touch_the_state(tmp_path):
    state = random_state(tie=True)
    record = {n: (t._version, t.data_ptr(), t.clone()) for n, t in state.params.items()}
    fmodel.save(state, tmp_path / "a", max_shard_size="60KB")
    for name, t in state.params.items():
        version, ptr, values = record[name]
        assert (t._version, t.data_ptr()) == (version, ptr), name
        assert torch.equal(t, values), name


# --------------------------------------------------------------------------- bad checkpoints


def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config(saved):
    folder, _ = saved
    (folder / "config.json").unlink()
    with pytest.raises(fmodel.CheckpointError, match=r"ckpt: no config.json in this folder"):
        fmodel.load(folder)


def test_missing_weights(saved):
    folder, _ = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(fmodel.CheckpointError, match=r"ckpt: no weights found; expected model.safetensors"):
        fmodel.load(folder)


def test_path_is_a_file_or_absent(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(fmodel.CheckpointError, match=r"config.json: expected a checkpoint folder"):
        fmodel.load(folder / "config.json")
    with pytest.raises(fmodel.CheckpointError, match=r"nowhere: no such folder"):
        fmodel.load(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(saved, damage):
    folder, _ = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x00not safetensors" * 64, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(fmodel.CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        fmodel.load(folder)


def test_index_listing_a_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    fmodel.save(random_state(), folder, max_shard_size="60KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        fmodel.CheckpointError,
        match=rf"model.safetensors.index.json: lists shard files that do not exist: .*{shard.name}",
    ):
        fmodel.load(folder)


def test_index_listing_a_tensor_no_shard_holds(tmp_path):
    folder = tmp_path / "sharded"
    fmodel.save(random_state(), folder, max_shard_size="60KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        fmodel.CheckpointError,
        match=r"lists tensors that no shard holds: \['model.layers.9.mlp.up_proj.weight'\]",
    ):
        fmodel.load(folder)


def test_unreadable_index(tmp_path):
    folder = tmp_path / "sharded"
    fmodel.save(random_state(), folder, max_shard_size="60KB")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(
        fmodel.CheckpointError, match=r"model.safetensors.index.json: not a valid shard index"
    ):
        fmodel.load(folder)


def test_tensor_in_two_shards(tmp_path):
    folder = tmp_path / "sharded"
    fmodel.save(random_state(), folder, max_shard_size="60KB")
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    a, b = load_file(first), load_file(second)
    name = next(iter(a))
    save_file({**b, name: a[name]}, second, metadata={"format": "pt"})
    with pytest.raises(fmodel.CheckpointError, match=rf"tensor '{name}' appears in two shards"):
        fmodel.load(folder)


def test_missing_tensor_is_named(saved):
    folder, _ = saved
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(fmodel.CheckpointError, match=r"missing: \['model.layers.1.mlp.down_proj.weight'\]"):
        fmodel.load(folder)


def test_allow_missing_initialises_deterministically(saved):
    folder, state = saved
    gone = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"]
    _rewrite_weights(folder, lambda t: [t.pop(n) for n in gone])
    a, report = fmodel.load_with_report(folder, allow_missing=True)
    b = fmodel.load(folder, allow_missing=True)
    assert report.missing == tuple(sorted(gone))
    assert_same_params(a, b)
    assert torch.equal(a.params[gone[1]], torch.ones(64))
    init = a.params[gone[0]]
    assert init.shape == (64, 112) and 0.01 < init.std().item() < 0.03  # initializer_range 0.02
    assert not torch.equal(init, state.params[gone[0]])
    for name in state.params:
        if name not in gone:
            assert torch.equal(a.params[name], state.params[name]), name


def test_unexpected_tensor(saved):
    folder, state = saved
    extra = "model.layers.0.self_attn.k_norm.weight"
    _rewrite_weights(folder, lambda t: t.update({extra: torch.ones(16)}))
    with pytest.raises(fmodel.CheckpointError, match=rf"has no place for: \['{extra}'\].*strict=False"):
        fmodel.load(folder)
    loaded, report = fmodel.load_with_report(folder, strict=False)
    assert report.unexpected == (extra,)
    assert extra not in loaded.params and extra not in loaded.buffers
    assert_same_params(loaded, state)


def test_old_rotary_buffers_are_ignored(saved):
    folder, state = saved
    old = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite_weights(folder, lambda t: t.update({old: torch.ones(8)}))
    loaded, report = fmodel.load_with_report(folder)
    assert old in report.unused and report.unexpected == ()
    assert_same_params(loaded, state)


def test_wrong_shape(saved):
    folder, _ = saved
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_weights(folder, lambda t: t.update({name: torch.zeros(64, 32)}))
    with pytest.raises(
        fmodel.ShapeMismatchError,
        match=rf"{name}: found \[64, 32\] in .*model.safetensors, expected \[64, 64\]",
    ):
        fmodel.load(folder)


def test_config_that_disagrees_with_the_weights(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(
        fmodel.ShapeMismatchError, match=r"mlp.up_proj.weight: found \[112, 64\].*expected \[100, 64\]"
    ):
        fmodel.load(folder)


def test_bad_config_names_the_file(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(fmodel.ConfigError, match=r"config.json: .*'num_key_value_heads' \(3\) must divide"):
        fmodel.load(folder)


def test_unknown_model_type(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "rwkv9"}))
    with pytest.raises(
        fmodel.UnknownArchitectureError, match=r"config.json: model_type 'rwkv9' is not implemented"
    ):
        fmodel.load(folder)


def test_unknown_architecture(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForTimeTravel"]}))
    with pytest.raises(fmodel.UnknownArchitectureError, match=r"'LlamaForTimeTravel' is not implemented"):
        fmodel.load(folder)
    # an explicit architecture overrides config.json
    assert fmodel.load(folder, architecture="LlamaForCausalLM").architecture == "LlamaForCausalLM"
    with pytest.raises(fmodel.UnknownArchitectureError, match=r"'GPTForEverything' is not implemented"):
        fmodel.load(folder, architecture="GPTForEverything")


def test_architecture_of_another_family(saved):
    with pytest.raises(
        fmodel.ConfigError, match=r"'MistralForCausalLM' is for model_type 'mistral'.*'llama'"
    ):
        fmodel.load(saved[0], architecture="MistralForCausalLM")


# --------------------------------------------------------------------------- pickle checkpoints


def _as_pickle(folder: Path, tensors: dict) -> None:
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")


def test_pickle_state_dict_loads(saved):
    folder, state = saved
    _as_pickle(folder, dict(state.unique_params()))
    assert_same_params(fmodel.load(folder), state)


def test_sharded_pickle_loads(saved):
    folder, state = saved
    (folder / "model.safetensors").unlink()
    params = state.unique_params()
    names = sorted(params)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({n: params[n] for n in part}, folder / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_params(fmodel.load(folder), state)


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_that_would_run_code_is_refused(saved, tmp_path):
    folder, state = saved
    sentinel = tmp_path / "pwned"
    _as_pickle(folder, {**state.unique_params(), "evil": _RunsCode(str(sentinel))})
    with pytest.raises(fmodel.CheckpointError, match=r"pytorch_model.bin: refused to unpickle.*weights_only"):
        fmodel.load(folder)
    assert not sentinel.exists()
    # Control: an unrestricted unpickler would have run the command.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert sentinel.exists()


def test_pickle_holding_non_tensors_is_refused(saved):
    folder, state = saved
    _as_pickle(folder, {**state.unique_params(), "step": 1000})
    with pytest.raises(fmodel.CheckpointError, match=r"pytorch_model.bin: expected a dict of tensors"):
        fmodel.load(folder)


def test_corrupt_pickle(saved):
    folder, _ = saved
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 neither a zip archive nor a pickle")
    with pytest.raises(fmodel.CheckpointError, match=r"pytorch_model.bin: "):
        fmodel.load(folder)


# --------------------------------------------------------------------------- base model <-> head


@requires_transformers
def test_causal_checkpoint_loads_as_base_model(tiny_llama_dir):
    path, hf = tiny_llama_dir
    base, report = fmodel.load_with_report(path, architecture="LlamaModel")
    causal = fmodel.load(path)
    assert base.architecture == "LlamaModel"
    assert "embed_tokens.weight" in base.params and HEAD not in base.params
    assert not any(n.startswith("model.") for n in base.params)
    assert sorted(base.params) == sorted(n.removeprefix("model.") for n in causal.params if n != HEAD)
    assert report.unused == (HEAD,)
    assert ("model.norm.weight", "norm.weight") in report.renamed
    for name, t in base.params.items():
        assert t is causal.params["model." + name] or torch.equal(t, causal.params["model." + name])

    ids, mask = padded_batch()
    out = fmodel.forward(base, ids, attention_mask=mask)
    assert out.logits is None
    assert torch.equal(
        out.last_hidden_state, fmodel.forward(causal, ids, attention_mask=mask).last_hidden_state
    )
    with torch.no_grad():
        expected = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (out.last_hidden_state[keep] - expected[keep]).abs().max().item() <= 1e-4


@requires_transformers
def test_base_checkpoint_loads_as_causal_lm_with_tied_head(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
    transformers.LlamaModel(config).eval().save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["architectures"] == ["LlamaModel"]

    state = fmodel.load(tmp_path / "base", architecture="LlamaForCausalLM")
    assert state.architecture == "LlamaForCausalLM"
    assert state.params[HEAD] is state.params[EMBED]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    got = fmodel.forward(state, ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max().item() <= 1e-4


def test_untied_base_checkpoint_as_causal_lm_names_the_missing_head(tmp_path):
    base = random_state(tie=False)
    fmodel.save(base, tmp_path / "causal")
    base_state = fmodel.load(tmp_path / "causal", architecture="LlamaModel")
    fmodel.save(base_state, tmp_path / "base")
    assert "norm.weight" in stored_names(tmp_path / "base")["model.safetensors"]
    with pytest.raises(fmodel.CheckpointError, match=r"missing: \['lm_head.weight'\]"):
        fmodel.load(tmp_path / "base", architecture="LlamaForCausalLM")
    roundtrip = fmodel.load(tmp_path / "base", architecture="LlamaForCausalLM", allow_missing=True)
    for name, t in base.params.items():
        if name != HEAD:
            assert torch.equal(roundtrip.params[name], t), name


def test_save_into_the_folder_the_state_was_loaded_from(saved):
    folder, state = saved
    (folder / "tokenizer.json").write_text("{}")
    loaded = fmodel.load(folder)  # memory-mapped from the very files about to be replaced
    fmodel.save(loaded, folder)
    assert_same_params(loaded, state)  # the mapped tensors still read the old data
    assert_same_params(fmodel.load(folder), state)
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert _leftovers(folder.parent) == []


def test_save_over_a_regular_file_is_refused(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("not a checkpoint folder")
    with pytest.raises(fmodel.CheckpointError, match=r"model.bin: exists and is not a folder"):
        fmodel.save(random_state(), target)
    assert target.read_text() == "not a checkpoint folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_tied_source_stored_only_under_its_alias(saved, tmp_path):
    # Some exporters write the shared matrix as lm_head.weight only.
    state = random_state(tie=True)
    folder = tmp_path / "alias-only"
    fmodel.save(state, folder)
    _rewrite_weights(folder, lambda t: t.update({HEAD: t.pop(EMBED)}))
    assert HEAD in stored_names(folder)["model.safetensors"]
    loaded, report = fmodel.load_with_report(folder)
    assert loaded.params[HEAD] is loaded.params[EMBED]
    assert torch.equal(loaded.params[EMBED], state.params[EMBED])
    assert (HEAD, EMBED) in report.renamed


# --------------------------------------------------------------------------- a Transformers 5 checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
TF5_CHECKPOINT = FIXTURES / "tiny-llama-tf5-checkpoint"  # written by tests/fixtures/make_tf5_checkpoint.py


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_transformers5_checkpoint_gives_transformers5_logits(attn):
    expected = load_file(FIXTURES / "tiny-llama-tf5-expected.safetensors")
    state = fmodel.load(TF5_CHECKPOINT, attn_implementation=attn)
    assert state.config.rope_type == "llama3" and state.config.rope_theta == 500000.0
    assert state.params[HEAD] is state.params[EMBED]
    ids, mask = expected["input_ids"], expected["attention_mask"]
    logits = fmodel.forward(state, ids, attention_mask=mask).logits
    keep = mask.bool()
    for reference in ("logits_eager", "logits_sdpa"):
        assert (logits[keep] - expected[reference][keep]).abs().max().item() <= 1e-4, reference


def test_transformers5_checkpoint_resaves_in_its_own_spelling(tmp_path):
    import shutil

    folder = tmp_path / "tf5"
    shutil.copytree(TF5_CHECKPOINT, folder)
    original = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in original and "dtype" in original and "torch_dtype" not in original
    state = fmodel.load(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    fmodel.save(state, folder, generation_config=generation)  # None would write the derived one
    params = dict(original["rope_parameters"])
    compat = {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}  # for Transformers 4 readers
    assert json.loads((folder / "config.json").read_text()) == {**original, **compat}
    assert (folder / "generation_config.json").read_bytes() == (
        TF5_CHECKPOINT / "generation_config.json"
    ).read_bytes()
    assert stored_names(folder)["model.safetensors"] == stored_names(TF5_CHECKPOINT)["model.safetensors"]
    assert_same_params(fmodel.load(folder), fmodel.load(TF5_CHECKPOINT))


@requires_transformers
def test_transformers5_checkpoint_resaved_by_fmodel_means_the_same_to_transformers4(tmp_path):
    import transformers

    fmodel.save(fmodel.load(TF5_CHECKPOINT), tmp_path / "resaved")
    expected = load_file(FIXTURES / "tiny-llama-tf5-expected.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "resaved", attn_implementation="eager"
    )
    ids, mask = expected["input_ids"], expected["attention_mask"]
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (logits[keep] - expected["logits_eager"][keep]).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- round-trip property


@st.composite
def states(draw) -> fmodel.ModelState:
    model_type = draw(st.sampled_from(["llama", "qwen2", "mistral"]))
    kv = draw(st.sampled_from([1, 2, 4]))
    fields = {**TINY, "num_key_value_heads": kv, "tie_word_embeddings": draw(st.booleans())}
    if draw(st.booleans()):
        fields["head_dim"] = draw(st.sampled_from([8, 24]))
    if model_type == "llama":
        fields["attention_bias"] = draw(st.booleans())
        fields["mlp_bias"] = draw(st.booleans())
    config = {"llama": fmodel.LlamaConfig, "qwen2": fmodel.Qwen2Config, "mistral": fmodel.MistralConfig}[
        model_type
    ](**fields)
    head = draw(st.booleans())
    architecture = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type] + (
        "ForCausalLM" if head else "Model"
    )
    dtype = draw(st.sampled_from([None, "bfloat16", "float16"]))
    state, _ = fmodel.io.state_from_tensors(
        config, {}, architecture=architecture, allow_missing=True, dtype=dtype, seed=draw(st.integers(0, 99))
    )
    return state


@settings(max_examples=12, deadline=None)
@given(states(), st.sampled_from(["5GB", "40KB", 30_000]))
def test_save_load_round_trip_property(tmp_path_factory, state, max_shard_size):
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    fmodel.save(state, first, max_shard_size=max_shard_size)
    loaded = fmodel.load(first)
    assert loaded.architecture == state.architecture
    assert_same_params(loaded, state)
    assert dict(loaded.ties) == dict(state.ties)
    for alias, source in loaded.ties.items():
        assert loaded.params[alias] is loaded.params[source]
    written = {
        k: v for k, v in loaded.config.to_diff_dict().items() if k not in ("architectures", "torch_dtype")
    }
    assert written == state.config.to_diff_dict()
    # Saving what was loaded writes the very same bytes: saves are deterministic.
    fmodel.save(loaded, second, max_shard_size=max_shard_size)
    assert folder_snapshot(second) == folder_snapshot(first)


def _family_cases() -> list[tuple[str, bool]]:
    """(architecture, tied) for every registered class: tied and untied where it has an
    output projection."""
    cases = []
    for architecture, spec in sorted(ARCHITECTURES.items()):
        cases += (
            [(architecture, True), (architecture, False)]
            if spec.output_embeddings
            else [(architecture, False)]
        )
    return cases


@pytest.mark.parametrize(("architecture", "tied"), _family_cases())
def test_every_family_saves_and_loads_back(tmp_path, architecture, tied):
    model_type = ARCHITECTURES[architecture].model_type
    config = tiny_config(model_type, tie_word_embeddings=tied)
    state = fmodel.init(config, architecture=architecture, seed=1)
    fmodel.save(state, tmp_path / "first")
    loaded = fmodel.load(tmp_path / "first")
    assert loaded.architecture == architecture
    assert_same_params(loaded, state)
    assert dict(loaded.ties) == dict(state.ties)
    written = loaded.config.to_diff_dict()
    assert {k: v for k, v in written.items() if k not in ("architectures", "torch_dtype")} == (
        state.config.to_diff_dict()
    )
    fmodel.save(loaded, tmp_path / "second")
    assert folder_snapshot(tmp_path / "second") == folder_snapshot(tmp_path / "first")


@requires_transformers
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_family_save_loads_in_transformers_with_the_same_tensors(tmp_path, architecture):
    spec = ARCHITECTURES[architecture]
    config = tiny_config(spec.model_type, tie_word_embeddings=spec.output_embeddings is not None)
    state = fmodel.init(config, architecture=architecture, seed=2)
    fmodel.save(state, tmp_path)
    model, info = getattr(transformers, architecture).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    theirs = model.state_dict()
    for name, tensor in state.params.items():
        assert torch.equal(theirs[name], tensor), name


def test_saved_folder_has_a_normal_mode_not_mkdtemp_private(tmp_path):
    import os
    import stat

    config = fmodel.LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=20
    )
    old = os.umask(0o022)
    try:
        fmodel.save(fmodel.init(config), tmp_path / "new")
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o755
        os.chmod(tmp_path / "new", 0o750)
        fmodel.save(fmodel.init(config), tmp_path / "new")  # overwriting keeps the folder's mode
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o750
    finally:
        os.umask(old)
