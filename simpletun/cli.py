"""The ``simpletun`` command: flag-compatible with simpletun.c, plus ESP options and genkey.

Exit status: 0 after SIGINT/SIGTERM (or -h, genkey), 1 on a runtime error (device, network,
handshake rejected by the server), 2 on a usage error (one line on stderr).
"""

import argparse
import ipaddress
import logging
import signal
import sys

import trio

from simpletun import keys
from simpletun._core import ESP_IN_UDP_PORT
from simpletun._errors import ConfigError, SimpletunError
from simpletun.handshake import CIPHER_IDS, DEFAULT_CIPHER
from simpletun.session import DEFAULT_MTU, DEFAULT_PORT, MAX_MTU, MIN_MTU, Config

PROG = "simpletun"

USAGE = f"""\
Usage:
  {PROG} -i IFNAME -s [-p PORT] [-u|-a] [-d] [options]
  {PROG} -i IFNAME -c HOST [-p PORT] [-u|-a] [-d] [options]
  {PROG} genkey > KEYFILE
  {PROG} -h

  -i IFNAME        tunnel device to use, created if missing (required)
  -s               server mode: accept clients
  -c HOST          client mode: connect to the server at HOST
  -p PORT          port to listen on / connect to (TCP {DEFAULT_PORT}, udp/raw {ESP_IN_UDP_PORT})
  -u               use a TUN device, layer 3 (default)
  -a               use a TAP device, layer 2
  -d               debug: log connection and session events
  -h               print this help

  --key FILE       pre-shared key file made by '{PROG} genkey' (same file on both ends)
  --plaintext      no encryption: the classic simpletun.c protocol (interoperates with it)
  --cipher NAME    aes-128-cbc (default), aes-192-cbc or aes-256-cbc; both ends must agree
  --addr CIDR      address the device, e.g. 10.0.0.1/24 (may be repeated)
  --mtu N          device MTU, {MIN_MTU}-{MAX_MTU} (default {DEFAULT_MTU})
  --transport T    tcp (default), udp (ESP-in-UDP, RFC 3948) or raw (ESP, IP protocol 50;
                   handshake over UDP); both ends must agree

  genkey           write a new random key to stdout; with '> FILE' the file is made mode 0600
"""

GENKEY_USAGE = f"""\
Usage: {PROG} genkey > KEYFILE

Writes a new pre-shared key (32 random bytes, base64, one line) to stdout. When stdout is a
file, its mode is set to 0600. Copy the file to the other end and pass --key KEYFILE on both.
"""

NO_KEY_HINT = (
    f"no --key given: run '{PROG} genkey > key', copy the file to both ends and pass "
    "--key key, or use --plaintext for an unencrypted simpletun.c-compatible tunnel"
)


