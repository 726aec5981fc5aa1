"""Tunnel configuration files: one TOML file per tunnel, in the shape wg-quick users know.

::

    # /etc/simpletun/st0.toml  ->  `simpletun up st0`
    [interface]
    name = "st0"                     # default: the file's stem
    mode = "tun"                     # or "tap"
    address = ["10.0.0.1/24"]
    listen_port = 55555              # a server listens; a client has a peer endpoint instead
    listen_address = "192.0.2.1"     # optional (server): bind to this address only
    key_file = "/etc/simpletun/st0.key"   # or: plaintext = true
    cipher = "aes-128-cbc"
    mtu = 1400                       # optional
    transport = "tcp"                # or "udp" (ESP-in-UDP, port 4500) or "raw" (ESP)
    dataplane = "userspace"          # or "kernel" (xfrm; udp/raw, needs manual_keys_file)
    queues = 1                       # userspace: TUN queues, one device thread each (1-#CPUs)
    post_up = ["iptables -A FORWARD -i %i -j ACCEPT"]    # run by /bin/sh; %i = the device
    pre_down = ["iptables -D FORWARD -i %i -j ACCEPT"]

    [[peer]]
    endpoint = "198.51.100.7:55555"  # client: the server to connect to ([v6]:port for IPv6)
    allowed_ips = ["10.1.0.0/16", "0.0.0.0/0"]   # routed through the tunnel
    persistent_keepalive = 25        # seconds (TCP keepalive probes on the connection)

Everything a user wrote is checked by the same ``simpletun.config`` checks the command line
uses; a problem is one :class:`ConfigFileError` line naming the file, the line, the key and the
fix (the CLI prints it and exits 2).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from simpletun import keys
from simpletun._core import ESP_IN_UDP_PORT
from simpletun._errors import ConfigError
from simpletun.config import (
    DATAPLANES,
    DEFAULT_PORT,
    Config,
    check_address,
    check_cipher,
    check_host,
    check_ifname,
    check_mtu,
    check_port,
    check_queues,
    check_rekey_limit,
    check_route,
    default_mtu,
)
from simpletun.handshake import DEFAULT_CIPHER

CONFIG_DIR_ENV = "SIMPLETUN_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "/etc/simpletun"

INTERFACE_KEYS = {
    "name": str,
    "mode": str,
    "address": list,
    "listen_port": int,
    "listen_address": str,
    "key_file": str,
    "manual_keys_file": str,
    "plaintext": bool,
    "cipher": str,
    "mtu": int,
    "transport": str,
    "dataplane": str,
    "queues": int,
    "post_up": list,
    "pre_down": list,
    # IKEv2 (key_exchange = "ikev2"; see README "IKEv2 peers")
    "key_exchange": str,
    "private_key_file": str,
    "local_id": str,
}
PEER_KEYS = {
    "name": str,
    "endpoint": str,
    "allowed_ips": list,
    "persistent_keepalive": int,
    # IKEv2 only
    "identity": str,
    "auth": str,
    "psk_file": str,
    "public_key": str,
    "local_ips": list,
    "rekey_time": int,
    "ike_rekey_time": int,
    "dpd_delay": int,
    "rekey_packets": int,
    "rekey_bytes": int,
}
IKE_ONLY_PEER_KEYS = (
    "identity", "auth", "psk_file", "public_key", "local_ips", "rekey_time", "ike_rekey_time",
    "dpd_delay", "rekey_packets", "rekey_bytes",
)  # fmt: skip
KEY_EXCHANGES = ("psk", "ikev2")
TRANSPORTS = ("tcp", "udp", "raw")


class ConfigFileError(ConfigError):
    """A problem in a config file; the message names the file, line and key."""


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV, DEFAULT_CONFIG_DIR))


def resolve(name_or_path: str) -> Path:
    """``st0`` → ``/etc/simpletun/st0.toml``; a path (with ``/`` or ``.toml``) is taken as is."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        return Path(name_or_path)
    check_ifname(name_or_path)
    return config_dir() / f"{name_or_path}.toml"


@dataclass(frozen=True)
class Peer:
    name: str | None
    endpoint: tuple[str, int] | None
    allowed_ips: tuple
    persistent_keepalive: int | None


