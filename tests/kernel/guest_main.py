"""Inside the qemu guest: for each scenario of a group, run the real ``simpletun up
--foreground`` with ``dataplane = "kernel"`` (the guest kernel's ESP, configured by simpletun:
xfrm interface, SAs from the scenario's manual key file, policies, UDP encap socket) against the
host's simpletun userspace end, and print what happened.

For each scenario: start the tunnel (ready = its READY=1 on a notify socket), print
``KESP-READY <n>``, then serve one host-initiated transfer (echoed; the host pings first),
ping the host 3 times, inject a replay and a forgery of the kernel's own packets towards the
host (captured on the NIC), a guest-initiated TCP transfer echoed by the host (SHA-256
compared), one more round trip (the tunnel is quiet), then the tunnel's own status over its
control socket (the kernel's counters under simpletun's names) and the kernel's SAs read back,
as one ``KESP-RESULT <json>`` line; then SIGTERM, and what was left behind. Also creates and
deletes an xfrm interface once, and runs scripts/bench_kernel.py (correctness only).

Usage (guest only): python -m tests.kernel.guest_main GROUP NIC KEYS_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

from simpletun import control, manual_keys, xfrm

from .scenarios import (
    ECHO_PORT,
    GROUPS,
    GUEST_ECHO_PORT,
    GUEST_OUTER,
    TRANSFER_BYTES,
    Scenario,
    esp_offset,
    forge,
    recv_exact,
    replay,
)

READY_TIMEOUT = 180.0  # emulated Python start-up of the tunnel process


def emit(kind: str, obj: dict) -> None:
    print(f"KESP-{kind} {json.dumps(obj, sort_keys=True)}", flush=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def start_tunnel(sc: Scenario, keys_dir: str) -> subprocess.Popen:
    """``simpletun up --foreground`` on the scenario's guest file; returns once it sent
    READY=1 (an event on our notify socket, no polling)."""
    note = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = f"/run/kesp-notify-{sc.n}"
    note.bind(path)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    log = open(f"/tmp/{sc.guest_ifname}.log", "w")  # noqa: SIM115 (the child's stderr)
    conf = os.path.join(keys_dir, f"{sc.guest_ifname}.toml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "simpletun", "up", "--foreground", conf],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pidfd = os.pidfd_open(proc.pid)
    try:
        while True:  # READY=1, or the process ended (e.g. refused its file): events, no polling
            readable, _, _ = select.select([note, pidfd], [], [], READY_TIMEOUT)
            if not readable:
                raise RuntimeError(f"no READY=1 within {READY_TIMEOUT:.0f} s")
            if note in readable and "READY=1" in note.recv(4096).decode().split("\n"):
                return proc
            if pidfd in readable:
                raise RuntimeError(f"the tunnel exited {proc.wait()}: {tunnel_log(sc)}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(pidfd)
        note.close()
        os.unlink(path)


def tunnel_log(sc: Scenario) -> str:
    try:
        with open(f"/tmp/{sc.guest_ifname}.log") as f:
            return f.read()[-2000:]
    except OSError:
        return ""


def serve_host_transfer(sc: Scenario, out: dict, ready: threading.Event) -> None:
    """Accept the host's connection on our inner address, echo it, record its SHA-256."""
    try:
        srv = socket.create_server((sc.guest_inner, GUEST_ECHO_PORT))
        srv.settimeout(120)
        ready.set()
        with srv:
            c, _ = srv.accept()
        with c:
            c.settimeout(60)
            (n,) = struct.unpack("!I", recv_exact(c, 4))
            data = recv_exact(c, n)
            out["sha256"] = hashlib.sha256(data).hexdigest()
            out["bytes"] = len(data)
            c.sendall(data)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        ready.set()


def transfer(sc: Scenario) -> dict:
    data = hashlib.shake_256(b"simpletun kesp transfer " + sc.name.encode()).digest(TRANSFER_BYTES)
    c = socket.create_connection(
        (sc.host_inner, ECHO_PORT), timeout=30, source_address=(sc.guest_inner, 0)
    )
    with c:
        c.sendall(struct.pack("!I", len(data)) + data)
        got = recv_exact(c, len(data))
    return {
        "sent_sha256": hashlib.sha256(data).hexdigest(),
        "echoed_sha256": hashlib.sha256(got).hexdigest(),
        "bytes": len(got),
    }


ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def inject(cap: socket.socket, nic: str, spi: int) -> dict:
    """Wire-level attack on the simpletun side: among the frames the kernel sent with ``spi``
    (captured on the NIC), re-send the 2nd verbatim (a replay) and a copy with its sequence
    number moved 1000 ahead (fresh, but its ICV no longer matches: a forgery)."""
    frames = []
    while True:
        try:
            frame, addr = cap.recvfrom(65535)
        except BlockingIOError:
            break
        off = esp_offset(frame)
        if addr[2] == PACKET_OUTGOING and off is not None:
            if struct.unpack_from("!I", frame, off)[0] == spi:
                frames.append((frame, off))
    if len(frames) < 2:
        return {"error": f"captured {len(frames)} ESP frames with SPI {spi:#x}"}
    frame, off = frames[1]
    cap.sendto(replay(frame, off), (nic, 0))
    cap.sendto(forge(frame, off), (nic, 0))
    seq = struct.unpack_from("!I", frame, off + 4)[0]
    return {"replayed_seq": seq, "forged_seq": (seq + 1000) & 0xFFFFFFFF}