class UsageError(Exception):
    """A bad command line; the message is the one line shown to the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block; we print one line
        raise UsageError(_rewrite_argparse_error(message))


def _rewrite_argparse_error(message: str) -> str:
    if message.startswith("unrecognized arguments: "):
        first = message.split(": ", 1)[1].split()[0]
        if first == "genkey":
            return f"'genkey' must come first: {PROG} genkey > key"
        what = "option" if first.startswith("-") else "argument"
        return f"unknown {what} '{first}' (see {PROG} -h)"
    if message.startswith("argument "):
        message = message[len("argument ") :]
        option, _, rest = message.partition(": ")
        if rest == "expected one argument":
            metavar = _METAVARS.get(option, "VALUE")
            return f"{option} needs a value: {option} {metavar}"
        return f"{option}: {rest}"
    return message


_METAVARS = {
    "-i": "IFNAME",
    "-c": "HOST",
    "-p": "PORT",
    "--key": "FILE",
    "--cipher": "NAME",
    "--addr": "CIDR",
    "--mtu": "N",
}


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number 1-65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {value}")
    return value


def _mtu(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"MTU must be a number {MIN_MTU}-{MAX_MTU}, got {text!r}"
        ) from None
    if not MIN_MTU <= value <= MAX_MTU:
        raise argparse.ArgumentTypeError(f"MTU must be {MIN_MTU}-{MAX_MTU}, got {value}")
    return value


def _cipher(text: str) -> str:
    if text not in CIPHER_IDS:
        raise argparse.ArgumentTypeError(
            f"unknown cipher {text!r}; choose one of {', '.join(CIPHER_IDS)}"
        )
    return text


def _cidr(text: str):
    example = "like 10.0.0.1/24 or fd00::1/64"
    if "/" not in text:
        raise argparse.ArgumentTypeError(
            f"expected an address with a prefix length ({example}), got {text!r}"
        )
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an address with a prefix length ({example}): {text!r}"
        ) from None


def _ifname(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("the interface name is empty (e.g. -i tun0)")
    if len(text.encode()) > 15:
        raise argparse.ArgumentTypeError(f"interface name {text!r} is too long (at most 15 bytes)")
    if text in (".", "..") or any(c in text for c in "/: \t\n\0"):
        raise argparse.ArgumentTypeError(f"invalid interface name {text!r} (no '/', ':' or spaces)")
    return text


def _parser() -> _Parser:
    p = _Parser(prog=PROG, add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    p.add_argument("-i", dest="ifname", type=_ifname)
    p.add_argument("-s", dest="server", action="store_true")
    p.add_argument("-c", dest="host")
    p.add_argument("-p", dest="port", type=_port, default=None)
    p.add_argument("-u", dest="tun", action="store_true")
    p.add_argument("-a", dest="tap", action="store_true")
    p.add_argument("-d", dest="debug", action="store_true")
    p.add_argument("-h", "--help", dest="help", action="store_true")
    p.add_argument("--key", dest="key")
    p.add_argument("--plaintext", action="store_true")
    p.add_argument("--cipher", type=_cipher)
    p.add_argument("--addr", dest="addrs", type=_cidr, action="append", default=[])
    p.add_argument("--mtu", type=_mtu, default=DEFAULT_MTU)
    p.add_argument("--transport", choices=("tcp", "udp", "raw"), default="tcp")
    return p


def parse_args(argv: list[str]) -> tuple[Config, bool] | None:
    """Turn the command line into (Config, debug), or None for -h.

    Raises UsageError or ConfigError (bad key file) with the one line to show.
    """
    ns = _parser().parse_args(argv)
    if ns.help:
        return None
    if ns.server and ns.host is not None:
        raise UsageError("-s and -c are mutually exclusive: run as server (-s) or client (-c HOST)")
    if not ns.server and ns.host is None:
        raise UsageError("choose a mode: -s (server) or -c HOST (client)")
    if ns.host is not None and not ns.host.strip():
        raise UsageError("-c: the server address is empty")
    if ns.tun and ns.tap:
        raise UsageError("-u (TUN) and -a (TAP) are mutually exclusive; pick one")
    if ns.ifname is None:
        raise UsageError("-i IFNAME is required: the tunnel device to use, e.g. -i tun0")
    if ns.plaintext and ns.key is not None:
        raise UsageError("--key and --plaintext are mutually exclusive; pick one")
    if ns.plaintext and ns.cipher is not None:
        raise UsageError("--cipher does not apply to --plaintext (it sends packets unencrypted)")
    key = None
    if not ns.plaintext:
        if ns.key is None:
            raise UsageError(NO_KEY_HINT)
        key = keys.load_key(ns.key)  # ConfigError: one line
    if ns.port is None:
        ns.port = DEFAULT_PORT if ns.transport == "tcp" else ESP_IN_UDP_PORT
    return Config(
        server=ns.server,
        ifname=ns.ifname,
        host=ns.host,
        port=ns.port,
        tap=ns.tap,
        key=key,
        cipher=ns.cipher or DEFAULT_CIPHER,
        mtu=ns.mtu,
        addresses=tuple(ns.addrs),
        transport=ns.transport,
    ), ns.debug


def _error(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def genkey(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(GENKEY_USAGE)
        return 0
    if argv:
        return _error(f"genkey takes no arguments, got '{argv[0]}'; run: {PROG} genkey > key", 2)
    sys.stdout.flush()
    try:
        warning = keys.write_key_to_fd(sys.stdout.fileno(), keys.generate_key())
    except OSError as e:
        return _error(f"cannot write the key: {e.strerror or e}", 1)
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        fmt = logging.Formatter(
            "%(asctime)s.%(msecs)03d " + PROG + ": %(message)s", datefmt="%H:%M:%S"
        )
    else:
        fmt = logging.Formatter(PROG + ": %(message)s")
    handler.setFormatter(fmt)
    root = logging.getLogger("simpletun")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def _report(tunnel) -> None:
    """SIGUSR1: log the live counters of the current session without disturbing it."""
    log = logging.getLogger("simpletun")
    sess = tunnel.session if tunnel is not None else None
    if sess is None:
        log.info("no session; %d session(s) so far", tunnel.sessions if tunnel else 0)
    else:
        log.info("%s (up %.1f s, %s)", sess.counters_line(), sess.duration, sess.describe())


async def _run(config: Config) -> int:
    """Run until a signal (→ 0) or a fatal error (→ 1)."""
    from simpletun import session

    log = logging.getLogger("simpletun")
    outcome: dict[str, int] = {"status": 0}

    state: dict[str, session.Tunnel] = {}

    async def watch_signals(task_status=trio.TASK_STATUS_IGNORED) -> None:
        wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
        with trio.open_signal_receiver(*wanted) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    _report(state.get("tunnel"))
                    continue
                log.debug("got %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return

    async def tunnel() -> None:
        try:
            async with trio.open_nursery() as inner:
                if config.transport == "tcp":
                    state["tunnel"] = await inner.start(session.run, config)
                else:
                    from simpletun import datagram

                    state["tunnel"] = await inner.start(datagram.run, config)
        except* (SimpletunError, OSError) as group:
            for e in group.exceptions:
                print(f"{PROG}: error: {e}", file=sys.stderr)
            outcome["status"] = 1
        finally:
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        nursery.start_soon(tunnel)
    return outcome["status"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "genkey":
        return genkey(argv[1:])
    try:
        parsed = parse_args(argv)
    except (UsageError, ConfigError) as e:
        return _error(str(e), 2)
    if parsed is None:
        sys.stdout.write(USAGE)
        return 0
    config, debug = parsed
    _setup_logging(debug)
    return trio.run(_run, config)
