"""Pure logic of tokens and limits (shardstate.common.auth, authwire, server/storage/usage.py):
token matching, the method policy, the token bucket, the token file's parsing and reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardstate.common import auth
from shardstate.common.authwire import MetadataChannel
from shardstate.common.errors import (
    InvalidArgumentError,
    LimitExceededError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from shardstate.server.storage.usage import delta
from shardstate.v1 import state_pb2, types_pb2

H = auth.hash_token


def table(*entries: str, limits: str = "") -> auth.Table:
    return auth.parse("\n".join(entries) + "\n" + limits)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_grant_covers_exact_names_and_prefixes_only() -> None:
    t = table(auth.token_entry(H("tok"), "write", ["default", "team-a/*"]))
    g = t.grants[H("tok")]
    assert g.role == auth.WRITE
    assert g.covers("default") and g.covers("team-a/x") and g.covers("team-a/")
    assert not g.covers("defaults") and not g.covers("team-b/x") and not g.covers("team-a")
    everything = table(auth.token_entry(H("all"), "read", ["*"])).grants[H("all")]
    assert everything.covers("anything") and everything.covers("default")
    nothing = table(auth.token_entry(H("none"), "admin", [])).grants[H("none")]
    assert not nothing.covers("default")


def test_denied_names_the_namespace_or_the_role_never_the_token() -> None:
    g = auth.Grant(auth.READ, frozenset({"a"}))
    assert auth.denied(g, "a", auth.READ, "Get") is None
    e = auth.denied(g, "a", auth.WRITE, "Put")
    assert isinstance(e, PermissionDeniedError) and "write" in e.message and "'a'" in e.message and "read" in e.message
    e = auth.denied(g, "b", auth.READ, "ops[2] get")
    assert e is not None and "'b'" in e.message and e.message.startswith("ops[2] get")
    admin = auth.Grant(auth.ADMIN, frozenset({"a"}))
    assert auth.denied(admin, "a", auth.WRITE, "Put") is None  # admin implies write and read


def test_the_method_policy() -> None:
    assert auth.method_role("/grpc.health.v1.Health/Check", True) == auth.OPEN
    assert auth.method_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False) == auth.OPEN
    assert auth.method_role("/shardstate.v1.State/Put", False) == auth.ANY
    assert auth.method_role("/shardstate.v1.Admin/GetClusterMap", True) == auth.ANY
    assert auth.method_role("/shardstate.v1.Admin/Status", False) == auth.ANY
    assert auth.method_role("/shardstate.v1.Admin/PromoteReplica", False) == auth.ADMIN
    assert auth.method_role("/shardstate.v1.Admin/PublishClusterMap", False) == auth.ADMIN
    assert auth.method_role("/shardstate.v1.Admin/PublishClusterMap", True) == auth.CLUSTER
    assert auth.method_role("/shardstate.v1.Admin/SwapClusterMap", True) == auth.CLUSTER
    assert auth.method_role("/shardstate.v1.Replication/Follow", True) == auth.CLUSTER
    assert auth.method_role("/some.Other/Thing", True) == auth.ADMIN
    state = state_pb2.DESCRIPTOR.services_by_name["State"]
    assert set(auth.METHOD_ROLE) | {"Batch", "Pipeline"} == {m.name for m in state.methods}
    assert set(auth.OP_ROLE) == {f.name for f in state_pb2.BatchOp.DESCRIPTOR.fields}
    assert {auth.OP_FIELD_NAME[f.number] for f in state_pb2.BatchOp.DESCRIPTOR.fields} == set(auth.OP_ROLE)


def test_the_authorizer_finds_tokens_by_hash_and_knows_the_cluster_token() -> None:
    src = auth.TokenSource(env_text=auth.token_entry(H("reader"), "read", ["default"]))
    a = auth.Authorizer(src, cluster_token="c" * 20)
    assert a.grant("reader").role == auth.READ
    assert a.grant("c" * 20).cluster
    for bad in (None, "", "nope"):
        with pytest.raises(UnauthenticatedError) as info:
            a.grant(bad)
        assert "nope" not in info.value.message
    gate = a.gate((("x", "y"), ("authorization", "Bearer reader")))
    assert gate.op("", auth.READ, "Get") is None  # "" is the namespace default
    assert isinstance(gate.op("default", auth.WRITE, "Put"), PermissionDeniedError)
    with pytest.raises(PermissionDeniedError):
        gate.method(auth.ADMIN, "PromoteReplica")
    with pytest.raises(PermissionDeniedError):
        gate.method(auth.CLUSTER, "Follow")
    a.gate((("authorization", "Bearer " + "c" * 20),)).method(auth.CLUSTER, "Follow")


def test_bearer_reads_the_authorization_entry() -> None:
    assert auth.bearer([("authorization", "Bearer abc")]) == "abc"
    assert auth.bearer([("authorization", "bearer  abc ")]) == "abc"
    assert auth.bearer([("authorization", b"Bearer abc")]) == "abc"
    assert auth.bearer([("authorization", "Basic abc")]) is None
    assert auth.bearer([("authorization", "Bearer ")]) is None
    assert auth.bearer(None) is None and auth.bearer([]) is None


def test_the_token_bucket_allows_a_burst_then_its_rate() -> None:
    b = auth.TokenBucket(5, now=0.0)
    assert sum(b.take(0.0) for _ in range(20)) == 5
    assert not b.take(0.1)
    assert b.take(0.2)  # 0.2 s at 5/s: one more
    assert not b.take(0.2)
    assert sum(b.take(100.0) for _ in range(20)) == 5  # saved up to the burst only
    slow = auth.TokenBucket(0.5, now=0.0)
    assert slow.take(0.0) and not slow.take(1.0) and slow.take(2.0)


def test_ops_per_s_is_per_namespace_and_the_error_names_the_limit() -> None:
    clock = Clock()
    text = auth.token_entry(H("t"), "write", ["*"]) + "[namespace.slow]\nmax_ops_per_s = 2\n"
    a = auth.Authorizer(auth.TokenSource(env_text=text, clock=clock), "", clock=clock)
    gate = a.gate([("authorization", "Bearer t")])
    results = [gate.op("slow", auth.READ, "Get") for _ in range(5)]
    assert results[:2] == [None, None]
    err = results[2]
    assert isinstance(err, LimitExceededError) and err.limit == "max_ops_per_s"
    assert "'slow'" in err.message and "max_ops_per_s=2" in err.message
    assert all(gate.op("other", auth.READ, "Get") is None for _ in range(100))  # another namespace: no limit
    clock.t += 1.0
    assert gate.op("slow", auth.READ, "Get") is None
    cluster = auth.Gate(a, auth.CLUSTER_GRANT)
    assert all(cluster.op("slow", auth.WRITE, "Put") is None for _ in range(10))  # never limited


@pytest.mark.parametrize(("text", "words"), [
    ("[[token]\n", "not valid TOML"),
    ("token = 3\n", "array of tables"),
    ("[[token]]\nsha256 = 'sst_plain-token'\nrole = 'read'\n", "64 hex digits"),
    (f"[[token]]\nsha256 = '{'a' * 64}'\nrole = 'root'\n", "role must be one of read, write, admin"),
    (f"[[token]]\nsha256 = '{'a' * 64}'\nrole = 'read'\nnamespaces = 'default'\n", "namespaces must be a list"),
    (f"[[token]]\nsha256 = '{'a' * 64}'\nrole = 'read'\nnamespaces = ['a*b']\n", "'*' may only end"),
    (f"[[token]]\nsha256 = '{'a' * 64}'\nrole = 'read'\ntoken = 'x'\n", "unknown key(s) token"),
    (f"[[token]]\nsha256 = '{'a' * 64}'\nrole = 'read'\n[[token]]\nsha256 = '{'A' * 64}'\nrole = 'read'\n", "twice"),
    ("[namespace.a]\nmax_sessions = -1\n", "max_sessions must be a number >= 0"),
    ("[namespace.a]\nmax_ops_per_s = 'fast'\n", "max_ops_per_s must be a number"),
    ("[namespace.a]\nmax_keys = 3\n", "unknown key(s) max_keys"),
    ("[tokens]\n", "unknown top-level key(s) tokens"),
])
def test_a_bad_token_file_is_refused_naming_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        auth.parse(text, "tokens.toml")
    assert words in info.value.message and "tokens.toml" in info.value.message
    assert "sst_plain-token" not in info.value.message


def test_limits_parse_and_are_looked_up_by_exact_namespace() -> None:
    t = table(limits="[namespace.a]\nmax_sessions = 3\nmax_bytes = 100\nmax_ops_per_s = 2.5\n[namespace.b]\n")
    assert t.limits["a"] == auth.NamespaceLimits(3, 100, 2.5) and t.limits["a"].stored
    assert t.limits["b"] == auth.NamespaceLimits() and not t.limits["b"].stored


def test_the_token_file_is_reloaded_when_it_changes_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(auth.token_entry(H("one"), "read", ["default"]))
    clock = Clock()
    src = auth.TokenSource(str(path), clock=clock)
    a = auth.Authorizer(src, clock=clock)
    assert a.grant("one")
    path.write_text(auth.token_entry(H("two"), "write", ["default"]))
    assert a.grant("one")  # not looked at again within the second
    clock.t += 1.0
    assert a.grant("two").role == auth.WRITE
    with pytest.raises(UnauthenticatedError):
        a.grant("one")
    path.write_text("[[token]]\nrole = 'oops'\n")  # broken: the last good tokens stay
    clock.t += 1.0
    assert a.grant("two")
    os.unlink(path)  # gone: the same
    clock.t += 1.0
    assert a.grant("two")


def test_from_config_needs_a_cluster_token_when_auth_is_on(tmp_path: Path) -> None:
    assert auth.from_config("", "", env={}) == (None, "")
    text = auth.token_entry(H("x"), "read", ["a"])
    with pytest.raises(InvalidArgumentError, match="cluster token"):
        auth.from_config("", "", env={auth.TOKENS_ENV: text})
    with pytest.raises(InvalidArgumentError, match="at least 16"):
        auth.from_config("", "", env={auth.TOKENS_ENV: text, auth.CLUSTER_TOKEN_ENV: "short"})
    (tmp_path / "c").write_text("k" * 20 + "\n")
    a, cluster = auth.from_config("", str(tmp_path / "c"), env={auth.TOKENS_ENV: text})
    assert a is not None and cluster == "k" * 20 and a.grant("x").role == auth.READ
    with pytest.raises(InvalidArgumentError, match="cannot read the token file"):
        auth.from_config(str(tmp_path / "missing.toml"), str(tmp_path / "c"), env={})


def test_a_metadata_channel_adds_its_metadata_to_every_call() -> None:
    seen: list[object] = []

    class Fake:
        def unary_unary(self, method: str) -> object:
            return lambda req, metadata=None, **kw: seen.append((method, metadata))

        stream_stream = unary_stream = stream_unary = unary_unary

        def close(self) -> None:
            seen.append("closed")

    ch = MetadataChannel(Fake(), auth.metadata_for("tok"))
    ch.unary_unary("/a")(b"")
    ch.stream_stream("/b")(b"", metadata=(("traceparent", "x"),))
    ch.close()
    assert seen == [("/a", (("authorization", "Bearer tok"),)),
                    ("/b", (("traceparent", "x"), ("authorization", "Bearer tok"))), "closed"]


def test_usage_delta_counts_sessions_and_bytes() -> None:
    m = types_pb2.SessionInfo
    assert delta("a", None, m(bytes=10)) == ("a", 1, 10)
    assert delta("a", m(bytes=10), m(bytes=25)) == ("a", 0, 15)
    assert delta("a", m(bytes=10), None) == ("a", -1, -10)
    assert delta("a", m(bytes=10), m(bytes=10)) is None