def run_scenario(sc: Scenario, nic: str, keys_dir: str) -> dict:
    res: dict = {"scenario": sc.name}
    t0 = time.monotonic()
    keys = manual_keys.load(os.path.join(keys_dir, f"{sc.name}.toml"))
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    cap.bind((nic, 0))
    cap.setblocking(False)
    proc = start_tunnel(sc, keys_dir)
    res["start_seconds"] = round(time.monotonic() - t0, 1)
    try:
        res["interface_kind"] = (
            "xfrm" if " xfrm " in sh("ip", "-d", "link", "show", sc.guest_ifname) else "?"
        )
        host_xfer: dict = {}
        listening = threading.Event()
        th = threading.Thread(target=serve_host_transfer, args=(sc, host_xfer, listening))
        th.start()
        listening.wait(30)
        emit("READY", {"n": sc.n})  # the host now pings us and sends its transfer
        th.join(150)
        res["host_transfer"] = host_xfer
        r = subprocess.run(
            ["ping", "-c", "3", "-W", "5", "-I", sc.guest_inner, sc.host_inner],
            capture_output=True,
            text=True,
        )
        res["ping_rc"] = r.returncode
        res["ping_tail"] = r.stdout.strip().splitlines()[-2:]
        res["injected"] = inject(cap, nic, sc.spi_g2h)
        cap.close()
        try:
            res["transfer"] = transfer(sc)
        except OSError as e:
            res["transfer"] = {"error": str(e)}
        # one more round trip: what was sent before it has arrived (FIFO), the tunnel is quiet
        subprocess.run(["ping", "-c", "1", "-W", "5", "-I", sc.guest_inner, sc.host_inner],
                       capture_output=True)  # fmt: skip
        res["status"] = control.request(sc.guest_ifname, {"cmd": "status"}, timeout=30)["status"]
        out, inn = keys.xfrm_sas(sc.guest_role, GUEST_OUTER, sc.host_addr)
        g_out = xfrm.get_sa(out.dst, out.spi, out.src)
        g_in = xfrm.get_sa(inn.dst, inn.spi, inn.src)
        res["kernel_out"] = g_out.counters("out") | {"esn": g_out.esn, "flags": g_out.flags}
        res["kernel_in"] = g_in.counters("in") | {"esn": g_in.esn, "flags": g_in.flags}
        res["kernel_keys_match"] = (g_out.enc_key, g_out.auth_key, g_in.enc_key) == (
            out.enc_key,
            out.auth_key,
            inn.enc_key,
        )
        res["kernel_if_id"] = [g_out.if_id, g_in.if_id]
        res["dumped_spis"] = sorted(s.spi for s in xfrm.dump_sas())
        res["dumped_policies"] = len(xfrm.dump_policies())
    finally:
        cap.close()
        _stop(proc, res)
    return _after_exit(res, sc, t0)


