"""Push a checkpoint to the Hugging Face Hub the way Transformers' `push_to_hub` does.

`push_to_hub` saves the state into a working folder (a temporary one by default) and commits
the files that the save created or changed, through huggingface_hub's `HfApi`: create the repo
if needed, load the repo's model card (or start one) and tag it, create the branch named by
`revision`, then one commit. `save_and_push` is the `save_pretrained(push_to_hub=True)` flavour:
the folder is the caller's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..state import ModelState
from .card import merge_tags, new_model_card
from .save import save

__all__ = [
    "default_commit_message",
    "file_timestamps",
    "modified_files",
    "push_to_hub",
    "remote_model_card",
    "save_and_push",
    "upload_files",
]


def default_commit_message(class_name: str) -> str:
    """Transformers' default commit message for an object of class `class_name`
    ("Upload model" when the name contains "Model", as `GPT2LMHeadModel`; else
    "Upload LlamaForCausalLM"; configs, tokenizers, ... likewise)."""
    for word, message in (
        ("Model", "Upload model"),
        ("Config", "Upload config"),
        ("Tokenizer", "Upload tokenizer"),
        ("FeatureExtractor", "Upload feature extractor"),
        ("Processor", "Upload processor"),
    ):
        if word in class_name:
            return message
    return f"Upload {class_name}"


def file_timestamps(folder: str | os.PathLike) -> dict[str, float]:
    """{path relative to `folder` ("/"-separated): mtime} of every file under it (empty when
    the folder does not exist)."""
    folder = os.fspath(folder)
    out: dict[str, float] = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getmtime(path)
    return out


def modified_files(folder: str | os.PathLike, before: Mapping[str, float]) -> list[str]:
    """Files under `folder` that are new or newer than in `before` (a `file_timestamps`),
    sorted. Transformers uploads the same set (it looks one folder level deep; this walks all)."""
    now = file_timestamps(folder)
    return sorted(name for name, mtime in now.items() if name not in before or mtime > before[name])


def remote_model_card(
    repo_id: str, *, token: str | bool | None = None, ignore_metadata_errors: bool = False
) -> str | None:
    """The README.md text of the hub repo `repo_id` (main branch, through huggingface_hub's
    `ModelCard.load` as Transformers does), or None when it has none."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    try:
        card = ModelCard.load(repo_id, token=token, ignore_metadata_errors=ignore_metadata_errors)
    except EntryNotFoundError:
        return None
    return card.content