@dataclass(frozen=True)
class TunnelFile:
    """A parsed config file: the :class:`Config` to run, and what only the file carries."""

    path: Path
    config: Config
    peers: tuple[Peer, ...]
    post_up: tuple[str, ...] = ()
    pre_down: tuple[str, ...] = ()
    key_file: str | None = None

    @property
    def name(self) -> str:
        return self.config.ifname


class _Where:
    """Builds error messages that point at the file, line and key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None, index: int = 0) -> int | None:
        header = re.compile(r"^\s*\[\[?\s*" + re.escape(table) + r"\s*\]\]?\s*(#.*)?$")
        seen = -1
        in_table = False
        for no, line in enumerate(self.lines, 1):
            if line.lstrip().startswith("["):
                in_table = bool(header.match(line))
                if in_table:
                    seen += 1
                    if key is None and seen == index:
                        return no
                continue
            if in_table and seen == index and key is not None:
                if re.match(r"^\s*" + re.escape(key) + r"\s*=", line):
                    return no
        return None

    def error(self, table: str, key: str | None, message: str, index: int = 0) -> ConfigFileError:
        no = self.line_of(table, key, index)
        at = f"{self.path}" + (f":{no}" if no else "")
        section = "[interface]" if table == "interface" else f"[[peer]] #{index + 1}"
        where = f"{section} {key}" if key else section
        return ConfigFileError(f"{at}: {where}: {message}")


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list"}[t]


def _check_table(w: _Where, table: str, data: dict, known: dict, index: int = 0) -> None:
    for key, value in data.items():
        if key not in known:
            raise w.error(
                table,
                key,
                f"unknown key (known keys: {', '.join(known)})",
                index,
            )
        want = known[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            shown = repr(value) if not isinstance(value, dict) else "a table"
            raise w.error(table, key, f"must be {_type_name(want)}, got {shown}", index)


def _strings(w: _Where, table: str, key: str, values: list, index: int = 0) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise w.error(table, key, "must be a list of strings", index)
    return values


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (default port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"endpoint {text!r}: missing ']' after the IPv6 address")
        host = check_host(f"[{host}]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"endpoint {text!r}: expected ':PORT' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        host = check_host(host)
    else:
        host, port_text = check_host(text), ""
    if not port_text:
        return host, 0  # the transport's default port, filled in by loads()
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ConfigError(f"endpoint {text!r}: port {port_text!r} is not a number") from None
    return host, check_port(port)


def loads(text: str, path: Path) -> TunnelFile:
    w = _Where(path, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from None
    unknown = [k for k in doc if k not in ("interface", "peer")]
    if unknown:
        raise ConfigFileError(
            f"{path}: unknown table [{unknown[0]}] (a file has [interface] and [[peer]] tables)"
        )
    iface = doc.get("interface")
    if not isinstance(iface, dict):
        raise ConfigFileError(f"{path}: no [interface] table (it names the device and addresses)")
    peers_raw = doc.get("peer", [])
    if not isinstance(peers_raw, list):
        raise ConfigFileError(f"{path}: write peers as [[peer]] tables (double brackets)")
    _check_table(w, "interface", iface, INTERFACE_KEYS)
    for i, p in enumerate(peers_raw):
        _check_table(w, "peer", p, PEER_KEYS, i)

    def check(key, fn, value, table="interface", index=0):
        try:
            return fn(value)
        except ConfigError as e:
            raise w.error(table, key, str(e), index) from None

    kx = iface.get("key_exchange", "psk")
    if kx not in KEY_EXCHANGES:
        raise w.error("interface", "key_exchange", f'must be "psk" or "ikev2", got {kx!r}')
    if kx == "ikev2":
        return _loads_ikev2(w, path, iface, peers_raw, check)
    for key in ("private_key_file", "local_id"):
        if key in iface:
            raise w.error("interface", key, 'needs key_exchange = "ikev2"')
    for i, p in enumerate(peers_raw):
        for key in IKE_ONLY_PEER_KEYS:
            if key in p:
                raise w.error("peer", key, 'needs key_exchange = "ikev2" in [interface]', i)

    name, mode, addresses = _device(w, path, iface, check)
    transport = iface.get("transport", "tcp")
    if transport not in TRANSPORTS:
        raise w.error(
            "interface",
            "transport",
            f"{transport!r} is not available in this version (only {', '.join(TRANSPORTS)})",
        )
    dataplane = iface.get("dataplane", "userspace")
    if dataplane not in DATAPLANES:
        raise w.error(
            "interface",
            "dataplane",
            f"{dataplane!r} is not available in this version (only {', '.join(DATAPLANES)})",
        )
    plaintext = iface.get("plaintext", False)
    key_file = iface.get("key_file")
    mk_file = iface.get("manual_keys_file")
    if mk_file is not None and not Path(mk_file).is_absolute():
        mk_file = str(path.parent / mk_file)
    if plaintext and key_file is not None:
        raise w.error("interface", "key_file", "plaintext = true and key_file exclude each other")
    if mk_file is not None:
        for other in ("key_file", "plaintext", "cipher"):
            if other in iface:
                raise w.error(
                    "interface", other,
                    "does not go with manual_keys_file (the key file has the keys and cipher, "
                    "and there is no handshake); remove it",
                )  # fmt: skip
    if not plaintext and key_file is None and mk_file is None:
        raise w.error(
            "interface",
            None,
            "no key_file: run 'simpletun genkey > /etc/simpletun/KEY' and set "
            'key_file = "/etc/simpletun/KEY" (same key on both ends), or set plaintext = true',
        )
    key = None
    if key_file is not None:
        kpath = Path(key_file)
        if not kpath.is_absolute():
            kpath = path.parent / kpath
        key = check("key_file", keys.load_key, str(kpath))
    cipher = iface.get("cipher")
    if cipher is not None:
        if plaintext:
            raise w.error("interface", "cipher", "does not apply to plaintext = true")
        check("cipher", check_cipher, cipher)
    mtu = iface.get("mtu")
    if mtu is not None:
        check("mtu", check_mtu, mtu)
    queues = _queues(w, iface, check, dataplane)

    peers = []
    for i, p in enumerate(peers_raw):
        endpoint = None
        if "endpoint" in p:
            endpoint = check("endpoint", parse_endpoint, p["endpoint"], "peer", i)
        allowed = tuple(
            check("allowed_ips", check_route, a, "peer", i)
            for a in _strings(w, "peer", "allowed_ips", p.get("allowed_ips", []), i)
        )
        ka = p.get("persistent_keepalive")
        if ka is not None and not 1 <= ka <= 3600:
            raise w.error("peer", "persistent_keepalive", f"must be 1-3600 seconds, got {ka}", i)
        peers.append(Peer(p.get("name"), endpoint, allowed, ka))
    if len(peers) > 1:
        raise w.error(
            "peer",
            None,
            "only one [[peer]] per tunnel in this version (many peers on one device come with "
            "the multi-peer data plane); use one file per peer for now",
            1,
        )
    listen_port = iface.get("listen_port")
    client = bool(peers and peers[0].endpoint)
    peer_addr = None
    if mk_file is not None and listen_port is not None and client:
        # manual keys: a server's [[peer]] endpoint is the client's fixed address
        peer_addr, client = peers[0].endpoint[0], False
    if listen_port is not None and client:
        raise w.error(
            "interface",
            "listen_port",
            "a tunnel either listens (server) or has a peer endpoint (client), not both",
        )
    if listen_port is None and not client:
        raise w.error(
            "interface",
            None,
            "set listen_port (server) or give the [[peer]] an endpoint (client)",
        )
    if listen_port is not None:
        check("listen_port", lambda v: check_port(v, server=True), listen_port)
    listen_address = iface.get("listen_address")
    if listen_address is not None:
        if client:
            raise w.error("interface", "listen_address", "only a server listens")
        listen_address = check("listen_address", check_host, listen_address)
    default_port = DEFAULT_PORT if transport == "tcp" else ESP_IN_UDP_PORT
    peers = [
        Peer(p.name, (p.endpoint[0], p.endpoint[1] or default_port), p.allowed_ips,
             p.persistent_keepalive) if p.endpoint else p
        for p in peers
    ]  # fmt: skip
    routes = tuple(r for p in peers for r in p.allowed_ips)
    try:
        config = Config(
            server=not client,
            ifname=name,
            host=peers[0].endpoint[0] if client else listen_address,
            port=peers[0].endpoint[1] if client else listen_port,
            tap=mode == "tap",
            key=key,
            cipher=cipher or DEFAULT_CIPHER,
            mtu=mtu
            if mtu is not None
            else default_mtu(
                transport,
                peers[0].endpoint[0] if client else listen_address,
                tap=mode == "tap",
                server=not client,
            ),
            transport=transport,
            dataplane=dataplane,
            manual_keys=mk_file,
            peer=peer_addr,
            addresses=addresses,
            routes=routes,
            keepalive=peers[0].persistent_keepalive if peers else None,
            queues=queues,
        )
    except ConfigFileError:
        raise
    except ConfigError as e:  # a combination only the whole tunnel shows
        raise ConfigFileError(f"{path}: {e}") from None
    post_up = tuple(_strings(w, "interface", "post_up", iface.get("post_up", [])))
    pre_down = tuple(_strings(w, "interface", "pre_down", iface.get("pre_down", [])))
    return TunnelFile(path, config, tuple(peers), post_up, pre_down, key_file)


def _key_path(path: Path, value: str) -> str:
    kpath = Path(value)
    return str(kpath if kpath.is_absolute() else path.parent / kpath)


def _device(w: _Where, path: Path, iface: dict, check) -> tuple[str, str, tuple]:
    """[interface] name (default: the file's stem), mode and addresses, for every kind of file."""
    name = check("name", check_ifname, iface.get("name", path.stem))
    mode = iface.get("mode", "tun")
    if mode not in ("tun", "tap"):
        raise w.error("interface", "mode", f'must be "tun" or "tap", got {mode!r}')
    addresses = tuple(
        check("address", check_address, a)
        for a in _strings(w, "interface", "address", iface.get("address", []))
    )
    return name, mode, addresses


def _loads_ikev2(w: _Where, path: Path, iface: dict, peers_raw: list, check) -> TunnelFile:
    """A tunnel keyed by IKEv2: many [[peer]] tables, each with its identity and auth."""
    from simpletun.ike.keys import load_public_key
    from simpletun.ikesession import TCP_PORT, IkePeerSpec, IkeSetup

    transport = iface.get("transport", "udp")
    if transport not in ("udp", "tcp", "raw"):
        raise w.error(
            "interface", "transport",
            f'IKEv2 tunnels use "udp" (ESP-in-UDP, UDP 500/4500), "tcp" (IKE and ESP over '
            f'TCP, RFC 8229) or "raw" (ESP as IP protocol 50, IKE on UDP 500), got {transport!r}',
        )  # fmt: skip
    for key in ("key_file", "plaintext", "cipher", "listen_port"):
        if key in iface and not (key == "listen_port" and transport == "tcp"):
            raise w.error(
                "interface", key, 'does not apply to key_exchange = "ikev2" (IKE uses UDP 500 '
                "and 4500, or with transport = \"tcp\" listen_port; keys are per [[peer]])",
            )  # fmt: skip
    dataplane = iface.get("dataplane", "userspace")
    if dataplane not in DATAPLANES:
        raise w.error(
            "interface", "dataplane", f"{dataplane!r}: use one of {', '.join(DATAPLANES)}"
        )
    if dataplane == "kernel" and transport != "udp":
        raise w.error(
            "interface", "dataplane",
            'IKEv2 on the kernel data plane runs ESP-in-UDP: use transport = "udp" (or '
            'dataplane = "userspace" for tcp/raw)',
        )  # fmt: skip
    if "manual_keys_file" in iface:
        raise w.error("interface", "manual_keys_file", 'does not go with key_exchange = "ikev2"')
    name, mode, addresses = _device(w, path, iface, check)
    if "listen_address" not in iface:
        raise w.error(
            "interface", None, "IKEv2 needs listen_address = \"<this host's IP>\" (the local "
            "IKE address, used for NAT detection and as the default identity)",
        )  # fmt: skip
    local_ip = check("listen_address", check_host, iface["listen_address"])
    private = None
    if "private_key_file" in iface:
        kp = _key_path(path, iface["private_key_file"])
        private = check("private_key_file", keys.load_key, kp)
    local_id = iface.get("local_id")
    if local_id is not None:
        check("local_id", _check_identity, local_id)
    default_local = tuple(str(a.network) for a in addresses)
    if not peers_raw:
        raise w.error("interface", None, "an IKEv2 tunnel needs at least one [[peer]]")
    specs, names, ids = [], set(), set()
    for i, p in enumerate(peers_raw):
        pname = p.get("name", p.get("identity", f"peer{i + 1}"))
        if pname in names:
            raise w.error("peer", "name", f"{pname!r} is used by two peers", i)
        names.add(pname)
        endpoint = None
        if "endpoint" in p:
            host, port = check("endpoint", parse_endpoint, p["endpoint"], "peer", i)
            endpoint = (host, port or (TCP_PORT if transport == "tcp" else 500))
        identity = p.get("identity")
        if identity is not None:
            check("identity", _check_identity, identity, "peer", i)
            if identity in ids:
                raise w.error("peer", "identity", f"{identity!r} is used by two peers", i)
            ids.add(identity)
        elif endpoint is None or len(peers_raw) > 1:
            raise w.error(
                "peer", None, "set identity = \"...\" (the peer's IKE ID: an IP address, "
                "an FQDN or keyid:HEX); with several peers it tells them apart", i,
            )  # fmt: skip
        allowed = tuple(
            check("allowed_ips", check_route, a, "peer", i)
            for a in _strings(w, "peer", "allowed_ips", p.get("allowed_ips", []), i)
        )
        if not allowed:
            raise w.error(
                "peer", "allowed_ips", "list the peer's prefixes (its traffic selectors)", i
            )
        local_ips = tuple(
            check("local_ips", check_route, a, "peer", i)
            for a in _strings(w, "peer", "local_ips", p.get("local_ips", list(default_local)), i)
        )
        if not local_ips:
            raise w.error("peer", "local_ips", "set local_ips or an [interface] address", i)
        auth = p.get("auth", "ed25519" if "public_key" in p else "psk")
        psk = pub = None
        if auth == "psk":
            if "psk_file" not in p:
                raise w.error(
                    "peer", None, "auth = \"psk\" needs psk_file = \"FILE\" (made by "
                    "'simpletun genkey', the same file at the peer)", i,
                )  # fmt: skip
            psk = check("psk_file", keys.load_key, _key_path(path, p["psk_file"]), "peer", i)
        elif auth == "ed25519":
            if "public_key" not in p:
                raise w.error("peer", "auth", "ed25519 needs public_key (simpletun pubkey)", i)
            if private is None:
                raise w.error(
                    "interface", None, "an ed25519 peer needs private_key_file = \"FILE\" "
                    "(made by 'simpletun genkey'; the peer gets 'simpletun pubkey < FILE')",
                )  # fmt: skip
            pub = check(
                "public_key", lambda v: load_public_key(v, "public_key"), p["public_key"], "peer", i
            )
        else:
            raise w.error("peer", "auth", f'must be "psk" or "ed25519", got {auth!r}', i)
        times = {}
        for key in ("rekey_time", "ike_rekey_time", "dpd_delay"):
            if key in p:
                if not 1 <= p[key] <= 86400 * 7:
                    raise w.error("peer", key, f"must be 1-604800 seconds, got {p[key]}", i)
                times[key] = p[key]
        for key in ("rekey_packets", "rekey_bytes"):
            if key in p:
                if dataplane == "kernel":
                    raise w.error(
                        "peer", key, 'applies to the userspace data plane (dataplane = "kernel" '
                        "rekeys by rekey_time)", i,
                    )  # fmt: skip
                times[key] = check(key, lambda v, k=key: check_rekey_limit(k, v), p[key], "peer", i)
        if "persistent_keepalive" in p and not 1 <= p["persistent_keepalive"] <= 3600:
            raise w.error("peer", "persistent_keepalive", "must be 1-3600 seconds", i)
        specs.append(
            IkePeerSpec(
                name=pname, identity=identity, endpoint=endpoint, allowed_ips=allowed,
                local_ips=local_ips, psk=psk, public_key=pub, **times,
            )
        )  # fmt: skip
    listen_port = None
    if transport == "tcp":
        # a responder listens (default TCP_PORT); initiators only need not
        listen_port = iface.get("listen_port")
        if listen_port is not None:
            check("listen_port", check_port, listen_port)
        elif any(sp.endpoint is None for sp in specs):
            listen_port = TCP_PORT
    setup = IkeSetup(local_ip, local_id, private, tuple(specs), transport, listen_port)
    routes = tuple(r for sp in specs for r in sp.allowed_ips)
    mtu = iface.get("mtu")
    if mtu is not None:
        check("mtu", check_mtu, mtu)
    queues = _queues(w, iface, check, dataplane)
    config = Config(
        server=True, ifname=name, host=local_ip, tap=mode == "tap", queues=queues,
        port=listen_port or TCP_PORT if transport == "tcp" else ESP_IN_UDP_PORT,
        mtu=mtu if mtu is not None else default_mtu(transport, local_ip, tap=mode == "tap",
                                                    server=True),
        transport=transport, addresses=addresses, routes=routes, ike=setup, dataplane=dataplane,
    )  # fmt: skip
    peers = tuple(
        Peer(sp.name, sp.endpoint, sp.allowed_ips, p.get("persistent_keepalive"))
        for sp, p in zip(specs, peers_raw, strict=True)
    )
    post_up = tuple(_strings(w, "interface", "post_up", iface.get("post_up", [])))
    pre_down = tuple(_strings(w, "interface", "pre_down", iface.get("pre_down", [])))
    return TunnelFile(path, config, peers, post_up, pre_down, None)


def _queues(w: _Where, iface: dict, check, dataplane: str) -> int:
    """[interface] queues (default 1), for every kind of file."""
    queues = check("queues", check_queues, iface.get("queues", 1))
    if queues > 1 and dataplane == "kernel":
        raise w.error(
            "interface", "queues",
            'is for the userspace data plane (the xfrm interface has no TUN queues); '
            'remove it or set dataplane = "userspace"',
        )  # fmt: skip
    return queues


def _check_identity(text: str) -> str:
    if not text or len(text) > 255 or any(ch.isspace() for ch in text):
        raise ConfigError(f"{text!r} is not an IKE identity (IP address, FQDN or keyid:HEX)")
    if text.startswith("keyid:"):
        try:
            bytes.fromhex(text[6:])
        except ValueError:
            raise ConfigError(f"{text!r}: keyid: needs hex digits") from None
    return text


def load(name_or_path: str) -> TunnelFile:
    path = resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(
            f"{path}: no such config file (write one like the example in the README, or give "
            "its path)"
        ) from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read it: {e.strerror or e}") from None
    return loads(text, path)


def dumps(tf: TunnelFile) -> str:
    """The file's TOML again (round trip: ``loads(dumps(x), path)`` gives the same tunnel)."""
    c = tf.config

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def arr(items) -> str:
        return "[" + ", ".join(q(str(i)) for i in items) + "]"

    out = ["[interface]", f"name = {q(c.ifname)}", f"mode = {q('tap' if c.tap else 'tun')}"]
    out.append(f"transport = {q(c.transport)}")
    if c.addresses:
        out.append(f"address = {arr(c.addresses)}")
    if c.server:
        out.append(f"listen_port = {c.port}")
        if c.host:
            out.append(f"listen_address = {q(c.host)}")
    out.append(f"mtu = {c.mtu}")
    if c.manual_keys is not None:
        out.append(f"dataplane = {q(c.dataplane)}")
        out.append(f"manual_keys_file = {q(c.manual_keys)}")
    elif not c.esp:
        out.append("plaintext = true")
    else:
        out.append(f"key_file = {q(tf.key_file or '')}")
        out.append(f"cipher = {q(c.cipher)}")
    if tf.post_up:
        out.append(f"post_up = {arr(tf.post_up)}")
    if tf.pre_down:
        out.append(f"pre_down = {arr(tf.pre_down)}")
    for p in tf.peers:
        out += ["", "[[peer]]"]
        if p.name:
            out.append(f"name = {q(p.name)}")
        if p.endpoint:
            host, port = p.endpoint
            out.append(f"endpoint = {q(f'[{host}]:{port}' if ':' in host else f'{host}:{port}')}")
        out.append(f"allowed_ips = {arr(p.allowed_ips)}")
        if p.persistent_keepalive:
            out.append(f"persistent_keepalive = {p.persistent_keepalive}")
    return "\n".join(out) + "\n"
