"""The ``simpletun`` command: flag-compatible with simpletun.c, plus ESP options and genkey.

Exit status: 0 after SIGINT/SIGTERM/SIGHUP (or -h, genkey), 128+N after another terminating
signal N (cleaned up first), 1 on a local runtime error (the device cannot be made or
recreated, the port cannot be listened on), 2 on a usage error (one line on stderr). Nothing
from the network ends the process: a rejected handshake is logged and retried.
"""

import argparse
import logging
import os
import signal
import sys

import trio

from simpletun import journal, keys
from simpletun._core import ESP_IN_UDP_PORT
from simpletun._errors import ConfigError, SimpletunError
from simpletun.config import (
    DEFAULT_MTU,
    DEFAULT_PORT,
    MAX_MTU,
    MIN_MTU,
    Config,
    check_address,
    check_cipher,
    check_dataplane,
    check_host,
    check_ifname,
    check_mtu,
    check_port,
    check_queues,
    check_route,
    check_transport,
    default_mtu,
    max_queues,
)
from simpletun.handshake import DEFAULT_CIPHER
from simpletun.ratelimit import RateLimitFilter

PROG = "simpletun"

USAGE = f"""\
Usage:
  {PROG} -i IFNAME -s [-p PORT] [-u|-a] [-d] [options]
  {PROG} -i IFNAME -c HOST [-p PORT] [-u|-a] [-d] [options]
  {PROG} genkey > KEYFILE
  {PROG} pubkey < KEYFILE
  {PROG} up CONFIG|NAME [--foreground] | down NAME | reload NAME | status [NAME] [--json]
  {PROG} install-service [--unit-dir DIR]
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
  --mtu N          device MTU, {MIN_MTU}-{MAX_MTU} (default {DEFAULT_MTU} over TCP; over udp/raw the
                   outer path's MTU less the ESP overhead, e.g. 1422 / 1438 on a 1500 path)
  --transport T    tcp (default; udp with --key-exchange ikev2), udp (ESP-in-UDP, RFC 3948) or
                   raw (ESP, IP protocol 50; handshake over UDP); both ends must agree
  --listen ADDR    server: accept clients on this address only (e.g. 192.0.2.1, [fd00::1])
  --key-exchange K psk (default: simpletun's own handshake) or ikev2 (RFC 7296 on UDP 500/4500,
                   ESP-in-UDP; --key is the IKE pre-shared key; a server needs --listen);
                   with --transport tcp: IKE and ESP over TCP (RFC 8229), -p port (4500);
                   with --transport raw: ESP as IP protocol 50, IKE on UDP 500
  --dataplane DP   userspace (default) or kernel: ESP in the Linux kernel (xfrm, an xfrm
                   interface carries the routes; udp/raw with --manual-keys, or IKEv2)
  --manual-keys F  manual key file (SPIs + keys per direction; same file on both ends): no
                   handshake, for either data plane; udp/raw only
  --peer HOST      server with --manual-keys: the client's address (required with --dataplane
                   kernel; without it the userspace server learns it from the first packet)
  --queues N       userspace data plane: open the device with N queues (IFF_MULTI_QUEUE), one
                   device thread each, so several flows encrypt on several CPUs (1-#CPUs,
                   default 1)
  --route CIDR     route this prefix through the tunnel, e.g. 10.1.0.0/16 (may be repeated);
                   kept in place while the tunnel runs (also across reconnects), removed on exit

  genkey           write a new random key to stdout; with '> FILE' the file is made mode 0600
  pubkey           print the Ed25519 public key of a genkey file (for IKEv2 signatures)
  install-service  write the systemd unit simpletun@.service (see install-service -h)
"""

