"""One set of test bodies for every store: the contract of snapfs/store/base.py.

MemoryStore, LocalStore (a tmp_path) and SwiftStore (a fresh container in the loopback
Swift of tests/swift_fixtures.py) must behave alike. Swift-only behaviour (credentials,
authentication, retries) follows at the end.
"""

import logging
import os

import pytest
import trio

from snapfs.errors import AlreadyExists, InvalidArgument, ObjectNotFound, StoreError
from snapfs.store import LocalStore, MemoryStore, open_store
from snapfs.store.swift import SwiftStore

MiB = 1024 * 1024


@pytest.fixture(params=["memory", "local", pytest.param("swift", marks=pytest.mark.swift)])
def store_kind(request):
    return request.param


@pytest.fixture
def make_store(store_kind, request, tmp_path):
    if store_kind == "memory":
        return MemoryStore
    if store_kind == "local":
        return lambda: LocalStore(str(tmp_path / "store"))
    env = request.getfixturevalue("swift_env")
    url = env["new_container_url"]()
    return lambda: SwiftStore.from_url(url)


@pytest.fixture
async def store(make_store):
    s = make_store()
    if isinstance(s, SwiftStore):
        await s.create_container()
    yield s
    await s.aclose()


async def test_put_get_whole_and_ranged(store):
    data = bytes(range(256)) * 4
    await store.put("a/b", data)
    assert await store.get("a/b") == data
    assert await store.get("a/b", 10) == data[10:]
    assert await store.get("a/b", 10, 20) == data[10:30]
    assert await store.get("a/b", 0, 5) == data[:5]
    assert await store.get("a/b", 1000, 100) == data[1000:]  # a range past the end is cut
    assert await store.get("a/b", len(data)) == b""
    assert await store.get("a/b", 5000, 10) == b""
    assert await store.get("a/b", 3, 0) == b""


async def test_empty_object(store):
    await store.put("empty", b"")
    assert await store.get("empty") == b""
    assert await store.head("empty") == 0


async def test_head(store):
    assert await store.head("x/y") is None
    await store.put("x/y", b"12345")
    assert await store.head("x/y") == 5


async def test_delete(store):
    await store.delete("never/was")  # absent is not an error
    await store.put("k", b"v")
    await store.delete("k")
    assert await store.head("k") is None
    with pytest.raises(ObjectNotFound):
        await store.get("k")
    await store.delete("k")


async def test_list_prefix_sorted(store):
    keys = ["b/2", "a/1", "a/10", "a/2", "ab", "c.x", "a/3/deeper"]
    for key in keys:
        await store.put(key, key.encode())
    assert await store.list() == sorted(keys)
    assert await store.list("a/") == ["a/1", "a/10", "a/2", "a/3/deeper"]
    assert await store.list("a") == sorted(k for k in keys if k.startswith("a"))
    assert await store.list("zz") == []


async def test_overwrite_same_key(store):
    await store.put("k", b"first value")
    await store.put("k", b"second")
    assert await store.get("k") == b"second"
    assert await store.head("k") == len(b"second")
    assert await store.list() == ["k"]


async def test_missing_get_raises(store):
    with pytest.raises(ObjectNotFound):
        await store.get("no/such")
    with pytest.raises(ObjectNotFound):
        await store.get("no/such", 5, 10)
    with pytest.raises(ObjectNotFound):
        await store.get("no/such", 5, 0)


BAD_KEYS = ["../x", "", "a//b", "/abs", "a/../b", "a/./b", ".hidden", "sp ace"]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_key_put(store, key):
    with pytest.raises(InvalidArgument):
        await store.put(key, b"x")
    assert await store.list() == []


@pytest.mark.parametrize("key", ["../x", "", "a//b"])
async def test_invalid_key_read(store, key):
    for call in (store.get, store.head, store.delete):
        with pytest.raises(InvalidArgument):
            await call(key)


async def test_large_object(store):
    data = os.urandom(4 * MiB)
    await store.put("big", data)
    assert await store.head("big") == len(data)
    assert await store.get("big") == data
    assert await store.get("big", MiB + 3, MiB) == data[MiB + 3 : 2 * MiB + 3]


async def test_concurrent_puts(store):
    blobs = {f"c/{i:02d}": os.urandom(1000 + 997 * i) for i in range(20)}
    async with trio.open_nursery() as nursery:
        for key, data in blobs.items():
            nursery.start_soon(store.put, key, data)
    got = {}

    async def fetch(key):
        got[key] = await store.get(key)

    async with trio.open_nursery() as nursery:
        for key in blobs:
            nursery.start_soon(fetch, key)
    assert got == blobs
    assert await store.list("c/") == sorted(blobs)


async def test_put_counters(store):
    await store.put("p/1", b"abc")
    await store.put("p/2", b"defgh")
    assert (store.puts, store.bytes_put) == (2, 8)


# ---------------------------------------------------------------- Swift only

SECRET = "s3cret-Key-that-must-never-show-0123456789"


def _swift(url, **options):
    return SwiftStore.from_url(url, **options)


