"""TLS for shardstate's channels and ports: `TlsFiles` (a CA, a certificate and its key in PEM
files), the channel credentials made from them, server credentials that reload the files when
they change, and `channel()` / `aio_channel()`, the one way a process opens a channel to a node.

Server side: `server_credentials()` hands grpc a fetcher it calls before every new connection's
handshake; the fetcher looks at the files' (mtime, size) and re-reads them only when those
changed, so a replaced certificate is served to the next connection without a restart.
Connections already open keep the certificate they were made with. A half-written pair (a new
certificate, the old key) is not taken: the old pair stays until the pair matches.

Client side: credentials are read when a channel is opened (cached while the files are
unchanged); an open channel, and its reconnects, keep what it was opened with.

Shared by the client library, the router and the shard: grpcio and the standard library only.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from shardstate.common.errors import InvalidArgumentError

log = logging.getLogger("shardstate.tls")

# The subject common name that makes a certificate a cluster (node) certificate by default.
DEFAULT_NODE_NAME = "shardstate-node"
# What grpc's auth context calls the peer certificate's subject CN.
COMMON_NAME = "x509_common_name"

Stamp = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: `ca` the certificate authority to trust (a client without one trusts the
    system's roots), `cert` and `key` this side's certificate chain and private key (optional
    for a client talking to routers; required for a server, and for a client of a shard)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.ca, self.cert, self.key) if p)

    def validate(self, server: bool = False) -> None:
        """InvalidArgumentError naming what is missing, unreadable or mismatched."""
        if bool(self.cert) != bool(self.key):
            have, missing = ("certificate", "key") if self.cert else ("key", "certificate")
            raise InvalidArgumentError(f"a TLS {have} file needs its {missing} file too "
                                       "(--tls-cert and --tls-key / cert_file and key_file go together)")
        if server and not (self.ca and self.cert):
            raise InvalidArgumentError("TLS on a server needs all three files: --tls-ca, --tls-cert and --tls-key")
        for p in self.paths:
            if not os.path.isfile(p):
                raise InvalidArgumentError(f"TLS file {p} does not exist")
            if not os.access(p, os.R_OK):
                raise InvalidArgumentError(f"TLS file {p} is not readable by this process")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, ValueError) as e:
                raise InvalidArgumentError(f"TLS CA file {self.ca} holds no PEM certificate ({e})") from None
        if self.cert:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except ssl.SSLError as e:
                raise InvalidArgumentError(f"TLS certificate {self.cert} and key {self.key} are not a matching "
                                           f"PEM pair ({e.reason or e})") from None

    def stamp(self) -> Stamp:
        """(mtime_ns, size) of each file: what tells a changed file (OSError when one is gone)."""
        out = []
        for p in self.paths:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(ca, cert, key) as bytes, None for a file not given."""
        def one(p: str) -> bytes | None:
            if not p:
                return None
            with open(p, "rb") as f:
                return f.read()

        return one(self.ca), one(self.cert), one(self.key)

    # ---- credentials ----

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """For a channel to a TLS server: trust `ca`, present `cert` when given."""
        return _channel_credentials(self)

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """For a listening port: serves `cert`; with `require_client_auth` the peer must present
        a certificate `ca` signed (mTLS), else no client certificate is asked for (grpc's Python
        API cannot ask for one without requiring it). Reloads the files when they change."""
        reloader = Reloader(self)
        return grpc.dynamic_ssl_server_credentials(
            reloader.initial, reloader, require_client_authentication=require_client_auth)


