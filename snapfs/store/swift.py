"""A store in an OpenStack Swift container, through python-swiftclient.

python-swiftclient blocks, so every call runs in `trio.to_thread.run_sync`. A
`trio.CapacityLimiter` bounds the threads, and a free list holds the `Connection` objects: a
thread takes one (or makes one while fewer than the limit exist) and puts it back, so there
are never more connections than threads. Connections share the token the first of them got;
swiftclient authenticates again by itself when a token expires (one extra request).

swiftclient's own retries are off (`retries=0`): this module owns retrying, because
swiftclient never retries a PUT whose body is plain bytes and lets a download cut mid-body
escape as urllib3's `ProtocolError`. Each try is one thread call; between tries the task
sleeps (exponential backoff with full jitter, cancellable) and logs one WARNING line.
Transient: connection refused/reset, timeouts, a cut body, an ETag that does not match the
MD5 we computed, HTTP 408/422/429/498/499/5xx. Permanent, raised at once: 401/403
(`StoreError`, "authentication failed"), 404 (`ObjectNotFound` for get, None for head, nothing
for delete), any other 4xx.

On cancellation a call waits for its thread to finish (at most `timeout` seconds of socket
inactivity), so a put either happened whole or not at all, as the `Store` contract says.

Credentials come from the environment exactly like the `swift` CLI (ST_AUTH/ST_USER/ST_KEY
for v1, OS_* for Keystone v3). They never appear in `url`, in exception messages or in log
records: messages name the store URL and the auth endpoint, and swiftclient's request trace
(which would show the user name and a prefix of the key) is filtered out of its logger.
"""

import hashlib
import http.client
import importlib.util
import io
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests.exceptions
import swiftclient.client
import trio
import urllib3.exceptions
from swiftclient.exceptions import ClientException

from snapfs.errors import AlreadyExists, InvalidArgument, ObjectNotFound, StoreError
from snapfs.store.base import Store, check_key

log = logging.getLogger("snapfs.store")
# The retry WARNINGs are for the daemon's log (its handlers get them by propagation). In a
# process that configured no logging (`snapfs init`), they must not reach stderr through
# logging's last-resort handler: the CLI's contract is one error line.
log.addHandler(logging.NullHandler())

T = TypeVar("T")

_TRANSIENT_HTTP = frozenset({408, 422, 429, 498, 499})
_LISTING_PAGE = 10_000
_Urllib3Error = urllib3.exceptions.HTTPError  # some are OSErrors: their text is not a cause