def upload_files(
    folder: str | os.PathLike,
    repo_id: str,
    files: Iterable[str],
    *,
    commit_message: str,
    commit_description: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
):
    """Commit `files` (paths relative to `folder`) to `repo_id` in one commit, as Transformers'
    `_upload_modified_files`: the branch `revision` is created first unless it is a PR ref
    (a 403 is ignored when opening a PR: the branch may exist in a repo one cannot write to).

    Returns:
        huggingface_hub's `CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    operations = [
        CommitOperationAdd(path_or_fileobj=os.path.join(os.fspath(folder), name), path_in_repo=name)
        for name in files
    ]
    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        except HfHubHTTPError as exc:
            if not (create_pr and exc.response is not None and exc.response.status_code == 403):
                raise
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


def _create_repo(repo_id: str, *, private: bool | None, token: str | bool | None) -> str:
    from huggingface_hub import HfApi

    return HfApi().create_repo(repo_id=repo_id, token=token, private=private, exist_ok=True).repo_id


def _save_and_upload(
    save_into: Callable[[str, str], Any],
    folder: str,
    repo_id: str,
    *,
    token: str | bool | None,
    ignore_metadata_errors: bool,
    tags: list[str],
    commit_message: str,
    commit_description: str | None,
    create_pr: bool,
    revision: str | None,
):
    card = remote_model_card(repo_id, token=token, ignore_metadata_errors=ignore_metadata_errors)
    before = file_timestamps(folder)
    save_into(folder, new_model_card(tags) if card is None else card)
    return upload_files(
        folder,
        repo_id,
        modified_files(folder, before),
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


def push_to_hub(
    state: ModelState,
    repo_id: str,
    *,
    use_temp_dir: bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    max_shard_size: int | str = "5GB",
    create_pr: bool = False,
    safe_serialization: bool = True,
    revision: str | None = None,
    commit_description: str | None = None,
    tags: Iterable[str] | str | None = None,
    generation_config: Mapping[str, Any] | None = None,
    ignore_metadata_errors: bool = False,
):
    """Save `state` and commit the checkpoint to the hub repo `repo_id` (created if absent).

    As Transformers' `push_to_hub`: the working folder is a new temporary folder, or with
    `use_temp_dir=False` the folder named like the repo (`repo_id`'s last part) in the current
    directory (default: temporary unless that folder exists). Only the files the save created or
    changed there are uploaded. The model card is the folder's README.md if it has one, else the
    repo's, else a new one; `tags` are merged into its metadata.

    Arguments:
        state: the model (not modified).
        repo_id: "name" (in the token's namespace) or "org/name".
        use_temp_dir, commit_message, private, token, max_shard_size, create_pr,
        safe_serialization, revision, commit_description: as Transformers' `push_to_hub`;
            `commit_message` defaults to `default_commit_message(state.architecture)`.
        tags: model card tags (a string is one tag).
        generation_config: see `fmodel.save`.
        ignore_metadata_errors: drop card metadata that cannot be interpreted (see `tag_model_card`).

    Returns:
        huggingface_hub's `CommitInfo` (`.commit_url`, `.oid`, `.pr_url`, ...).

    Raises:
        huggingface_hub's HTTP errors (repository not found, unauthorised, ...), unchanged.

    Example:
        >>> push_to_hub(state, "me/tiny-llama", private=True, tags=["fmodel"])
    """
    tags = merge_tags((), tags)
    working_dir = repo_id.split("/")[-1]
    repo_id = _create_repo(repo_id, private=private, token=token)
    if use_temp_dir is None:
        use_temp_dir = not os.path.isdir(working_dir)

    def save_into(folder: str, card: str) -> None:
        save(
            state,
            folder,
            max_shard_size=max_shard_size,
            safe_serialization=safe_serialization,
            generation_config=generation_config,
            tags=tags,
            model_card=card,
            ignore_metadata_errors=ignore_metadata_errors,
        )

    context = tempfile.TemporaryDirectory() if use_temp_dir else contextlib.nullcontext(working_dir)
    with context as folder:
        return _save_and_upload(
            save_into,
            os.fspath(folder),
            repo_id,
            token=token,
            ignore_metadata_errors=ignore_metadata_errors,
            tags=tags,
            commit_message=default_commit_message(state.architecture)
            if commit_message is None
            else commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            revision=revision,
        )


def save_and_push(
    state: ModelState,
    directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    tags: Iterable[str] | str | None = None,
    ignore_metadata_errors: bool = False,
    **save_options: Any,
):
    """`fmodel.save(state, directory, **save_options)`, then commit what it created or changed
    to `repo_id` (default: the folder's name), as `save_pretrained(..., push_to_hub=True)`.

    The model card is handled as in `push_to_hub` (the folder's README.md wins over the repo's).

    Returns:
        huggingface_hub's `CommitInfo`.
    """
    directory = os.fspath(directory)
    tags = merge_tags((), tags)
    repo_id = _create_repo(
        repo_id or os.path.basename(os.path.normpath(directory)), private=private, token=token
    )

    def save_into(folder: str, card: str) -> None:
        save(
            state,
            folder,
            tags=tags,
            model_card=card,
            ignore_metadata_errors=ignore_metadata_errors,
            **save_options,
        )

    return _save_and_upload(
        save_into,
        directory,
        repo_id,
        token=token,
        ignore_metadata_errors=ignore_metadata_errors,
        tags=tags,
        commit_message=default_commit_message(state.architecture)
        if commit_message is None
        else commit_message,
        commit_description=commit_description,
        create_pr=create_pr,
        revision=revision,
    )
