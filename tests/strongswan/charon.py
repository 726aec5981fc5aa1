"""strongSwan 5.9's charon (with kernel-libipsec: userspace ESP over UDP 4500) as a test peer.

One :class:`Charon` runs in one network namespace of a :class:`netns.lab.Lab`. Its state
directory holds strongswan.conf (an explicit plugin list, nothing read from /etc:
``STRONGSWAN_CONF``), swanctl.conf, the credential folders, the log and the vici socket.
charon hard-codes /var/run/charon.pid, so it runs in a private mount namespace with the state
directory's ``run/`` bound over /run; the process the lab spawns execs into charon, so the
lab's PID is charon's and the lab stops it by that PID (SIGTERM: charon sends Delete first).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = (
    "random nonce openssl aes sha1 sha2 hmac gcm curve25519 kdf gmp pem pkcs1 pkcs8 x509 pubkey "
    "kernel-libipsec kernel-netlink socket-default vici updown"
)


def missing() -> list[str]:
    out = []
    if not os.path.exists(CHARON):
        out.append(f"{CHARON} missing (strongswan-charon; run scripts/setup.sh)")
    if shutil.which("swanctl") is None:
        out.append("swanctl missing (strongswan-swanctl; run scripts/setup.sh)")
    if not os.path.exists("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"):
        out.append("kernel-libipsec plugin missing (libcharon-extra-plugins)")
    return out


class Charon:
    def __init__(
        self,
        lab,
        ns: str,
        workdir: Path,
        *,
        local: str,
        remote: str = "%any",
        local_ts: str,
        remote_ts: str,
        local_id: str | None = None,
        remote_id: str | None = None,
        psk: str | None = None,
        local_key_pem: bytes | None = None,  # PKCS#8 Ed25519 private key
        remote_pub_pem: bytes | None = None,  # SubjectPublicKeyInfo of the peer's Ed25519 key
        ike: str = "aes128-sha256-x25519",
        esp: str = "aes128-sha256,aes256-sha256",
        rekey_time: str = "1h",
        ike_rekey_time: str = "4h",
        rand_time: str = "0s",
        dpd_delay: str = "0s",
        cookie_threshold: int = 30,
        log_level: int = 4,
        inner_addr: str | None = None,
    ):
        self.lab = lab
        self.dir = Path(workdir)
        self.ns = ns
        self.conn = "peer"
        self.child = "net"
        d = self.dir
        (d / "run").mkdir(parents=True, exist_ok=True)
        sw = d / "swanctl"
        for sub in ("x509", "x509ca", "pubkey", "private", "pkcs8", "rsa", "ecdsa"):
            (sw / sub).mkdir(parents=True, exist_ok=True)
        self.log_path = d / "charon.log"
        self.vici = d / "vici.sock"
        conf = [
            "charon {",
            "  load_modular = no",
            f"  load = {PLUGINS}",
            f"  cookie_threshold = {cookie_threshold}",
            "  install_virtual_ip = no",
            "  retransmit_timeout = 1.0",
            "  retransmit_tries = 3",
            "  plugins {",
            "    vici {",
            f"      socket = unix://{self.vici}",
            "    }",
            "  }",
            "  syslog {",
            "    daemon {",
            "      default = -1",
            "    }",
            "  }",
            "  filelog {",
            "    charonlog {",
            f"      path = {self.log_path}",
            "      time_format = %H:%M:%S",
            "      append = no",
            "      flush_line = yes",
            "      default = 1",
            f"      ike = {log_level}",
            f"      cfg = {log_level}",
            f"      chd = {log_level}",
            "      enc = 1",
            f"      mgr = {log_level}",
            "      net = 1",
            "      esp = 1",
            "      knl = 1",
            "      job = 1",
            "      lib = 1",
            "    }",
            "  }",
            "}",
            "swanctl {",
            "  load = random nonce openssl pem pkcs1 pkcs8 x509 pubkey curve25519",
            "}",
        ]
        (d / "strongswan.conf").write_text("\n".join(conf) + "\n")
        local_id = local_id or local
        remote_id = remote_id or (remote if remote != "%any" else "%any")
        if psk is not None:
            lauth = ["      auth = psk", f"      id = {local_id}"]
            rauth = ["      auth = psk", f"      id = {remote_id}"]
        else:
            (sw / "pkcs8" / "local.pem").write_bytes(local_key_pem)
            (sw / "pubkey" / "local.pub.pem").write_bytes(_pub_of(local_key_pem))
            (sw / "pubkey" / "remote.pub.pem").write_bytes(remote_pub_pem)
            lauth = [
                "      auth = pubkey",
                f"      id = {local_id}",
                "      pubkeys = local.pub.pem",
            ]
            rauth = [
                "      auth = pubkey",
                f"      id = {remote_id}",
                "      pubkeys = remote.pub.pem",
            ]
        sc = [
            "connections {",
            f"  {self.conn} {{",
            "    version = 2",
            f"    local_addrs = {local}",
            f"    remote_addrs = {remote}",
            f"    proposals = {ike}",
            "    encap = yes",
            "    mobike = no",
            f"    rekey_time = {ike_rekey_time}",
            f"    rand_time = {rand_time}",
            f"    dpd_delay = {dpd_delay}",
            "    local {",
            *lauth,
            "    }",
            "    remote {",
            *rauth,
            "    }",
            "    children {",
            f"      {self.child} {{",
            "        mode = tunnel",
            f"        local_ts = {local_ts}",
            f"        remote_ts = {remote_ts}",
            f"        esp_proposals = {esp}",
            f"        rekey_time = {rekey_time}",
            f"        rand_time = {rand_time}",
            "        start_action = none",
            "      }",
            "    }",
            "  }",
            "}",
        ]
        if psk is not None:
            sc += [
                "secrets {",
                f"  ike-{self.conn} {{",
                f"    id-local = {local_id}",
                *([f"    id-remote = {remote_id}"] if remote_id != "%any" else []),
                f'    secret = "{psk}"',
                "  }",
                "}",
            ]
        (sw / "swanctl.conf").write_text("\n".join(sc) + "\n")
        os.chmod(sw / "swanctl.conf", 0o600)
        if inner_addr:
            # charon's route for the Child SA needs a local address inside local_ts; this
            # kernel has no dummy driver, so it goes on lo
            lab.run(ns, ["ip", "addr", "add", f"{inner_addr}/32", "dev", "lo"])
        self.env = dict(os.environ, STRONGSWAN_CONF=str(d / "strongswan.conf"))
        script = 'mount --bind "$1" /run && exec "$2"'
        self.proc = lab.spawn(
            ns,
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(d / "run"), CHARON],
            name="charon",
            env=self.env,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.vici.exists():
            if not self.proc.alive():
                raise RuntimeError(f"charon exited at start:\n{self.log()}\n{self.proc.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"charon: no vici socket after 10 s\n{self.log()}")
            time.sleep(0.05)
        out = self.swanctl("--load-all", "--noprompt", "--file", str(sw / "swanctl.conf"))
        if "loaded connection 'peer'" not in out:
            raise RuntimeError(f"swanctl --load-all: {out}")

    def swanctl(self, cmd: str, *args: str, timeout: float = 30, check: bool = True) -> str:
        p = subprocess.run(
            ["swanctl", cmd, "--uri", f"unix://{self.vici}", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and p.returncode != 0:
            raise RuntimeError(f"swanctl {cmd} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p.stdout + p.stderr

    def swanctl_bg(self, cmd: str, *args: str) -> subprocess.Popen:
        """A swanctl command that waits for the peer (us): run it while the driver runs."""
        return subprocess.Popen(
            ["swanctl", cmd, "--uri", f"unix://{self.vici}", *args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def initiate(self, *, wait: bool = False) -> subprocess.Popen | str:
        """Bring the CHILD_SA up from charon's side (in the background unless ``wait``)."""
        argv = ["swanctl", "--initiate", "--uri", f"unix://{self.vici}", "--child", self.child,
                "--timeout", "20"]  # fmt: skip
        if wait:
            return subprocess.run(argv, env=self.env, capture_output=True, text=True).stdout
        return subprocess.Popen(
            argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def list_sas(self) -> str:
        return self.swanctl("--list-sas")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.proc.stop(timeout=5)

    def child_keys(self) -> list[dict[str, bytes]]:
        """The Child SA keys charon logged at level 4, one dict per Child SA in log order:
        ``encryption initiator``, ``integrity initiator``, ``encryption responder``, ..."""
        return parse_key_dumps(self.log(), r"(encryption|integrity) (initiator|responder) key")


_DUMP_HEAD = re.compile(r"\[CHD\] (.*?) => (\d+) bytes @")
_DUMP_LINE = re.compile(r"\[CHD\]\s+\d+: ((?:[0-9A-F]{2} ){1,16})")


def parse_key_dumps(text: str, name_rx: str) -> list[dict[str, bytes]]:
    """Hex dumps ``NAME => N bytes @ 0x...`` followed by ``   0: 8F 2A ...`` lines."""
    out: list[dict[str, bytes]] = []
    cur: dict[str, bytes] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        mh = _DUMP_HEAD.search(lines[i])
        if mh and re.fullmatch(name_rx, mh.group(1).strip()):
            name, n = mh.group(1).strip(), int(mh.group(2))
            data = b""
            i += 1
            while i < len(lines) and len(data) < n:
                ml = _DUMP_LINE.search(lines[i])
                if not ml:
                    break
                data += bytes.fromhex(ml.group(1).replace(" ", ""))
                i += 1
            if name in cur:
                out.append(cur)
                cur = {}
            cur[name] = data
            if len(cur) == 4:
                out.append(cur)
                cur = {}
            continue
        i += 1
    if cur:
        out.append(cur)
    return out


def _pub_of(private_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