class _DropRequestTrace(logging.Filter):
    """swiftclient logs each failed request as a curl command line: the X-Auth-User value
    and up to 16 characters of X-Auth-Key would reach the logs. Drop those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "http_log"


def _install_log_filter() -> None:
    logger = logging.getLogger("swiftclient")
    if not any(isinstance(f, _DropRequestTrace) for f in logger.filters):
        logger.addFilter(_DropRequestTrace())


_install_log_filter()


@dataclass(frozen=True)
class SwiftStatistics:
    puts: int
    bytes_put: int
    gets: int
    bytes_got: int
    retries: int


class _Transient(Exception):
    """A try failed in a way that another try may fix; args[0] says why, without secrets."""


@dataclass(frozen=True)
class _Credentials:
    auth_url: str
    user: str
    key: str
    auth_version: str
    os_options: Mapping[str, str]

    def __repr__(self) -> str:  # never show the user or the key
        return f"_Credentials(auth_url={self.auth_url!r}, auth_version={self.auth_version!r})"


def _credentials_from_env(env: Mapping[str, str], netloc: str, https: bool) -> _Credentials:
    if env.get("ST_USER") or env.get("ST_KEY"):
        if not (env.get("ST_USER") and env.get("ST_KEY")):
            raise InvalidArgument("swift store: set both ST_USER and ST_KEY (or use OS_*)")
        scheme = "https" if https else "http"
        auth_url = env.get("ST_AUTH") or f"{scheme}://{netloc}/auth/v1.0"
        return _Credentials(auth_url, env["ST_USER"], env["ST_KEY"], "1", {})
    if env.get("OS_AUTH_URL") or env.get("OS_USERNAME"):
        missing = [
            name
            for name in ("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME")
            if not env.get(name)
        ]
        if missing:
            raise InvalidArgument(f"swift store: Keystone credentials lack {', '.join(missing)}")
        if importlib.util.find_spec("keystoneclient") is None:
            raise InvalidArgument(
                "swift store: Keystone (OS_*) credentials need python-keystoneclient installed"
            )
        options = {
            "project_name": env["OS_PROJECT_NAME"],
            "user_domain_name": env.get("OS_USER_DOMAIN_NAME") or "Default",
            "project_domain_name": env.get("OS_PROJECT_DOMAIN_NAME") or "Default",
        }
        if env.get("OS_REGION_NAME"):
            options["region_name"] = env["OS_REGION_NAME"]
        return _Credentials(
            env["OS_AUTH_URL"], env["OS_USERNAME"], env["OS_PASSWORD"], "3", options
        )
    raise InvalidArgument(
        "swift store: no credentials: set ST_USER and ST_KEY (and ST_AUTH), or OS_AUTH_URL, "
        "OS_USERNAME, OS_PASSWORD and OS_PROJECT_NAME"
    )


def _reason(exc: BaseException) -> str:
    """A short cause for `exc` ('Connection refused', 'timed out', 'HTTP 503 ...'), found by
    walking wrapped exceptions; never the text of a request (which could hold a header)."""
    chain: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo and len(chain) < 50:
        e = todo.pop(0)
        if isinstance(e, BaseException) and all(e is not c for c in chain):
            chain.append(e)
            todo.extend(e.args)
            todo.extend(getattr(e, a, None) for a in ("reason", "__cause__", "__context__"))
    for e in chain:
        if isinstance(e, ClientException) and e.http_status:
            return f"HTTP {e.http_status} {e.http_reason}".strip()
    for e in chain:  # the system's word: 'Connection refused', 'Connection reset by peer'
        if isinstance(e, OSError) and e.strerror and not isinstance(e, _Urllib3Error):
            return e.strerror
    for e in chain:
        if isinstance(e, http.client.IncompleteRead | urllib3.exceptions.ProtocolError):
            return "connection cut mid-body"
    for e in chain:
        if isinstance(
            e, TimeoutError | requests.exceptions.Timeout | urllib3.exceptions.TimeoutError
        ):
            return "timed out"
    return type(exc).__name__


class SwiftStore(Store):
    """Objects `PREFIX/key` in one container. `connections` bounds threads and connections;
    a call makes at most `max_tries` tries within about `retry_time` seconds."""

    def __init__(
        self,
        storage: str,
        container: str,
        prefix: str = "",
        *,
        credentials: _Credentials,
        connections: int = 8,
        max_tries: int = 8,
        retry_time: float = 30.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        timeout: float = 30.0,
    ) -> None:
        if not container or "/" in container or len(container) > 256:
            raise InvalidArgument(f"invalid swift container name {container[:80]!r}")
        if prefix:
            check_key(prefix)
        if connections < 1 or max_tries < 1:
            raise InvalidArgument("swift store: connections and max_tries must be >= 1")
        self.container = container
        self.prefix = f"{prefix}/" if prefix else ""
        self.url = f"{storage}/{container}" + (f"/{prefix}" if prefix else "")
        self._creds = credentials
        self._limiter = trio.CapacityLimiter(connections)
        self._free: list[swiftclient.client.Connection] = []
        self._token: tuple[str, str] | None = None  # (storage url, token) last seen
        self._max_tries = max_tries
        self._retry_time = retry_time
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._timeout = timeout
        self.puts = 0
        self.bytes_put = 0
        self.gets = 0
        self.bytes_got = 0
        self.retries = 0

    @classmethod
    def from_url(
        cls, url: str, *, environ: Mapping[str, str] | None = None, **options: Any
    ) -> "SwiftStore":
        """`swift://HOST:PORT/CONTAINER[/PREFIX]` (http) or `swift+https://...`; credentials
        from `environ` (default os.environ). Raises InvalidArgument."""
        parts = urlsplit(url)
        if parts.scheme not in ("swift", "swift+https"):
            raise InvalidArgument("swift store URL must start with swift:// or swift+https://")
        if parts.username or parts.password or "@" in parts.netloc:
            raise InvalidArgument("store URL must not contain credentials: use ST_* or OS_*")
        if not parts.hostname or parts.query or parts.fragment:
            raise InvalidArgument(
                f"invalid swift store URL {url[:80]!r}: expected swift://host:port/container"
            )
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise InvalidArgument(f"invalid port in swift store URL {url[:80]!r}") from None
        container, _, prefix = parts.path.lstrip("/").partition("/")
        prefix = prefix.strip("/")
        https = parts.scheme == "swift+https"
        creds = _credentials_from_env(
            os.environ if environ is None else environ, parts.netloc, https
        )
        return cls(
            f"{parts.scheme}://{parts.netloc}", container, prefix, credentials=creds, **options
        )

    def __repr__(self) -> str:
        return f"SwiftStore({self.url!r})"

    def statistics(self) -> SwiftStatistics:
        return SwiftStatistics(self.puts, self.bytes_put, self.gets, self.bytes_got, self.retries)

    # ------------------------------------------------------------------ plumbing

    def _new_connection(self) -> swiftclient.client.Connection:
        c = self._creds
        preauth = self._token or (None, None)
        return swiftclient.client.Connection(
            authurl=c.auth_url,
            user=c.user,
            key=c.key,
            auth_version=c.auth_version,
            os_options=dict(c.os_options),
            retries=0,
            starting_backoff=0.05,
            max_backoff=1,
            retry_on_ratelimit=False,
            timeout=self._timeout,
            preauthurl=preauth[0],
            preauthtoken=preauth[1],
        )

    def _in_thread(self, fn: Callable[[swiftclient.client.Connection], T]) -> T:
        """One try, in a worker thread: borrow a connection, call, give it back. A connection
        whose request failed below HTTP is closed (its token kept) before it is reused."""
        try:
            conn = self._free.pop()
        except IndexError:
            conn = self._new_connection()
        try:
            if not (conn.url and conn.token):
                # Authenticate here, not inside the call: swiftclient with retries=0 cannot
                # rewind a PUT body after its own re-authentication.
                conn.url, conn.token = conn.get_auth()
            result = fn(conn)
        except ClientException as exc:
            if exc.http_status is None and not conn.token:
                # a 401 (expired token) inside swiftclient, which then failed to rewind the
                # PUT body: the next try authenticates again
                raise _Transient("token expired") from None
            if exc.http_status is None or exc.http_status >= 500 or exc.http_status in (408, 499):
                conn.close()
            raise
        except BaseException:
            conn.close()
            raise
        finally:
            if conn.url and conn.token:
                self._token = (conn.url, conn.token)
            self._free.append(conn)
        return result

    def _auth_failed(self, exc: ClientException) -> StoreError:
        return StoreError(
            f"{self.url}: authentication failed for {self._creds.auth_url} (HTTP {exc.http_status})"
        )

    async def _call(self, what: str, fn: Callable[[swiftclient.client.Connection], T]) -> T:
        """Run `fn(conn)` in a thread, retrying transient failures. `what` names the
        operation in messages ("PUT key"). ClientException other than 401/403 and transient
        ones reaches the caller for it to judge (404...)."""
        deadline = trio.current_time() + self._retry_time
        backoff = self._initial_backoff
        tries = 0
        while True:
            tries += 1
            try:
                return await trio.to_thread.run_sync(self._in_thread, fn, limiter=self._limiter)
            except ClientException as exc:
                status = exc.http_status
                if status in (401, 403):
                    raise self._auth_failed(exc) from None
                if status is None:  # not an HTTP answer: a configuration problem
                    raise StoreError(f"{self.url}: {what} failed: {self._scrub(exc.msg)}") from None
                if status < 500 and status not in _TRANSIENT_HTTP:
                    raise
                reason = _reason(exc)
            except _Transient as exc:
                reason = str(exc)
            except (
                OSError,
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                http.client.HTTPException,
            ) as exc:
                reason = _reason(exc)
            delay = random.uniform(0, backoff)  # full jitter
            if tries >= self._max_tries or trio.current_time() + delay > deadline:
                raise StoreError(
                    f"{self.url}: {what} failed after {tries} tries: {reason}"
                ) from None
            self.retries += 1
            log.warning(
                "%s: %s failed (%s), try %d of %d in %.2fs",
                self.url,
                what,
                reason,
                tries + 1,
                self._max_tries,
                delay,
            )
            await trio.sleep(delay)
            backoff = min(backoff * 2, self._max_backoff)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    # ------------------------------------------------------------------ the contract

    async def put(self, key: str, data: bytes) -> None:
        try:
            await self._put(key, data, exclusive=False)
        except ClientException as exc:  # a permanent 4xx: never let swiftclient's escape
            raise self._put_failed(key, exc) from None

    async def put_new(self, key: str, data: bytes) -> None:
        """Conditional PUT (If-None-Match: *): Swift answers 412 when the object exists."""
        try:
            await self._put(key, data, exclusive=True)
        except ClientException as exc:
            if exc.http_status != 412:
                raise self._put_failed(key, exc) from None
            if await self.get(key) != data:  # a retry of our own PUT is not a conflict
                raise AlreadyExists(
                    f"{self.url}/{key}: already written by another writer"
                ) from None

    async def _put(self, key: str, data: bytes, exclusive: bool) -> None:
        name = self._name(key)
        headers = {"If-None-Match": "*"} if exclusive else None

        def put(conn: swiftclient.client.Connection) -> None:
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            # a fresh seekable body each try: swiftclient never retries plain bytes
            etag = conn.put_object(
                self.container,
                name,
                io.BytesIO(data),
                content_length=len(data),
                etag=md5,
                content_type="application/octet-stream",
                headers=headers,
            )
            if (etag or "").strip('"') != md5:
                raise _Transient("ETag mismatch")

        await self._call(f"PUT {key}", put)
        self.puts += 1
        self.bytes_put += len(data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        name = self._name(key)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument(f"invalid range {offset}+{length} for {key}")
        if length == 0:
            if await self.head(key) is None:
                raise ObjectNotFound(f"{self.url}/{key}: not found")
            return b""
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"

        def get(conn: swiftclient.client.Connection) -> bytes:
            try:
                resp_headers, body = conn.get_object(self.container, name, headers=headers)
            except ClientException as exc:
                if exc.http_status == 416:  # offset at or past the end
                    return b""
                raise
            expected = resp_headers.get("content-length")
            if expected is not None and int(expected) != len(body):
                raise _Transient(f"short body ({len(body)} of {expected} bytes)")
            return body

        try:
            data = await self._call(f"GET {key}", get)
        except ClientException as exc:
            if exc.http_status == 404:
                raise ObjectNotFound(f"{self.url}/{key}: not found") from None
            raise self._failed(f"GET {key}", exc) from None
        self.gets += 1
        self.bytes_got += len(data)
        return data

    async def head(self, key: str) -> int | None:
        name = self._name(key)
        try:
            headers = await self._call(
                f"HEAD {key}", lambda conn: conn.head_object(self.container, name)
            )
        except ClientException as exc:
            if exc.http_status == 404:
                return None
            raise self._failed(f"HEAD {key}", exc) from None
        return int(headers["content-length"])

    async def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            await self._call(f"DELETE {key}", lambda conn: conn.delete_object(self.container, name))
        except ClientException as exc:
            if exc.http_status != 404:
                raise self._failed(f"DELETE {key}", exc) from None

    async def list(self, prefix: str = "") -> list[str]:
        """Pages of 10,000 names; a retry resumes at the page that failed."""
        full = self.prefix + prefix
        keys: list[str] = []
        marker = ""
        while True:

            def page(conn: swiftclient.client.Connection, marker: str = marker) -> list[dict]:
                return conn.get_container(
                    self.container, prefix=full, marker=marker, limit=_LISTING_PAGE
                )[1]

            try:
                entries = await self._call(f"LIST {prefix or '*'}", page)
            except ClientException as exc:
                if exc.http_status == 404:
                    raise StoreError(
                        f"{self.url}: container {self.container!r} not found"
                    ) from None
                raise self._failed(f"LIST {prefix}", exc) from None
            if not entries:
                break
            keys.extend(e["name"][len(self.prefix) :] for e in entries)
            marker = entries[-1]["name"]
        return sorted(keys)

    async def barrier(self) -> None:
        """A Swift PUT is durable when it returns: nothing to wait for."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        while self._free:
            self._free.pop().close()

    # ------------------------------------------------------------------ administration

    async def create_container(self) -> None:
        """Create the container; an existing one is fine. Raises StoreError."""
        try:
            await self._call(
                f"PUT container {self.container}",
                lambda conn: conn.put_container(self.container),
            )
        except ClientException as exc:
            raise self._failed(f"PUT container {self.container}", exc) from None

    async def check(self) -> None:
        """Authenticate and HEAD the container. Raises StoreError with one line when the
        endpoint is unreachable, the credentials are refused or the container is missing."""
        try:
            await self._call(
                f"HEAD container {self.container}",
                lambda conn: conn.head_container(self.container),
            )
        except ClientException as exc:
            if exc.http_status == 404:
                raise StoreError(
                    f"{self.url}: container {self.container!r} not found (snapfs init creates it)"
                ) from None
            raise self._failed(f"HEAD container {self.container}", exc) from None

    def _scrub(self, text: object) -> str:
        """`text` on one line, without the user name or the key."""
        line = " ".join(str(text).split())[:200]
        for secret in (self._creds.key, self._creds.user):
            line = line.replace(secret, "***")
        return line

    def _failed(self, what: str, exc: ClientException) -> StoreError:
        return StoreError(f"{self.url}: {what} failed: {_reason(exc)}")

    def _put_failed(self, key: str, exc: ClientException) -> StoreError:
        if exc.http_status == 404:  # an object PUT finds no container
            return StoreError(
                f"{self.url}: container {self.container!r} not found (snapfs init creates it)"
            )
        return self._failed(f"PUT {key}", exc)
