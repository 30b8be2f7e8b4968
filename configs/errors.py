"""The errors a user can fix, for every layer: :class:`RagtuneError` and the kinds the HTTP API tells apart.

Every floor raises these, and none below the serving Ingress knows HTTP: the Ingress maps a kind to a status
(``serving.ingress``), the CLI prints the message without a traceback (``jobs.cli``). A ``RagtuneError`` that is
none of the kinds is a problem with the installation or the data (a missing shard, a checksum mismatch): the
CLI prints it, the Ingress answers 500.
"""

from __future__ import annotations

import re
from typing import Any

# credentials a URI can carry: `s3://KEY:SECRET@bucket/...` (pyarrow's S3 and GCS filesystems read them there) and
# query values such as `?secret_key=...&session_token=...`
_URI_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", re.IGNORECASE)
_URI_SECRET_PARAM = re.compile(r"([?&][a-z_]*(?:secret|token|password|passwd|access_key)[a-z_]*=)[^&\s'\"]+",
                               re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it taken out: the userinfo dropped (what is left still opens
    with the credentials of the environment), secret query values as ``***``. For messages, logs, summaries and
    manifests: what a URI says about the storage may be shown, never its keys."""
    return _URI_SECRET_PARAM.sub(r"\1***", _URI_USERINFO.sub(r"\1", text))


class RagtuneError(Exception):
    """An error the user can fix; the message names the field, the value and the fix.

    Args:
        message: what is wrong and how to fix it.
        param: the request or config field at fault, when there is one (the HTTP error body's ``param``).
        code: a short machine-readable reason (the HTTP error body's ``code``), e.g. ``context_length_exceeded``.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        message = redact(message)  # a message quotes paths and URIs; never the credentials of one
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def __reduce__(self) -> tuple[Any, ...]:  # param and code survive Ray's pickling of exceptions
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(cls: type[RagtuneError], message: str, param: str | None, code: str | None) -> RagtuneError:
    return cls(message, param=param, code=code)


class InvalidRequest(RagtuneError):
    """A request that cannot be answered as it stands: bad or too large input (HTTP 400)."""


class NotFound(RagtuneError):
    """A request for something that is not served, e.g. an unknown model or adapter (HTTP 404)."""


class Conflict(RagtuneError):
    """A change the running service refuses in its present state, e.g. an index version it cannot switch to
    (HTTP 409)."""


class Overloaded(RagtuneError):
    """More requests than the service answers within its latency target; the same request may succeed after the
    Retry-After delay (HTTP 429)."""


class Unavailable(RagtuneError):
    """A part of the service did not answer in time; the same request may succeed later (HTTP 503)."""


_OBJECT_STORE_ERRORS = ("AWS Error", "google::cloud", "GCS Error", "Azure Error")  # how pyarrow's filesystems say it


def storage_error(where: str, e: BaseException) -> RagtuneError:
    """An object store that cannot be reached or read (``where``: its URI, or what was being read), as one line
    with the fix."""
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RagtuneError(f"{where}: the storage cannot be reached or read ({detail[:300]}). Fix: check the network "
                        "from this machine, the bucket's name, and the credentials (AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server; "
                        "GOOGLE_APPLICATION_CREDENTIALS for gs://)", code="storage_unreachable")


def user_error(e: BaseException) -> RagtuneError | None:
    """The RagtuneError behind an exception, looking through Ray's wrappers (``RayTaskError`` keeps the original
    exception in ``cause``) and chained exceptions; an object store's OSError (pyarrow's S3, GCS or Azure
    filesystems) as a :func:`storage_error`; None when there is neither."""
    seen: set[int] = set()
    cur: BaseException | None = e
    storage: OSError | None = None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)
        if isinstance(cause, RagtuneError):
            return cause
        if isinstance(cur, RagtuneError) and cause is None:
            return cur
        if storage is None and isinstance(cur, OSError) and any(m in str(cur) for m in _OBJECT_STORE_ERRORS):
            storage = cur
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    return None if storage is None else storage_error("object storage", storage)