def run_ike_scenario(sc: Scenario, nic: str, keys_dir: str) -> dict:
    """A kernel-dataplane IKEv2 initiator (the guest) against the host's userspace responder:
    the Child SA negotiated and installed into the kernel by simpletun, traffic both ways, the
    status with its SPIs, and nothing left after SIGTERM."""
    res: dict = {"scenario": sc.name}
    t0 = time.monotonic()
    proc = start_tunnel(sc, keys_dir)
    res["start_seconds"] = round(time.monotonic() - t0, 1)
    try:
        deadline = time.monotonic() + 120
        while True:  # the Child SA is negotiated after READY=1 (the device and sockets)
            st = control.request(sc.guest_ifname, {"cmd": "status"}, timeout=30)["status"]
            if st["up"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        res["up_seconds"] = round(time.monotonic() - t0, 1)
        res["first_status"] = st  # the host reads its own status right after READY
        first = {ch["spi_in"] for p in st["peers"] for ch in p["child_sas"]}
        host_xfer: dict = {}
        listening = threading.Event()
        th = threading.Thread(target=serve_host_transfer, args=(sc, host_xfer, listening))
        th.start()
        listening.wait(30)
        emit("READY", {"n": sc.n})
        th.join(150)
        res["host_transfer"] = host_xfer
        r = subprocess.run(
            ["ping", "-c", "3", "-W", "5", "-I", sc.guest_inner, sc.host_inner],
            capture_output=True,
            text=True,
        )
        res["ping_rc"] = r.returncode
        res["ping_tail"] = r.stdout.strip().splitlines()[-2:]
        try:
            res["transfer"] = transfer(sc)
        except OSError as e:
            res["transfer"] = {"error": str(e)}
        subprocess.run(["ping", "-c", "1", "-W", "5", "-I", sc.guest_inner, sc.host_inner],
                       capture_output=True)  # fmt: skip
        res["status"] = control.request(sc.guest_ifname, {"cmd": "status"}, timeout=30)["status"]
        # the Child SA rekey (rekey_time): wait for a new outbound Child SA, then traffic on it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = control.request(sc.guest_ifname, {"cmd": "status"}, timeout=30)["status"]
            chs = [ch for p in st["peers"] for ch in p["child_sas"]]
            if any(ch["outbound"] and ch["spi_in"] not in first for ch in chs) and len(chs) == 1:
                break
            time.sleep(0.2)
        res["rekeyed_seconds"] = round(time.monotonic() - t0, 1)
        r = subprocess.run(
            ["ping", "-c", "3", "-W", "5", "-I", sc.guest_inner, sc.host_inner],
            capture_output=True,
            text=True,
        )
        res["ping_after_rekey_rc"] = r.returncode
        try:
            res["transfer_after_rekey"] = transfer(sc)
        except OSError as e:
            res["transfer_after_rekey"] = {"error": str(e)}
        subprocess.run(["ping", "-c", "1", "-W", "5", "-I", sc.guest_inner, sc.host_inner],
                       capture_output=True)  # fmt: skip
        res["status_after_rekey"] = control.request(sc.guest_ifname, {"cmd": "status"}, timeout=30)[
            "status"
        ]
        res["kernel_sas"] = [
            {"spi": x.spi, "src": x.src, "dst": x.dst, "if_id": x.if_id, "encap": bool(x.encap),
             "enc": x.enc_alg, "auth": x.auth_alg}
            for x in xfrm.dump_sas()
        ]  # fmt: skip
        res["dumped_policies"] = len(xfrm.dump_policies())
        res["interface_kind"] = (
            "xfrm" if " xfrm " in sh("ip", "-d", "link", "show", sc.guest_ifname) else "?"
        )
    finally:
        _stop(proc, res)
    return _after_exit(res, sc, t0)


def _stop(proc: subprocess.Popen, res: dict) -> None:
    """SIGTERM the tunnel process (what `simpletun down` does) and record its exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        res["exit_rc"] = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        res["exit_rc"] = proc.wait()


def _after_exit(res: dict, sc, t0: float) -> dict:
    """What the tunnel left behind in the guest kernel after it exited, and its log."""
    res["left_after_exit"] = len(xfrm.dump_sas()) + len(xfrm.dump_policies())
    res["interface_left"] = (
        subprocess.run(["ip", "link", "show", sc.guest_ifname], capture_output=True).returncode == 0
    )
    res["tunnel_log"] = tunnel_log(sc)
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def xfrm_interface_check(nic: str) -> dict:
    try:
        idx = xfrm.add_interface("ipsec7", 7, link=nic)
        sh("ip", "link", "set", "ipsec7", "up")
        kind = sh("ip", "-d", "link", "show", "ipsec7")
        xfrm.delete_interface("ipsec7")
        return {"ifindex": idx, "if_id_7": "if_id 0x7" in kind or "if_id 7" in kind}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def bench() -> dict:
    """scripts/bench_kernel.py in the guest, for correctness only (emulated timings): its kernel
    ESP row keys two guest namespaces from one manual key file and moves iperf3 traffic."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_kernel.py")
    spec = importlib.util.spec_from_file_location("bench_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        rc = mod.main(
            ["--time", "1", "--pings", "3", "--interval", "0.2", "--emulated", "--esn"]
            + ["--json", "/tmp/bench.json", "--png", "/tmp/bench.png"]
        )
        with open("/tmp/bench.json") as f:
            return {"rc": rc} | json.load(f)
    except Exception:
        return {"error": traceback.format_exc()}


def main() -> None:
    group, nic, keys_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    t0 = time.monotonic()
    emit("START", {"group": group, "kernel": os.uname().release})
    for sc in GROUPS[group]:
        try:
            emit("RESULT", (run_ike_scenario if sc.ike else run_scenario)(sc, nic, keys_dir))
        except Exception:
            emit("RESULT", {"scenario": sc.name, "error": traceback.format_exc()})
    if group in ("esp", "all"):
        emit("XFRMI", xfrm_interface_check(nic))
    if group == "all":
        emit("BENCH", bench())
    emit("END", {"seconds": round(time.monotonic() - t0, 1)})


if __name__ == "__main__":
    main()
