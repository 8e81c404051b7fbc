"""What a failure to read a model, a tokenizer or data means: an outage that a restart may outlast (the Hugging
Face Hub answering 5xx or not at all, a storage fault), or an answer about the input that every start would get
again (no such repository, revision or file; no access; offline mode without it in the cache).

transformers and datasets wrap both kinds in the same OSError / FileNotFoundError; only the exceptions they were
raised from tell them apart. The run records an answer about the input as an input error (ConfigError,
DataError), which `shardtune submit` does not requeue; an outage it leaves retryable.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from shardtune.errors import ConfigError

# a read that failed with these may succeed again: the storage or the network, not the file
_TRANSIENT_ERRNOS = {
    errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EREMOTEIO,
}  # fmt: skip
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}  # the status codes huggingface_hub itself retries, and 408
# the hub's "no such repository" is a 401: it will not say whether a private one exists
_REFUSED_HTTP = {401, 403, 404}


RETRIED = (
    "a restart retries it (slurm/train.sh and shardtune submit restart once by default, torchrun with "
    "--max-restarts)"
)


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """e and the exceptions it was raised from or during, outermost first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(e: BaseException) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def _offline(e: BaseException) -> bool:
    """Whether it was not found because offline mode is on (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE): a setting.
    datasets says so in its error; transformers only that the file is not in the cache."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    return any(
        "OfflineModeIsEnabled" in f"{type(c).__name__} {c}"
        or (constants.HF_HUB_OFFLINE and isinstance(c, LocalEntryNotFoundError))
        for c in _chain(e)
    )


def outage(e: BaseException) -> str | None:
    """What in e's chain says the thing could not be reached although it may be fine (a restart may succeed),
    or None. For what comes from the hub, ask `refusal` first: offline mode fails with a ConnectionError too."""
    for c in _chain(e):
        if _status(c) in _TRANSIENT_HTTP:
            return f"HTTP {_status(c)}"
        if isinstance(c, (ConnectionError, TimeoutError)):
            return f"{type(c).__name__}: {c}"
        if isinstance(c, OSError) and c.errno in _TRANSIENT_ERRNOS:
            return f"{errno.errorcode[c.errno]}: {os.strerror(c.errno)}"
    return None


def refusal(e: BaseException) -> str | None:
    """What in e's chain says the hub has no such repository, revision or file, or will not let this user read
    it, or that offline mode is on without it in the cache: the same on every start. None otherwise."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if _offline(e):
        return "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and it is not in the local cache"
    for c in _chain(e):
        if isinstance(c, GatedRepoError):  # (a RepositoryNotFoundError too)
            return (
                "a gated repository this user has no access to (request it on its page, then `hf auth login`)"
            )
        if isinstance(c, RepositoryNotFoundError):
            return "no such repository on the hub, or a private one this user cannot read (`hf auth login`)"
        if isinstance(c, RevisionNotFoundError):
            return "no such revision (branch, tag or commit) in the repository"
        if _status(c) in _REFUSED_HTTP:
            return f"the hub answered HTTP {_status(c)}"
    return None


@contextmanager
def refusal_is_input_error(field: str, value: str) -> Iterator[None]:
    """Within it, a hub's answer about the input (see `refusal`) becomes a ConfigError naming the setting; an
    outage, or anything else, passes as it is (a restart may get past it)."""
    try:
        yield
    except OSError as e:
        if (problem := refusal(e)) is None:
            raise
        raise ConfigError(
            f"{field}={value}: {problem}. Check the name (and model.revision), or give a local directory."
        ) from None
