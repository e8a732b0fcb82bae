"""The pure core behind `save_pretrained` / `push_to_hub`: weight formats and variants, state_dict
saves, generation_config.json as Transformers derives it, model card tags, auto-class names, and
pushes through huggingface_hub against an in-memory Hub (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fmodel
from fmodel.io.auto_class import AUTO_MODEL_CLASSES, auto_class_name
from fmodel.io.card import merge_tags, new_model_card, tag_model_card
from fmodel.io.generation_config import GENERATION_DEFAULTS, generation_config_from_model_config
from fmodel.io.push import default_commit_message, push_to_hub, save_and_push
from fmodel.io.save import tensors_to_save, weight_file_names

from . import fake_hub
from .conftest import requires_transformers, transformers

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def random_state(*, tie: bool = False, seed: int = 0, **overrides) -> fmodel.ModelState:
    config = fmodel.LlamaConfig(**{**TINY, "tie_word_embeddings": tie, **overrides})
    state, _ = fmodel.io.state_from_tensors(config, {}, allow_missing=True, seed=seed, warn_missing=False)
    return state


def assert_same_params(a: fmodel.ModelState, b: fmodel.ModelState) -> None:
    assert sorted(a.params) == sorted(b.params)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with fake_hub.installed(monkeypatch, tmp_path) as h:
        yield h


# --------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("variant", [None, "fp16"])
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_formats_and_variants_round_trip(tmp_path, safe, variant, shard):
    state = random_state(tie=True)
    folder = tmp_path / "ckpt"
    fmodel.save(state, folder, safe_serialization=safe, variant=variant, max_shard_size=shard or "5GB")
    ext = "safetensors" if safe else "bin"
    stem = "model" if safe else "pytorch_model"
    dot = f".{variant}" if variant else ""
    names = sorted(
        p.name for p in folder.iterdir() if p.name not in ("config.json", "generation_config.json")
    )
    if shard is None:
        assert names == [f"{stem}{dot}.{ext}"]
    else:
        index = f"{stem}.{ext}.index{dot}.json"
        assert index in names and len(names) > 2
        assert all(n == index or n.startswith(f"{stem}{dot}-0000") for n in names)
        metadata = json.loads((folder / index).read_text())["metadata"]
        assert metadata["total_parameters"] == sum(t.numel() for t in state.unique_params().values())
    assert_same_params(fmodel.load(folder, variant=variant), state)
    if variant:
        with pytest.raises(fmodel.CheckpointError, match="no weights found"):
            fmodel.load(folder)  # the plain names are not there


def test_variants_live_side_by_side_and_a_resave_replaces_only_its_own(tmp_path):
    folder = tmp_path / "ckpt"
    plain, half = random_state(seed=1), fmodel.to(random_state(seed=2), dtype=torch.float16)
    fmodel.save(plain, folder, max_shard_size="100KB")
    fmodel.save(half, folder, variant="fp16")
    fmodel.save(half, folder, variant="fp16", safe_serialization=False)  # replaces the fp16 safetensors
    assert_same_params(fmodel.load(folder), plain)
    assert_same_params(fmodel.load(folder, variant="fp16"), half)
    assert not (folder / "model.fp16.safetensors").exists() and (folder / "pytorch_model.fp16.bin").exists()
    fmodel.save(plain, folder)  # unsharded now: the plain shards go, the fp16 file stays
    assert sorted(p.name for p in folder.glob("*model*")) == ["model.safetensors", "pytorch_model.fp16.bin"]


def test_weight_file_names():
    plain, fp16 = weight_file_names(None), weight_file_names("fp16")
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "pytorch_model.bin.index.json"):
        assert plain(name) and not fp16(name)
    for name in (
        "model.fp16.safetensors",
        "pytorch_model.fp16-00002-of-00002.bin",
        "model.safetensors.index.fp16.json",
    ):
        assert fp16(name) and not plain(name)
    assert not plain("tokenizer.json") and not plain("README.md")


def test_save_function_writes_the_pickle_shards(tmp_path):
    state, calls = random_state(), []

    def save_function(obj, path):
        calls.append(Path(path).name)
        torch.save(obj, path)

    fmodel.save(
        state, tmp_path / "a", safe_serialization=False, save_function=save_function, max_shard_size="100KB"
    )
    assert calls == sorted(p.name for p in (tmp_path / "a").glob("pytorch_model-*.bin")) and len(calls) > 1
    fmodel.save(state, tmp_path / "b", save_function=save_function)  # unused for safetensors
    assert len(calls) == len(set(calls))
    assert_same_params(fmodel.load(tmp_path / "a"), state)


def test_given_tensors_are_saved_instead_of_the_state(tmp_path):
    state = random_state(tie=True)
    norm = "model.norm.weight"
    tensors = dict(state.tensors) | {norm: torch.full_like(state.params[norm], 3.0)}
    fmodel.save(state, tmp_path / "a", tensors=tensors)
    loaded = fmodel.load(tmp_path / "a")
    assert torch.equal(loaded.params[norm], tensors[norm])
    assert loaded.params["lm_head.weight"] is loaded.params["model.embed_tokens.weight"]
    # the alias given beside its source is stored once; an equal copy counts as the same tensor
    copy = dict(tensors) | {"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    assert "lm_head.weight" not in tensors_to_save(state, copy)
    different = dict(tensors) | {"lm_head.weight": torch.zeros_like(tensors["lm_head.weight"])}
    with pytest.raises(
        fmodel.CheckpointError, match=r"'lm_head\.weight' is tied to 'model\.embed_tokens\.weight'"
    ):
        fmodel.save(state, tmp_path / "b", tensors=different)
    assert not (tmp_path / "b").exists()
    subset = {norm: tensors[norm]}  # a subset is written as given
    fmodel.save(state, tmp_path / "c", tensors=subset)
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "c" / "model.safetensors")) == [norm]


# --------------------------------------------------------------------------- generation config


def test_generation_config_written_for_causal_lms_only_and_a_stale_one_replaced(tmp_path):
    fmodel.save(random_state(), tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "generation_config.json").read_text()) == {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (tmp_path / "lm" / "generation_config.json").write_text('{"max_new_tokens": 5}')
    fmodel.save(random_state(seed=3), tmp_path / "lm")  # as save_pretrained: rewritten, not kept stale
    assert json.loads((tmp_path / "lm" / "generation_config.json").read_text()) == {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    fmodel.save(random_state(), tmp_path / "lm", generation_config={"do_sample": True, "top_k": 3})
    assert (tmp_path / "lm" / "generation_config.json").read_text() == (
        '{\n  "do_sample": true,\n  "top_k": 3\n}\n'
    )
    base = fmodel.init(fmodel.LlamaConfig(**TINY), architecture="LlamaModel")
    fmodel.save(base, tmp_path / "base")
    assert not (tmp_path / "base" / "generation_config.json").exists()


@requires_transformers
def test_generation_defaults_are_transformers():
    defaults = transformers.GenerationConfig().to_dict()
    for key in ("transformers_version", "_from_model_config"):
        defaults.pop(key)
    assert dict(GENERATION_DEFAULTS) == defaults


@requires_transformers
@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.LlamaConfig(**TINY),
        lambda t: t.LlamaConfig(**TINY, pad_token_id=0, bos_token_id=5, eos_token_id=[6, 7]),
        lambda t: t.LlamaConfig(**TINY, use_cache=False, output_hidden_states=True, max_length=30),
        lambda t: t.LlamaConfig(**TINY, temperature=0.7, do_sample=True, top_k=None, bos_token_id=None),
        lambda t: t.Qwen2Config(**TINY),
        lambda t: t.MistralConfig(**TINY),
        lambda t: t.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4),
        lambda t: t.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    ],
)
def test_generation_config_is_what_transformers_derives(make):
    hf_config = make(transformers)
    expected = json.loads(transformers.GenerationConfig.from_model_config(hf_config).to_json_string())
    ours = generation_config_from_model_config(fmodel.config_from_dict(hf_config.to_dict()))
    assert ours == expected


def test_generation_config_of_an_fmodel_built_config_has_no_transformers_version():
    config = fmodel.LlamaConfig(**TINY, eos_token_id=(2, 3))
    assert generation_config_from_model_config(config) == {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
    }


# --------------------------------------------------------------------------- model cards


def test_merge_tags_keeps_order_and_drops_duplicates():
    assert merge_tags(None, "a") == ["a"]
    assert merge_tags(["a", "b"], ["b", "c", "c", "a"]) == ["a", "b", "c"]
    assert merge_tags(["x"], None) == ["x"]


def test_tag_model_card_changes_only_the_tags():
    from huggingface_hub import ModelCard

    text = "---\nlicense: mit\ntags:\n- a\ndatasets:\n- d\n---\n\n# Title\n\nBody *kept* as is.\n"
    assert tag_model_card(text, ["a"]) is text
    new = tag_model_card(text, ["b", "a"])
    card = ModelCard(new)
    assert card.data.tags == ["a", "b"] and card.data.license == "mit" and card.data.datasets == ["d"]
    assert new.endswith("---\n\n# Title\n\nBody *kept* as is.\n")
    plain = tag_model_card("# Just text\n", ["t"])
    assert ModelCard(plain).data.tags == ["t"] and plain.endswith("# Just text\n")
    broken = "---\nlicense: [mit\n---\nbody\n"
    for ignore in (False, True):
        with pytest.raises(ValueError, match=r"README\.md: its metadata block is not valid YAML"):
            tag_model_card(broken, ["t"], ignore_metadata_errors=ignore)
    bad_index = "---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\nbody\n"
    with pytest.raises(ValueError, match=r"README\.md: Invalid `model_index`.*ignore_metadata_errors=True"):
        tag_model_card(bad_index, ["t"])
    assert tag_model_card(bad_index, ["t"], ignore_metadata_errors=True) == "---\ntags:\n- t\n---\nbody\n"


def test_save_merges_tags_into_the_folder_readme(tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "ckpt"
    fmodel.save(random_state(), folder)
    assert not (folder / "README.md").exists()  # no tags, no card
    fmodel.save(random_state(), folder, tags=["x", "y"])
    card = ModelCard((folder / "README.md").read_text())
    assert card.data.tags == ["x", "y"] and card.data.library_name == "transformers"
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mine\n---\n\nMy notes.\n")
    fmodel.save(random_state(), folder, tags=["x"])
    text = (folder / "README.md").read_text()
    assert ModelCard(text).data.tags == ["mine", "x"] and ModelCard(text).data.license == "apache-2.0"
    assert text.endswith("My notes.\n")
    before = (folder / "README.md").stat()
    fmodel.save(random_state(), folder, tags=["mine"])  # nothing to add: the very same file is kept
    after = (folder / "README.md").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_new_model_card_metadata():
    from huggingface_hub import ModelCard

    card = ModelCard(new_model_card(["a", "a", "b"], title="org/name"))
    assert card.data.tags == ["a", "b"] and card.data.library_name == "transformers"
    assert "# org/name" in card.text


# --------------------------------------------------------------------------- auto classes


def test_auto_class_names():
    assert auto_class_name("AutoModelForCausalLM") == "AutoModelForCausalLM"
    assert auto_class_name(fmodel.facade.AutoModelForCausalLM) == "AutoModelForCausalLM"
    for bad in ("AutoTokenizer", "NotAnAutoClass", int):
        with pytest.raises(ValueError, match="is not a valid auto class"):
            auto_class_name(bad)


@requires_transformers
def test_auto_model_classes_are_transformers():
    import transformers.models.auto as auto

    assert set(AUTO_MODEL_CLASSES) == {n for n in dir(auto) if n.startswith("AutoModel")}
    assert auto_class_name(transformers.AutoModelForMaskedLM) == "AutoModelForMaskedLM"


# --------------------------------------------------------------------------- pushing


def test_default_commit_messages_are_transformers():
    assert default_commit_message("LlamaForCausalLM") == "Upload LlamaForCausalLM"
    assert default_commit_message("GPT2LMHeadModel") == "Upload model"
    assert default_commit_message("BertModel") == "Upload model"


def test_push_to_hub_commits_the_saved_checkpoint(hub, tmp_path):
    state = random_state()
    info = push_to_hub(
        state,
        "org/tiny",
        token="hf_secret",
        private=True,
        tags=["fmodel", "tiny"],
        commit_message="first",
        commit_description="why",
    )
    create = hub.requests[0]
    assert (create.method, create.path) == ("POST", "/api/repos/create")
    assert create.json() == {"name": "tiny", "organization": "org", "private": True}
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in hub.requests)
    [commit] = hub.commits
    assert (commit.repo_id, commit.revision, commit.create_pr) == ("org/tiny", "main", False)
    assert (commit.summary, commit.description) == ("first", "why")
    assert sorted(commit.files) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert json.loads(commit.files["config.json"])["architectures"] == ["LlamaForCausalLM"]
    from huggingface_hub import ModelCard

    assert ModelCard(commit.files["README.md"].decode()).data.tags == ["fmodel", "tiny"]
    (tmp_path / "got").mkdir()
    for name, data in commit.files.items():
        (tmp_path / "got" / name).write_bytes(data)
    assert_same_params(fmodel.load(tmp_path / "got"), state)
    assert info.oid and info.commit_url.endswith(info.oid) and info.pr_url is None


def test_push_to_hub_pr_to_a_branch_keeps_the_repo_card(hub):
    hub.repos["tester/tiny"] = fake_hub.Repo(
        private=None, files={"README.md": b"---\nlicense: mit\ntags:\n- old\n---\n\n# Remote card\n"}
    )
    info = push_to_hub(random_state(), "tiny", create_pr=True, revision="dev", tags=["new"])
    assert "POST /api/models/tester/tiny/branch/dev" in hub.paths()
    [commit] = hub.commits
    assert (commit.revision, commit.create_pr, commit.summary) == ("dev", True, "Upload LlamaForCausalLM")
    assert (
        commit.files["README.md"].decode() == "---\nlicense: mit\ntags:\n- old\n- new\n---\n\n# Remote card\n"
    )
    assert info.pr_url is not None
    assert hub.repos["tester/tiny"].files.keys() == {"README.md"}  # a PR leaves the branch alone


def test_push_to_hub_in_a_working_folder_uploads_what_changed(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = random_state()
    fmodel.save(state, tmp_path / "tiny")
    (tmp_path / "tiny" / "tokenizer.json").write_text("{}")
    push_to_hub(state, "org/tiny")  # the folder "tiny" exists: it is the working folder
    [commit] = hub.commits
    assert "tokenizer.json" not in commit.files and "model.safetensors" in commit.files
    assert (tmp_path / "tiny" / "README.md").exists()


def test_save_and_push_defaults_the_repo_to_the_folder_name(hub, tmp_path):
    folder = tmp_path / "my-model"
    save_and_push(random_state(), folder, token="t", variant="fp16", tags=["x"])
    [commit] = hub.commits
    assert commit.repo_id == "tester/my-model"
    assert sorted(commit.files) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.fp16.safetensors",
    ]
    assert sorted(p.name for p in folder.iterdir()) == sorted(commit.files)