@pytest.mark.swift
async def test_swift_prefix_url_isolates_keys(swift_env):
    url = swift_env["new_container_url"]()
    outer = _swift(url)
    await outer.create_container()
    inner = _swift(f"{url}/vol/one")
    await inner.put("k", b"inner")
    await outer.put("k", b"outer")
    assert await inner.list() == ["k"]
    assert await inner.get("k") == b"inner"
    assert await outer.list() == ["k", "vol/one/k"]
    assert inner.url == f"{url}/vol/one"


@pytest.mark.swift
async def test_swift_statistics(swift_env):
    s = _swift(swift_env["new_container_url"]())
    await s.create_container()
    await s.create_container()  # idempotent
    await s.check()
    await s.put("a", b"12345")
    await s.get("a")
    await s.get("a", 1, 2)
    stats = s.statistics()
    assert (stats.puts, stats.bytes_put, stats.gets, stats.bytes_got) == (1, 5, 2, 7)
    assert stats.retries == 0
    with pytest.raises(AttributeError):
        stats.puts = 3


@pytest.mark.swift
async def test_swift_wrong_password(swift_env, caplog):
    caplog.set_level(logging.DEBUG)
    env = {"ST_AUTH": swift_env["ST_AUTH"], "ST_USER": swift_env["ST_USER"], "ST_KEY": SECRET}
    s = _swift(swift_env["new_container_url"](), environ=env)
    for op in (s.check, lambda: s.put("k", b"v"), lambda: s.get("k")):
        with pytest.raises(StoreError) as info:
            await op()
        text = str(info.value)
        assert "authentication failed" in text
        assert "\n" not in text
        assert SECRET not in text and SECRET[:4] not in text
        assert swift_env["ST_USER"] not in text
    assert SECRET[:4] not in caplog.text
    assert swift_env["ST_USER"] not in caplog.text


@pytest.mark.swift
async def test_swift_token_expiry_reauthenticates(swift_env):
    """Tokens live in memcached: flushing it expires every token at once. A PUT (whose body
    must be sent again) and a GET then each meet a 401 and must succeed after a new login."""
    s = _swift(swift_env["new_container_url"]())
    await s.create_container()
    await s.put("before", b"1")
    port = int(await trio.Path(swift_env["dir"], "run", "memcached.port").read_text())
    async with await trio.open_tcp_stream("127.0.0.1", port) as memcached:
        await memcached.send_all(b"flush_all\r\n")
        assert (await memcached.receive_some(100)).startswith(b"OK")
    await s.put("after", b"2" * 100_000)
    assert s.statistics().retries == 1  # the PUT: swiftclient could not rewind its body
    assert await s.get("after") == b"2" * 100_000
    await s.put("again", b"3")
    assert await s.get("before") == b"1"


