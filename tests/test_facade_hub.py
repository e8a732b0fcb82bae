"""The facade's saving and hub methods (`HubMixin`) against Transformers 4.57: the files
`save_pretrained` writes in every format, generation_config.json, `state_dict=`, model card
tags, auto-class registration, and `push_to_hub` against an in-memory Hub (no network)."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

import fmodel
import fmodel.facade as facade
from fmodel.facade.hub import HubMixin

from . import fake_hub
from .conftest import make_hf_model, requires_transformers, transformers

pytestmark = requires_transformers

_HUB_CLASSES: dict[type, type] = {}


def hub_class(cls: type) -> type:
    """`cls` with the hub methods. Until `PreTrainedModel` lists `HubMixin` among its bases this
    is a same-named subclass with the mixin first; once it does, `cls` itself is returned (and
    this helper can be dropped in favour of the facade classes)."""
    if issubclass(cls, HubMixin):
        return cls
    if cls not in _HUB_CLASSES:
        _HUB_CLASSES[cls] = type(cls.__name__, (HubMixin, cls), {"__module__": cls.__module__})
    return _HUB_CLASSES[cls]


def load(folder, auto=facade.AutoModelForCausalLM, **kwargs):
    """`auto.from_pretrained(folder)`, as a class with the hub methods."""
    model = auto.from_pretrained(folder, **kwargs)
    return model if isinstance(model, HubMixin) else hub_class(type(model)).from_state(model.state)


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def hf_logits(folder, **kwargs) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    with torch.no_grad():
        return model(IDS).logits


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with fake_hub.installed(monkeypatch, tmp_path) as h:
        yield h


@pytest.fixture
def base(tmp_path):
    """A tiny random Transformers Llama (untied) saved by Transformers, and the model."""
    model = make_hf_model("llama")
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base", model


# --------------------------------------------------------------------------- signatures


def _parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_are_transformers():
    theirs = _parameters(transformers.PreTrainedModel.save_pretrained)
    ours = _parameters(HubMixin.save_pretrained)
    # save_function defaults to torch.save in Transformers, to None (meaning torch.save) here
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    assert [d for n, d in ours if n != "save_function"] == [d for n, d in theirs if n != "save_function"]
    pushed = _parameters(transformers.utils.PushToHubMixin.push_to_hub)
    assert _parameters(HubMixin.push_to_hub) == pushed


# --------------------------------------------------------------------------- save_pretrained


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_writes_what_transformers_writes(tmp_path, tie):
    hf = make_hf_model("llama", tie_word_embeddings=tie)
    hf.save_pretrained(tmp_path / "base")
    ours = load(tmp_path / "base")
    ours.save_pretrained(tmp_path / "fm")
    hf.save_pretrained(tmp_path / "hf")
    assert listing(tmp_path / "fm") == listing(tmp_path / "hf")
    generation_config = "generation_config.json"  # byte for byte
    assert (tmp_path / "fm" / generation_config).read_bytes() == (
        tmp_path / "hf" / generation_config
    ).read_bytes()
    assert json.loads((tmp_path / "fm" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text()
    )
    loaded = transformers.GenerationConfig.from_pretrained(tmp_path / "fm")
    assert loaded.to_dict() == hf.generation_config.to_dict()
    with torch.no_grad():
        assert torch.equal(hf_logits(tmp_path / "fm"), hf(IDS).logits)


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("variant", [None, "fp16"])
@pytest.mark.parametrize("max_shard_size", ["5GB", "100KB"])
def test_formats_variants_and_shards_are_transformers(base, tmp_path, safe, variant, max_shard_size):
    folder, hf = base
    options = dict(safe_serialization=safe, variant=variant, max_shard_size=max_shard_size)
    load(folder).save_pretrained(tmp_path / "fm", **options)
    hf.save_pretrained(tmp_path / "hf", **options)
    assert listing(tmp_path / "fm") == listing(tmp_path / "hf")
    indexes = [p.name for p in (tmp_path / "hf").glob("*.index*.json")]
    assert len(indexes) == (max_shard_size == "100KB")
    for name in indexes:
        assert json.loads((tmp_path / "fm" / name).read_text()) == json.loads(
            (tmp_path / "hf" / name).read_text()
        )
    with torch.no_grad():
        assert torch.equal(hf_logits(tmp_path / "fm", variant=variant), hf(IDS).logits)
    reread = fmodel.load(tmp_path / "fm", variant=variant)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reread.params[name], tensor), name


def test_save_function_and_state_dict(base, tmp_path):
    folder, hf = base
    ours = load(folder)
    written: list[str] = []

    def save_function(obj, path):
        written.append(Path(path).name)
        torch.save(obj, path)

    state_dict = ours.state_dict()
    state_dict["model.norm.weight"] = torch.full_like(state_dict["model.norm.weight"], 2.0)
    ours.save_pretrained(
        tmp_path / "fm", state_dict=state_dict, safe_serialization=False, save_function=save_function
    )
    assert written == ["pytorch_model.bin"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fm")
    assert torch.equal(theirs.model.norm.weight, state_dict["model.norm.weight"])
    assert torch.equal(ours.model.norm.weight, hf.model.norm.weight)  # the model itself is unchanged


def test_state_dict_of_a_tied_model_stores_the_tie_once(tmp_path):
    from safetensors import safe_open

    hf = make_hf_model("llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "base")
    ours = load(tmp_path / "base")
    ours.save_pretrained(tmp_path / "fm", state_dict=ours.state_dict())
    hf.save_pretrained(tmp_path / "hf", state_dict=hf.state_dict())
    names = {}
    for side in ("fm", "hf"):
        with safe_open(tmp_path / side / "model.safetensors", framework="pt") as f:
            names[side] = set(f.keys())
    assert names["fm"] == names["hf"] and "lm_head.weight" not in names["fm"]


def test_not_the_main_process_writes_nothing(base, tmp_path):
    folder, _ = base
    ours = load(folder)
    ours.save_pretrained(tmp_path / "new", is_main_process=False)
    assert not (tmp_path / "new").exists()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ours.save_pretrained(folder, is_main_process=False, safe_serialization=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_generation_config_the_model_carries_is_written(base, tmp_path):
    folder, _ = base
    ours = load(folder)
    ours.__dict__["_generation_config_dict"] = {"do_sample": True, "temperature": 0.6, "eos_token_id": [2, 5]}
    ours.save_pretrained(tmp_path / "fm")
    written = transformers.GenerationConfig.from_pretrained(tmp_path / "fm")
    assert (written.do_sample, written.temperature, written.eos_token_id) == (True, 0.6, [2, 5])


def test_unknown_arguments_and_the_old_token_spelling(base, tmp_path, hub):
    folder, _ = base
    ours = load(folder)
    with pytest.warns(UserWarning, match=r"ignoring unknown arguments \['foo'\]"):
        ours.save_pretrained(tmp_path / "a", foo=1)
    with pytest.raises(TypeError, match="foo"):
        ours.save_pretrained(tmp_path / "b", push_to_hub=True, foo=1)
    with pytest.raises(ValueError, match="both specified"):
        ours.save_pretrained(tmp_path / "c", token="x", use_auth_token="y")
    with pytest.warns(FutureWarning, match="use_auth_token"):
        ours.push_to_hub("org/tiny", use_auth_token="hf_old")
    assert hub.requests[0].headers["authorization"] == "Bearer hf_old"


# --------------------------------------------------------------------------- tags and auto classes


def test_model_tags_are_kept_like_transformers_and_written_to_the_card(base, tmp_path):
    from huggingface_hub import ModelCard

    folder, hf = base
    ours = load(folder)
    assert ours.model_tags is None and hf.model_tags is None
    for tags in (["a", "b"], "a", ["c", "b"]):
        ours.add_model_tags(tags)
        hf.add_model_tags(tags)
    assert ours.model_tags == hf.model_tags == ["a", "b", "c"]
    ours.save_pretrained(tmp_path / "fm")
    assert ModelCard((tmp_path / "fm" / "README.md").read_text()).data.tags == ["a", "b", "c"]
    (tmp_path / "fm" / "README.md").write_text("---\nlicense: mit\n---\n\n# Mine\n")
    ours.save_pretrained(tmp_path / "fm")
    text = (tmp_path / "fm" / "README.md").read_text()
    assert text == "---\nlicense: mit\ntags:\n- a\n- b\n- c\n---\n\n# Mine\n"
    assert load(tmp_path / "fm").model_tags is None  # tags belong to the object, as in Transformers


def test_register_for_auto_class_records_and_writes_no_auto_map(base, tmp_path, monkeypatch):
    folder, hf = base
    ours = load(folder)
    cls = type(ours)
    monkeypatch.setattr(cls, "_auto_class", None)
    for given in ("AutoModelForCausalLM", facade.AutoModelForCausalLM, transformers.AutoModelForCausalLM):
        cls.register_for_auto_class(given)
        assert cls._auto_class == "AutoModelForCausalLM"
    for bad in ("NotAnAutoClass", "AutoModelForNothing"):
        with pytest.raises(ValueError, match="is not a valid auto class"):
            cls.register_for_auto_class(bad)
        with pytest.raises(ValueError, match="is not a valid auto class"):
            type(hf).register_for_auto_class(bad)
    ours.save_pretrained(tmp_path / "fm")
    assert "auto_map" not in json.loads((tmp_path / "fm" / "config.json").read_text())
    assert not list((tmp_path / "fm").glob("*.py"))
    # Transformers loads it with its own class, no remote code asked for
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fm")
    assert type(loaded) is transformers.LlamaForCausalLM
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, hf(IDS).logits)


# --------------------------------------------------------------------------- push_to_hub


def test_push_to_hub_uploads_the_checkpoint(base, tmp_path, hub):
    from huggingface_hub import ModelCard

    folder, hf = base
    ours = load(folder)
    ours.add_model_tags("fmodel")
    info = ours.push_to_hub(
        "org/tiny",
        private=True,
        token="hf_secret",
        create_pr=True,
        revision="dev",
        commit_description="a tiny llama",
        tags=["extra", "fmodel"],
    )
    assert hub.requests[0].json() == {"name": "tiny", "organization": "org", "private": True}
    assert "POST /api/models/org/tiny/branch/dev" in hub.paths()
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in hub.requests)
    [commit] = hub.commits
    assert (commit.repo_id, commit.revision, commit.create_pr) == ("org/tiny", "dev", True)
    assert (commit.summary, commit.description) == ("Upload LlamaForCausalLM", "a tiny llama")
    assert sorted(commit.files) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert ModelCard(commit.files["README.md"].decode()).data.tags == ["fmodel", "extra"]
    assert ours.model_tags == ["fmodel"]  # Transformers would have appended "extra" to it
    hf.save_pretrained(tmp_path / "hf")
    assert commit.files["generation_config.json"] == (tmp_path / "hf" / "generation_config.json").read_bytes()
    assert json.loads(commit.files["config.json"]) == json.loads(
        (tmp_path / "hf" / "config.json").read_text()
    )
    (tmp_path / "pushed").mkdir()
    for name, data in commit.files.items():
        (tmp_path / "pushed" / name).write_bytes(data)
    with torch.no_grad():
        assert torch.equal(hf_logits(tmp_path / "pushed"), hf(IDS).logits)
    assert info.pr_url is not None and info.oid in info.commit_url


def test_save_pretrained_push_to_hub_uploads_what_changed(base, tmp_path, hub):
    folder, _ = base
    ours = load(folder)
    target = tmp_path / "my-model"
    ours.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    assert ours.save_pretrained(target, push_to_hub=True, commit_message="retrain") is None
    [commit] = hub.commits
    assert commit.repo_id == "tester/my-model" and commit.summary == "retrain"
    assert "tokenizer.json" not in commit.files
    assert sorted(commit.files) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.save_pretrained(target, push_to_hub=True, repo_id="org/other", private=False, create_pr=True)
    assert hub.commits[-1].repo_id == "org/other" and hub.commits[-1].create_pr
    assert hub.requests[0].json()["name"] == "my-model"
