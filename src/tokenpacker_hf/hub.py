# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Reaching a Hugging Face Hub repo from the command line and the converter, failing fast and in one line.

`huggingface_hub` retries a download whose metadata request fails (a network error or a 5xx answer) five times
with exponential backoff, and transformers asks for a dozen files per model, so a repo id that does not exist or
a Hub that cannot be reached used to cost minutes before an error. [`locate_repo`] asks once: a missing repo is
an error at once, and an unreachable Hub falls back to the local cache, or is an error when the repo is not
cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class HubError(OSError):
    """A Hub repo that cannot be used: it does not exist, the Hub refused it, or the Hub cannot be reached and the
    repo is not in the local cache. The message says which."""


@dataclass(frozen=True)
class ModelFiles:
    """A model folder or Hub repo (`name`, what `from_pretrained` takes), the names of its files, and whether
    only the local cache can be used.

    `cached_only` is True when offline mode is on or the Hub could not be reached but the repo's `config.json`
    is cached; loaders must then be called with `local_files_only=True`, or they would retry the Hub again.
    `revision` is the branch, tag or commit of a repo to load (None: the default branch; always None for a folder).
    """

    name: str
    files: frozenset[str]
    cached_only: bool
    revision: str | None = None


def one_line(error: BaseException) -> str:
    """The error's message on one line: loaders and the Hub client often spread theirs over several lines.

    A config that fails validation raises huggingface_hub's `StrictDataclassError` around the `ValueError` that
    names the field; that inner message is the one a user needs.
    """
    from huggingface_hub.errors import StrictDataclassError

    if isinstance(error, StrictDataclassError) and error.__cause__ is not None:
        error = error.__cause__
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def locate_repo(repo_id: str, revision: str | None = None) -> ModelFiles:
    """The files of Hub model repo `repo_id` at `revision` (default: its main branch), from one request bounded by `HF_HUB_ETAG_TIMEOUT` (10 s by default).

    Raises [`HubError`] when the repo or the revision does not exist (or is private or gated without a token) or
    the Hub refuses it; when offline mode is on or the Hub cannot be reached (a network error, a timeout, a 5xx answer), the
    locally cached snapshot is used, and [`HubError`] raised if there is none.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        return _cached_repo(repo_id, "offline mode is on (HF_HUB_OFFLINE)", revision)
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RevisionNotFoundError:
        raise HubError(f"the Hub model repo {repo_id} has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"the Hub at {endpoint} has no model repo {repo_id} (a private or gated repo needs a token: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status is not None and status < 500 and status not in (408, 429):
            raise HubError(f"the Hub at {endpoint} refused {repo_id}: {one_line(error)}") from None
        return _cached_repo(repo_id, f"the Hub at {endpoint} answered {status} for {repo_id}", revision)
    # Network errors are the HTTP client's own types, which differ between huggingface_hub releases (httpx, httpx2).
    except Exception as error:
        return _cached_repo(repo_id, f"the Hub at {endpoint} cannot be reached ({one_line(error)})", revision)
    files = frozenset(sibling.rfilename for sibling in info.siblings or ())
    return ModelFiles(repo_id, files, cached_only=False, revision=revision)


def _cached_repo(repo_id: str, reason: str, revision: str | None = None) -> ModelFiles:
    """The locally cached snapshot of `repo_id` at `revision` (the one holding its cached `config.json`), or a
    HubError."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        at = f" at revision {revision}" if revision else ""
        raise HubError(f"{reason}, and {repo_id}{at} is not in the local cache")
    snapshot = Path(config).parent
    files = frozenset(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    return ModelFiles(repo_id, files, cached_only=True, revision=revision)