GENKEY_USAGE = f"""\
Usage: {PROG} genkey > KEYFILE
       {PROG} genkey --manual [--bits 128|192|256] [--esn] [--transport esp|esp-in-udp] > FILE

Writes a new pre-shared key (32 random bytes, base64, one line) to stdout. When stdout is a
file, its mode is set to 0600. Copy the file to the other end and pass --key KEYFILE on both.
With --manual: a new manual key file (SPIs and random keys per direction, AES-CBC with
--bits, default 256; transport default esp-in-udp) for --manual-keys FILE on both ends.
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
    "--route": "CIDR",
    "--listen": "ADDR",
    "--transport": "T",
    "--key-exchange": "K",
    "--dataplane": "DP",
    "--manual-keys": "FILE",
    "--peer": "HOST",
    "--queues": "N",
}


def _checked(check, convert=None):
    """An argparse type from one of simpletun.config's checks (one place for validation)."""

    def parse(text: str):
        try:
            return check(convert(text) if convert else text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _number(what: str, lo: int, hi: int):
    def convert(text: str) -> int:
        try:
            return int(text, 10)
        except ValueError:
            raise ConfigError(f"{what} must be a number {lo}-{hi}, got {text!r}") from None

    return convert


_port = _checked(check_port, _number("port", 1, 65535))
_mtu = _checked(check_mtu, _number("MTU", MIN_MTU, MAX_MTU))
_cipher = _checked(check_cipher)
_cidr = _checked(check_address)
_route = _checked(check_route)
_ifname = _checked(check_ifname)
_host = _checked(check_host)
_transport = _checked(check_transport)
_dataplane = _checked(check_dataplane)
_queues = _checked(check_queues, _number("queues", 1, max_queues()))


def _parser() -> _Parser:
    p = _Parser(prog=PROG, add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    p.add_argument("-i", dest="ifname", type=_ifname)
    p.add_argument("-s", dest="server", action="store_true")
    p.add_argument("-c", dest="host", type=_host)
    p.add_argument("-p", dest="port", type=_port, default=None)
    p.add_argument("-u", dest="tun", action="store_true")
    p.add_argument("-a", dest="tap", action="store_true")
    p.add_argument("-d", dest="debug", action="store_true")
    p.add_argument("-h", "--help", dest="help", action="store_true")
    p.add_argument("--key", dest="key")
    p.add_argument("--plaintext", action="store_true")
    p.add_argument("--cipher", type=_cipher)
    p.add_argument("--addr", dest="addrs", type=_cidr, action="append", default=[])
    p.add_argument("--mtu", type=_mtu, default=None)
    p.add_argument("--route", dest="routes", type=_route, action="append", default=[])
    p.add_argument("--listen", dest="listen", type=_host)
    p.add_argument("--transport", type=_transport, default=None)
    p.add_argument("--key-exchange", dest="key_exchange", default="psk")
    p.add_argument("--dataplane", type=_dataplane, default="userspace")
    p.add_argument("--manual-keys", dest="manual_keys")
    p.add_argument("--peer", dest="peer", type=_host)
    p.add_argument("--queues", dest="queues", type=_queues, default=1)
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
    if ns.listen is not None and not ns.server:
        raise UsageError("--listen is for a server (-s): the address to accept clients on")
    if ns.tun and ns.tap:
        raise UsageError("-u (TUN) and -a (TAP) are mutually exclusive; pick one")
    if ns.ifname is None:
        raise UsageError("-i IFNAME is required: the tunnel device to use, e.g. -i tun0")
    if ns.plaintext and ns.key is not None:
        raise UsageError("--key and --plaintext are mutually exclusive; pick one")
    if ns.manual_keys is not None and (ns.plaintext or ns.cipher is not None):
        raise UsageError(
            "--manual-keys: the key file gives the cipher (its enc-key length) and always "
            "encrypts; drop --cipher / --plaintext"
        )
    if ns.plaintext and ns.cipher is not None:
        raise UsageError("--cipher does not apply to --plaintext (it sends packets unencrypted)")
    key = None
    if not ns.plaintext:
        if ns.key is None and ns.manual_keys is None:
            raise UsageError(NO_KEY_HINT)
        key = keys.load_key(ns.key) if ns.key is not None else None  # ConfigError: one line
    ike = None
    if ns.key_exchange not in ("psk", "ikev2"):
        raise UsageError(f"--key-exchange must be psk or ikev2, got {ns.key_exchange!r}")
    if ns.key_exchange == "ikev2":
        from simpletun.ikesession import cli_setup

        if key is None:
            raise UsageError("--key-exchange ikev2 needs --key FILE (the IKE pre-shared key)")
        if ns.manual_keys is not None:
            raise UsageError("--key-exchange ikev2 negotiates its keys: drop --manual-keys")
        transport = ns.transport or "udp"
        if ns.dataplane == "kernel" and transport != "udp":
            raise UsageError(
                "--key-exchange ikev2 --dataplane kernel runs ESP-in-UDP: drop --transport "
                f"{transport} (or use --dataplane userspace)"
            )
        if ns.cipher is not None or (ns.port is not None and transport != "tcp"):
            raise UsageError(
                "--key-exchange ikev2 negotiates its ciphers and runs on UDP 500/4500: drop "
                "--cipher, and -p unless --transport tcp"
            )
        if ns.server and ns.listen is None:
            raise UsageError("--key-exchange ikev2 -s needs --listen ADDR (this host's IP)")
        ike = cli_setup(ns.server, ns.host, ns.listen, key, tuple(ns.routes),
                        transport=transport, port=ns.port)  # fmt: skip
        ns.port = ESP_IN_UDP_PORT
        if transport == "tcp":
            ns.port = ike.listen_port or ike.peers[0].endpoint[1]
        if ns.mtu is None:
            ns.mtu = default_mtu(transport, ns.host or ns.listen, tap=ns.tap, server=True)
        return Config(
            server=True, ifname=ns.ifname, host=ike.local_ip, port=ns.port, tap=ns.tap,
            mtu=ns.mtu, addresses=tuple(ns.addrs), routes=tuple(ns.routes), transport=transport,
            ike=ike, dataplane=ns.dataplane, queues=ns.queues,
        ), ns.debug  # fmt: skip
    ns.transport = ns.transport or "tcp"
    if ns.port is None:
        ns.port = DEFAULT_PORT if ns.transport == "tcp" else ESP_IN_UDP_PORT
    if ns.mtu is None:
        target = ns.host if ns.host is not None else ns.listen
        ns.mtu = default_mtu(ns.transport, target, tap=ns.tap, server=ns.server)
    return Config(
        server=ns.server,
        ifname=ns.ifname,
        host=ns.host if ns.host is not None else ns.listen,
        port=ns.port,
        tap=ns.tap,
        key=key,
        cipher=ns.cipher or DEFAULT_CIPHER,
        mtu=ns.mtu,
        addresses=tuple(ns.addrs),
        routes=tuple(ns.routes),
        transport=ns.transport,
        dataplane=ns.dataplane,
        manual_keys=ns.manual_keys,
        peer=ns.peer,
        queues=ns.queues,
    ), ns.debug


def preflight(config: Config) -> None:
    """What can be refused before a tunnel starts (ConfigError): the manual key file against
    the tunnel, and for the kernel data plane its ESP support. Used by the CLI and ``up``."""
    if config.dataplane == "kernel":
        from simpletun import kernel_dp

        if config.ike is not None:
            kernel_dp.preflight_ike(config)
        else:
            kernel_dp.preflight(config)
    elif config.manual_keys is not None:
        from simpletun.config import check_manual_keys

        check_manual_keys(config)


def _error(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def genkey(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(GENKEY_USAGE)
        return 0
    text = keys.encode_key(keys.generate_key())
    if argv and argv[0] == "--manual":
        from simpletun import manual_keys

        opts = {"bits": "256", "transport": "esp-in-udp"}
        rest = argv[1:]
        esn = False
        while rest:
            flag = rest.pop(0)
            if flag == "--esn":
                esn = True
            elif flag in ("--bits", "--transport") and rest:
                opts[flag[2:]] = rest.pop(0)
            else:
                return _error(f"genkey --manual: unknown or incomplete option {flag!r}", 2)
        if opts["bits"] not in ("128", "192", "256"):
            return _error(f"genkey --manual: --bits {opts['bits']}: use 128, 192 or 256", 2)
        if opts["transport"] not in manual_keys.TRANSPORTS:
            return _error("genkey --manual: --transport must be esp or esp-in-udp", 2)
        text = manual_keys.generate(
            key_bits=int(opts["bits"]), esn=esn, transport=opts["transport"]
        )
    elif argv:
        return _error(f"genkey takes no arguments, got '{argv[0]}'; run: {PROG} genkey > key", 2)
    sys.stdout.flush()
    try:
        warning = keys.write_secret_to_fd(sys.stdout.fileno(), text)
    except OSError as e:
        return _error(f"cannot write the key: {e.strerror or e}", 1)
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


def _setup_logging(debug: bool) -> RateLimitFilter:
    handler = logging.StreamHandler(sys.stderr)
    if journal.stderr_is_journal():  # <N> priority prefixes, no timestamps (journald adds them)
        fmt = journal.JournalFormatter(PROG + ": %(message)s")
    elif debug and not os.environ.get("JOURNAL_STREAM"):
        fmt = logging.Formatter(
            "%(asctime)s.%(msecs)03d " + PROG + ": %(message)s", datefmt="%H:%M:%S"
        )
    else:
        fmt = logging.Formatter(PROG + ": %(message)s")
    handler.setFormatter(fmt)
    limiter = RateLimitFilter()
    limiter.handler = handler
    handler.addFilter(limiter)
    root = logging.getLogger("simpletun")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    return limiter


# Signals whose default action ends the process: each ends the tunnel cleanly instead (device,
# addresses and routes released). SIGINT, SIGTERM and SIGHUP (until reload exists) exit 0;
# the others exit 128+N like the default action would, after the clean-up.
CLEAN_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
OTHER_FATAL_SIGNALS = tuple(
    getattr(signal, name)
    for name in (
        "SIGQUIT",
        "SIGUSR2",
        "SIGALRM",
        "SIGVTALRM",
        "SIGPROF",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGPWR",
        "SIGSTKFLT",
        "SIGIO",
    )
    if hasattr(signal, name)
) + tuple(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


def _report(tunnel) -> None:
    """SIGUSR1: log the live counters of the current session without disturbing it."""
    log = logging.getLogger("simpletun")
    tunnel = getattr(tunnel, "tunnel", tunnel)  # a Service holds its Tunnel
    sess = tunnel.session if tunnel is not None else None
    if sess is None:
        log.info("no session; %d session(s) so far", tunnel.sessions if tunnel else 0)
    else:
        log.info("%s (up %.1f s, %s)", sess.counters_line(), sess.duration, sess.describe())
    # A datagram tunnel holds its data plane; a TCP session's is its plane's.
    dp = getattr(tunnel, "dp", None) or getattr(getattr(sess, "pump", None), "dp", None)
    if dp is not None:
        log.info("data plane: %s", io_line(dp.stats, getattr(tunnel.device, "offloads", None)))


IO_COUNTERS = (
    "dev_reads",
    "dev_read_bytes",
    "dev_read_super",
    "dev_writes",
    "dev_write_bytes",
    "dev_write_super",
    "wire_tx_packets",
    "wire_tx_bytes",
    "wire_rx_packets",
    "wire_rx_bytes",
    "wire_tx_super",
    "wire_rx_super",
)


def io_line(stats: dict, offloads: str | None) -> str:
    """The device and wire counters of a data plane (what offloads change) and its nonzero
    drops, as key=value pairs; ``scripts/bench_tunnel.py`` parses this line."""
    parts = [f"offloads={offloads or 'off'}"]
    parts += [f"{k}={stats.get(k, 0)}" for k in IO_COUNTERS]
    # reads per device queue, on a multi-queue device (--queues N)
    parts += [f"{k}={v}" for k, v in stats.items() if k.startswith("dev_reads_q")]
    parts += [f"{k}={v}" for k, v in stats.items() if k.startswith("drop_") and v]
    return " ".join(parts)


async def _run(start, limiter: RateLimitFilter | None = None, reload=None) -> int:
    """Run ``start`` (a trio task that calls ``task_status.started(tunnel_or_service)``) until a
    signal (→ 0, or 128+N) or a fatal local error (→ 1). SIGHUP calls ``reload`` when given,
    otherwise stops cleanly."""
    log = logging.getLogger("simpletun")
    outcome: dict[str, int] = {"status": 0}

    state: dict[str, object] = {}

    async def watch_signals(task_status=trio.TASK_STATUS_IGNORED) -> None:
        wanted = (signal.SIGUSR1, *CLEAN_EXIT_SIGNALS, *OTHER_FATAL_SIGNALS)
        with trio.open_signal_receiver(*wanted) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    _report(state.get("tunnel"))
                    continue
                name = _signal_name(signum)
                if signum == signal.SIGHUP and reload is not None:
                    log.info("got SIGHUP, reloading")
                    nursery.start_soon(reload)
                    continue
                if signum in CLEAN_EXIT_SIGNALS:
                    how = "shutting down" if signum != signal.SIGHUP else "stopping (no reload yet)"
                    log.log(
                        logging.INFO if signum == signal.SIGHUP else logging.DEBUG,
                        "got %s, %s",
                        name,
                        how,
                    )
                else:
                    log.warning("got %s, shutting down", name)
                    outcome["status"] = 128 + signum
                nursery.cancel_scope.cancel()
                return

    async def flush_log() -> None:
        while limiter is not None:
            await trio.sleep(1.0)
            limiter.flush()

    async def tunnel() -> None:
        try:
            async with trio.open_nursery() as inner:
                state["tunnel"] = await inner.start(start)
        except* (SimpletunError, OSError) as group:
            for e in _leaves(group):
                print(f"{PROG}: error: {e}", file=sys.stderr)
            outcome["status"] = 1
        finally:
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        nursery.start_soon(flush_log)
        nursery.start_soon(tunnel)
    if limiter is not None:
        limiter.flush()
    return outcome["status"]


def _leaves(e: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, once each, in order."""
    if isinstance(e, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in e.exceptions:
            out += [x for x in _leaves(sub) if str(x) not in {str(o) for o in out}]
        return out
    return [e]


def _internal_error(e: BaseException) -> int:
    """Last resort: a bug must still be one line, not a traceback (set SIMPLETUN_TRACEBACK=1
    to see it)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    if os.environ.get("SIMPLETUN_TRACEBACK"):
        import traceback

        traceback.print_exception(e)
    return _error(
        f"internal error: {type(e).__name__}: {e} (please report it; run with "
        "SIMPLETUN_TRACEBACK=1 for details)",
        1,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    journal.prefix_stderr_for_journal()  # under systemd: "simpletun: error: ..." at err priority
    if argv and argv[0] == "genkey":
        return genkey(argv[1:])
    if argv and argv[0] == "pubkey":
        from simpletun.ike.keys import pubkey_main

        return pubkey_main(argv[1:])
    if argv and argv[0] == "install-service":
        from simpletun import unit

        return unit.main(argv[1:])
    if argv and argv[0] in ("up", "down", "reload", "status"):
        from simpletun import commands

        try:
            return commands.main(argv)
        except Exception as e:
            return _internal_error(e)
    try:
        parsed = parse_args(argv)
    except (UsageError, ConfigError) as e:
        return _error(str(e), 2)
    except Exception as e:
        return _internal_error(e)
    if parsed is None:
        sys.stdout.write(USAGE)
        return 0
    config, debug = parsed
    try:  # a bad key file, a kernel without ESP: one line, exit 2, before anything starts
        preflight(config)
    except ConfigError as e:
        return _error(str(e), 2)
    limiter = _setup_logging(debug)
    from functools import partial

    from simpletun.service import runner

    start = partial(runner(config), config)
    try:
        return trio.run(_run, start, limiter)
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    except Exception as e:
        return _internal_error(e)
