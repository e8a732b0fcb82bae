"""Fetch the files of a hub repo through huggingface_hub's cache, failing fast and clearly.

`HubFetcher(repo_id, ...).fetch(filename)` is `hf_hub_download` with three differences:

- **No hidden retries on a dead network.** huggingface_hub retries every failed HEAD call five
  times with exponential backoff (about 23 s per file when the host is unreachable). Before the
  first download the fetcher sends one HEAD request itself, with no retry, through
  huggingface_hub's own HTTP session (so `configure_http_backend`, proxies and test transports
  apply), with a connect timeout of min(`HF_HUB_ETAG_TIMEOUT`, 5) s. If the hub cannot be reached
  (connection refused, DNS failure, timeout, HTTP 5xx), every file of that fetcher is looked up
  in the local cache only, as huggingface_hub itself would after its retries.
- **Named errors.** A repo the cache does not hold while offline mode is on (`local_files_only=True`
  or `HF_HUB_OFFLINE=1`) or while the hub is unreachable raises `HubUnavailableError`, whose
  message says which (the switch, or the endpoint and what went wrong), which cache folder was
  searched, and how to point at a local copy instead.
- **The cache layout is checked.** A ref naming a snapshot that does not exist, a snapshot entry
  that is a broken symlink (its blob is gone) or a folder where a file belongs raise
  `CheckpointError` naming the path, instead of "file not found" or a later IsADirectoryError.

The fetcher keeps what it learned (hub reachable or not) for its own lifetime only: one
fetcher per resolution, nothing global.
"""

from __future__ import annotations

import os
import re

from ..errors import CheckpointError, HubUnavailableError

__all__ = ["HubFetcher", "hub_cache_dir", "offline_switch"]

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_RETRIED_STATUS = (500, 502, 503, 504)  # the codes huggingface_hub would retry with backoff


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The hub cache folder used: `cache_dir`, else huggingface_hub's (`HF_HUB_CACHE`, under `HF_HOME`)."""
    from huggingface_hub import constants

    return os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE


def offline_switch(local_files_only: bool | None) -> str | None:
    """Which offline switch is on ("local_files_only=True" or "HF_HUB_OFFLINE=1"), else None."""
    from huggingface_hub import constants

    if local_files_only:
        return "local_files_only=True"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    return None