class Reloader:
    """The certificate fetcher grpc calls before each new connection's handshake: a new
    configuration when the files changed (and still make a matching pair), else None."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp = files.stamp()
        self.initial = self._config()
        self.reloads = 0

    def _config(self) -> Any:
        ca, cert, key = self.files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> Any:
        try:
            stamp = self.files.stamp()
        except OSError:
            return None  # a file is being replaced: keep serving the current pair
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                self.files.validate(server=True)
                config = self._config()
                if self.files.stamp() != stamp:
                    return None  # changed while being read: look again at the next connection
            except (InvalidArgumentError, OSError) as e:
                log.warning("TLS files changed but cannot be used yet; serving the previous certificate",
                            extra={"fields": {"error": getattr(e, "message", str(e))}})
                return None
            self._stamp = stamp
            self.reloads += 1
        log.info("TLS certificate reloaded", extra={"fields": {"cert": self.files.cert}})
        return config


_creds_lock = threading.Lock()
_creds: dict[TlsFiles, tuple[Stamp, grpc.ChannelCredentials]] = {}


def _channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials from the files as they are now; while they are being replaced (a file gone,
    a certificate beside the old key) the last good ones, if this process has any."""
    with _creds_lock:
        hit = _creds.get(files)
    try:
        stamp = files.stamp()
        if hit is not None and hit[0] == stamp:
            return hit[1]
        files.validate()
        ca, cert, key = files.read()
    except (OSError, InvalidArgumentError) as e:
        if hit is not None:
            return hit[1]
        if isinstance(e, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"TLS file unreadable: {e}") from None
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with _creds_lock:
        _creds[files] = (stamp, creds)
    return creds


def client_credentials(credentials: grpc.ChannelCredentials | None, ca_file: Any, cert_file: Any,
                       key_file: Any, direct: bool = False) -> grpc.ChannelCredentials | None:
    """What a Client connects with: `credentials` as given, or made from the files (checked
    now, so a wrong path fails at construction and names the file). Direct mode talks to
    shards, which require a client certificate: it needs cert_file and key_file too."""
    if not (ca_file or cert_file or key_file):
        return credentials
    if credentials is not None:
        raise InvalidArgumentError("give either credentials= or ca_file=/cert_file=/key_file=, not both")
    files = TlsFiles(ca=os.fspath(ca_file or ""), cert=os.fspath(cert_file or ""), key=os.fspath(key_file or ""))
    files.validate()
    if direct and not files.cert:
        raise InvalidArgumentError("direct=True with TLS needs cert_file= and key_file=: shards accept only "
                                   "clients presenting a certificate of the cluster's CA")
    return files.channel_credentials()


# ---- this process's outgoing channels ----

_outgoing: TlsFiles | None = None


def use(files: TlsFiles | None) -> None:
    """Set the TLS files this process's channels to nodes use (None: plaintext). Called once by
    each entry point (shard, router, CLI) after reading its flags, never on import."""
    global _outgoing
    _outgoing = files


def outgoing() -> TlsFiles | None:
    return _outgoing


class _Process:
    """Default of `tls=`: this process's setting (use())."""


PROCESS: Any = _Process()


def _resolve(tls: TlsFiles | _Process | None) -> TlsFiles | None:
    return _outgoing if isinstance(tls, _Process) else tls


def channel(address: str, options: Sequence[tuple[str, Any]] = (), *,
            tls: TlsFiles | _Process | None = PROCESS) -> grpc.Channel:
    """A blocking channel to `address`: TLS with `tls` (default: this process's files), else
    plaintext."""
    files = _resolve(tls)
    if files is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, files.channel_credentials(), options=list(options))


def aio_channel(address: str, options: Sequence[tuple[str, Any]] = (), *,
                interceptors: Sequence[Any] | None = None,
                tls: TlsFiles | _Process | None = PROCESS) -> grpc.aio.Channel:
    """The grpc.aio twin of `channel()`."""
    files = _resolve(tls)
    if files is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, files.channel_credentials(), options=list(options),
                                   interceptors=interceptors)


def add_port(server: Any, listen: str, files: TlsFiles | None, require_client_auth: bool) -> int:
    """Bind `listen` on a grpc (or grpc.aio) server: TLS with `files`, else plaintext; the port."""
    if files is None:
        return int(server.add_insecure_port(listen))
    return int(server.add_secure_port(listen, files.server_credentials(require_client_auth)))


def peer_common_name(context: Any) -> str:
    """The subject CN of the peer's verified certificate ("" when it presented none)."""
    values = context.auth_context().get(COMMON_NAME) or ()
    for v in values:
        return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return ""