class FlakyProxy:
    """A TCP relay in front of the real Swift that fails on demand: `fail_requests` next
    requests get a 503 and a closed connection; `cut_get_after` cuts the response to the
    next GET after that many bytes (a body cut mid-way)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.fail_requests = 0
        self.cut_get_after = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client):
        cut = [None]
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:

            async def upstream():
                async for chunk in client:
                    if chunk[:4] in (b"GET ", b"PUT ", b"HEAD", b"DELE"):
                        if self.fail_requests:
                            self.fail_requests -= 1
                            await client.send_all(
                                b"HTTP/1.1 503 Service Unavailable\r\n"
                                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                            )
                            nursery.cancel_scope.cancel()
                            return
                        if chunk.startswith(b"GET ") and self.cut_get_after is not None:
                            cut[0], self.cut_get_after = self.cut_get_after, None
                    await server.send_all(chunk)

            async def downstream():
                async for chunk in server:
                    if cut[0] is not None:
                        await client.send_all(chunk[: cut[0]])
                        if len(chunk) >= cut[0]:
                            nursery.cancel_scope.cancel()
                            return
                        cut[0] -= len(chunk)
                        continue
                    await client.send_all(chunk)
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upstream)
                nursery.start_soon(downstream)


@pytest.mark.swift
async def test_swift_retries_transient_failures(swift_env, nursery):
    proxy = FlakyProxy(swift_env["port"])
    port = await nursery.start(proxy.run)
    env = {"ST_USER": swift_env["ST_USER"], "ST_KEY": swift_env["ST_KEY"]}  # auth via proxy
    name = swift_env["new_container_url"]().rsplit("/", 1)[1]
    s = _swift(f"swift://127.0.0.1:{port}/{name}", environ=env, initial_backoff=0.01)
    await s.create_container()
    data = os.urandom(MiB)
    proxy.fail_requests = 2
    await s.put("k", data)
    assert s.statistics().retries == 2
    proxy.cut_get_after = 100_000  # headers and part of the body
    assert await s.get("k") == data
    assert s.statistics().retries == 3
    proxy.fail_requests = 2
    assert await s.head("k") == MiB
    assert await s.list() == ["k"]
    proxy.fail_requests = 100
    with pytest.raises(StoreError, match="after 3 tries: HTTP 503"):
        await _swift(
            f"swift://127.0.0.1:{port}/{name}", environ=env, max_tries=3, initial_backoff=0.01
        ).get("k")


@pytest.mark.swift
async def test_swift_unknown_container(swift_env):
    url = swift_env["new_container_url"]()
    s = _swift(url)
    with pytest.raises(StoreError) as info:
        await s.check()
    name = url.rsplit("/", 1)[1]
    assert "not found" in str(info.value) and name in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match="not found"):
        await s.list()


@pytest.mark.swift
async def test_swift_unreachable_host(caplog):
    # no swift_env needed: port 1 refuses connections; ST_AUTH comes from the URL
    env = {"ST_USER": "test:tester", "ST_KEY": SECRET}
    s = _swift("swift://127.0.0.1:1/c", environ=env, max_tries=3, initial_backoff=0.01)
    with trio.fail_after(20):
        with pytest.raises(StoreError) as info:
            await s.put("k", b"v")
    text = str(info.value)
    assert "swift://127.0.0.1:1/c" in text and "after 3 tries" in text
    assert "refused" in text.lower()
    assert SECRET not in text and "\n" not in text
    assert s.statistics().retries == 2
    warnings = [r for r in caplog.records if r.name == "snapfs.store"]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert SECRET[:4] not in caplog.text


def test_swift_credentials_never_shown():
    env = {"ST_AUTH": "http://127.0.0.1:1/auth/v1.0", "ST_USER": "acct:someone", "ST_KEY": SECRET}
    s = SwiftStore.from_url("swift://127.0.0.1:1/box/pre", environ=env)
    for shown in (s.url, repr(s), str(s)):
        assert SECRET not in shown and "someone" not in shown
    assert s.url == "swift://127.0.0.1:1/box/pre"
    assert SECRET not in repr(vars(s))


def test_swift_missing_credentials():
    with pytest.raises(InvalidArgument) as info:
        SwiftStore.from_url("swift://127.0.0.1:1/box", environ={})
    assert "ST_USER" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InvalidArgument):
        SwiftStore.from_url("swift://127.0.0.1:1/box", environ={"ST_USER": "a:b"})


def test_swift_credentials_in_url_refused():
    for call in (open_store, SwiftStore.from_url):
        with pytest.raises(InvalidArgument) as info:
            call("swift://someone:pw-in-url@127.0.0.1:1/c")
        assert "pw-in-url" not in str(info.value) and "someone" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["swift://127.0.0.1:1/", "swift://127.0.0.1:1/c?x=1", "swift://127.0.0.1:99999/c"]
)
def test_swift_bad_urls(url):
    with pytest.raises(InvalidArgument):
        SwiftStore.from_url(url, environ={"ST_USER": "a:b", "ST_KEY": SECRET})


async def test_put_new_is_conditional(store):
    await store.put_new("catalog/0001", b"first")
    await store.put_new("catalog/0001", b"first")  # a retried put of the same bytes is fine
    with pytest.raises(AlreadyExists):
        await store.put_new("catalog/0001", b"second")
    assert await store.get("catalog/0001") == b"first"
    assert await store.list("catalog/") == ["catalog/0001"]


async def test_get_ranges(store):
    await store.put("r/one", bytes(range(200)))
    await store.put("r/two", b"x" * 50)
    got = await store.get_ranges([("r/one", 10, 5), ("r/two", 0, 50), ("r/one", 190, 100)])
    assert got == [bytes(range(10, 15)), b"x" * 50, bytes(range(190, 200))]
    assert await store.get_ranges([]) == []
    with pytest.raises(ObjectNotFound):
        await store.get_ranges([("r/one", 0, 1), ("r/missing", 0, 1)])


def test_swift_keystone_credentials_from_os_variables(monkeypatch):
    """OS_* variables select Keystone v3, as the swift CLI does (no Keystone runs here, so
    this stops at the options handed to python-swiftclient)."""
    from snapfs.store import swift

    env = {"OS_AUTH_URL": "https://keystone:5000/v3", "OS_USERNAME": "u",
           "OS_PASSWORD": "secret", "OS_PROJECT_NAME": "p", "OS_REGION_NAME": "r1"}  # fmt: skip
    with pytest.raises(InvalidArgument, match="OS_PROJECT_NAME"):
        swift._credentials_from_env({**env, "OS_PROJECT_NAME": ""}, "h:8080", False)
    monkeypatch.setattr(swift.importlib.util, "find_spec", lambda name: object())
    creds = swift._credentials_from_env(env, "h:8080", False)
    assert (creds.auth_url, creds.auth_version) == ("https://keystone:5000/v3", "3")
    assert creds.os_options == {"project_name": "p", "user_domain_name": "Default",
                                "project_domain_name": "Default", "region_name": "r1"}  # fmt: skip
    assert "secret" not in repr(creds) and "'u'" not in repr(creds)
    monkeypatch.setattr(swift.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InvalidArgument, match="keystoneclient"):
        swift._credentials_from_env(env, "h:8080", False)