class HubFetcher:
    """Local paths of one hub repo's files, through huggingface_hub's cache.

    Arguments:
        repo_id: "org/name".
        revision: a branch, tag or commit hash (default "main").
        cache_dir: the hub cache folder (default huggingface_hub's).
        local_files_only: never use the network (also on when `HF_HUB_OFFLINE=1`).

    Raises:
        CheckpointError: `repo_id` is not a valid hub repo id (checked here; nothing is fetched
            before `fetch`).
    """

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        from huggingface_hub.file_download import repo_folder_name
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise CheckpointError(
                f"{repo_id!r}: no such folder, and not a valid hub repo id 'org/name' ({_first_line(exc)})"
            ) from None
        self.repo_id = repo_id
        self.revision = revision
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.offline = offline_switch(local_files_only)
        self.storage = os.path.join(
            hub_cache_dir(cache_dir), repo_folder_name(repo_id=repo_id, repo_type="model")
        )
        self.unreachable: str | None = None  # why the hub could not be reached, once probed
        self._probed = False

    @property
    def cache_only(self) -> bool:
        """True when files come from the local cache only (offline mode, or the hub unreachable)."""
        return self.offline is not None or self.unreachable is not None

    def fetch(self, filename: str, *, label: str | None = None) -> str | None:
        """The local path of `filename`, downloaded into the cache if need be.

        Arguments:
            filename: the file's path inside the repo.
            label: how messages name the file (default `filename`, e.g. "config.json").

        Returns:
            The path (a file), or None when the repo has no such file: the hub says so, or
            (offline / hub unreachable) the cached snapshot of the repo lacks it.

        Raises:
            HubUnavailableError: offline mode is on or the hub cannot be reached, and the cache
                holds no snapshot of the repo at this revision.
            CheckpointError: the repo or revision does not exist on the hub, the hub refused the
                request, or the cache is damaged (names the path).
        """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if not self.cache_only and not self._probed:
            self._probe(filename)
        try:
            path = hf_hub_download(
                self.repo_id,
                filename,
                revision=self.revision,
                cache_dir=self.cache_dir,
                local_files_only=self.cache_only,
            )
        except LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError: first)
            if not self.cache_only:  # the network went away after the probe
                self.unreachable = f"{type(exc.__cause__ or exc).__name__}"
            return self._from_damaged_or_absent(filename, label)
        except EntryNotFoundError:  # the hub answered: the repo has no such file
            return None
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"{self.repo_id}: not a local folder and not a repository on the hub"
            ) from None
        except RevisionNotFoundError:
            raise CheckpointError(f"{self.repo_id}: the hub has no revision {self.revision!r}") from None
        except Exception as exc:  # HTTP errors (401 gated, 403, ...), invalid ids
            raise CheckpointError(
                f"{self.repo_id}: could not resolve on the hub ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        return self._checked(path)

    def missing_reason(self) -> str:
        """Why a file the caller needs was not found, for its message: "" when the hub said so;
        " (offline mode is on: ...)" or " (the hub could not be reached ...)" when only the cached
        snapshot was searched."""
        where = f"the cached snapshot of {self.repo_id} in {hub_cache_dir(self.cache_dir)} does not have it"
        if self.offline is not None:
            return f" (offline mode is on: {self.offline}; {where})"
        if self.unreachable is not None:
            return f" (the hub could not be reached: {self.unreachable}; {where})"
        return ""

    # -- internals ---------------------------------------------------------------------------

    def _probe(self, filename: str) -> None:
        """One HEAD request, no retry: sets `unreachable` when the hub cannot be reached."""
        import requests
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        self._probed = True
        url = hf_hub_url(self.repo_id, filename, revision=self.revision)
        timeout = (min(float(constants.HF_HUB_ETAG_TIMEOUT), 5.0), float(constants.HF_HUB_ETAG_TIMEOUT))
        try:
            response = get_session().head(
                url, headers=build_hf_headers(), timeout=timeout, allow_redirects=False
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            self.unreachable = f"{type(exc).__name__}: {_root_cause(exc)}"
            return
        if response.status_code in _RETRIED_STATUS:
            self.unreachable = f"HTTP {response.status_code} from {url}"

    def _checked(self, path: str) -> str:
        if not os.path.isfile(path):
            kind = "a folder" if os.path.isdir(path) else "not a regular file"
            raise CheckpointError(
                f"{path}: the hub cache entry of {self.repo_id} is {kind}, expected a file (or a symlink "
                f"to a blob); the cache is damaged: delete {self.storage} and download again"
            )
        return path

    def _from_damaged_or_absent(self, filename: str, label: str | None) -> None:
        """After a cache miss: raise for a damaged cache or an absent repo; None when the cached
        snapshot simply lacks the file."""
        snapshot = self._snapshot()
        if snapshot is None:
            raise HubUnavailableError(self._unavailable_text(filename, label))
        pointer = os.path.join(snapshot, *filename.split("/"))
        if os.path.islink(pointer) and not os.path.exists(pointer):
            raise CheckpointError(
                f"{pointer}: broken symlink in the hub cache (its blob {os.readlink(pointer)} is gone, e.g. an "
                f"interrupted download or a pruned cache); delete {self.storage} and download {self.repo_id} again"
            )
        if os.path.exists(pointer):
            self._checked(pointer)
        return None

    def _snapshot(self) -> str | None:
        """The cached snapshot folder of the revision; None when the cache does not hold one.

        Raises:
            CheckpointError: a ref names a commit whose snapshot folder does not exist.
        """
        revision = self.revision or "main"
        if _COMMIT.match(revision):
            folder = os.path.join(self.storage, "snapshots", revision)
            return folder if os.path.isdir(folder) else None
        ref = os.path.join(self.storage, "refs", revision)
        if not os.path.isfile(ref):
            return None
        try:
            with open(ref, encoding="utf-8") as f:
                commit = f.read(200).strip()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{ref}: unreadable ref in the hub cache ({exc})") from None
        folder = os.path.join(self.storage, "snapshots", commit)
        if not _COMMIT.match(commit) or not os.path.isdir(folder):
            raise CheckpointError(
                f"{ref}: the hub cache's ref {revision!r} of {self.repo_id} names commit {commit[:60]!r}, but "
                f"there is no snapshot folder {folder}; the cache is damaged: delete {self.storage} and download "
                "again"
            )
        return folder

    def _unavailable_text(self, filename: str, label: str | None) -> str:
        from huggingface_hub import constants

        what = label or filename
        cache = hub_cache_dir(self.cache_dir)
        local = (
            "To use a local copy, pass its folder path instead of the repo id; or, on a machine with network, "
            f"run `huggingface-cli download {self.repo_id}` (or huggingface_hub.snapshot_download) and "
            "bring that cache here, pointing HF_HOME or cache_dir= at it"
        )
        where = f"{self.repo_id}{'' if self.revision is None else f' at revision {self.revision!r}'}"
        if self.offline is not None:
            return (
                f"{self.repo_id}: no {what} found (offline: it is not in the local cache; offline mode is on: "
                f"{self.offline}): the cache {cache} holds no snapshot of {where}. {local}."
            )
        return (
            f"{self.repo_id}: no {what} found: the hub could not be reached at {constants.ENDPOINT} "
            f"({self.unreachable}), and the local cache {cache}, tried instead, holds no snapshot of {where}. "
            f"{local}; with the files cached, set HF_HUB_OFFLINE=1 (or local_files_only=True) to skip the network."
        )


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error chain, on one line ("[Errno 111] Connection refused")."""
    seen = exc
    for _ in range(10):
        inner = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
        if inner is None or not isinstance(inner, BaseException):
            break
        seen = inner
    text = _first_line(seen)
    match = re.search(r"\[Errno [-\d]+\][^\"')]*", text)
    return match.group(0).strip() if match else text[:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
