#!/usr/bin/env python3
"""Turn a strongSwan charon level-4 log (of one IKE_SA_INIT + IKE_AUTH with a PSK, charon as
responder) into a known-answer record for tests/vectors/ikev2_kdf.txt.

charon logs at level 4 the DH shared secret, SKEYSEED, SK_d/ai/ar/ei/er/pi/pr, the AUTH octets
and values, and the Child SA seed (Ni | Nr) and keys; the SPIs are the first 16 bytes of the
responder's AUTH octets (its IKE_SA_INIT response). Usage:
    ike_vectors_from_charon.py CASE_NAME charon.log >> tests/vectors/ikev2_kdf.txt
"""

import re
import sys

HEAD = re.compile(r"\[(IKE|CHD)\] (.*?) => (\d+) bytes @")
LINE = re.compile(r"\[(?:IKE|CHD)\]\s+\d+: ((?:[0-9A-F]{2} ){1,16})")


def dumps(text: str) -> list[tuple[str, bytes]]:
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = HEAD.search(lines[i])
        i += 1
        if not m:
            continue
        name, n, data = m.group(2).strip(), int(m.group(3)), b""
        while i < len(lines) and len(data) < n and (ml := LINE.search(lines[i])):
            data += bytes.fromhex(ml.group(1).replace(" ", ""))
            i += 1
        out.append((name, data))
    return out


def main() -> None:
    case, path = sys.argv[1], sys.argv[2]
    d = dumps(open(path, errors="replace").read())

    def all_of(name):
        return [v for k, v in d if k == name]

    octets = all_of("octets = message + nonce + prf(Sk_px, IDx')")
    auths = all_of("AUTH = prf(prf(secret, keypad), octets)")
    ids = all_of("IDx'")
    seed = all_of("seed")[0]
    rec = {
        "case": case,
        "spi_i": octets[1][:8],
        "spi_r": octets[1][8:16],
        "ni": seed[: len(seed) // 2],
        "nr": seed[len(seed) // 2 :],
        "g_ir": all_of("shared Diffie Hellman secret")[0],
        "skeyseed": all_of("SKEYSEED")[0],
    }
    for k in ("d", "ai", "ar", "ei", "er", "pi", "pr"):
        rec[f"sk_{k}"] = all_of(f"Sk_{k} secret")[0]
    rec.update(
        psk=all_of("secret")[0], id_i=ids[0], octets_i=octets[0], auth_i=auths[0],
        id_r=ids[1], octets_r=octets[1], auth_r=auths[1],
        child_enc_i=all_of("encryption initiator key")[0],
        child_integ_i=all_of("integrity initiator key")[0],
        child_enc_r=all_of("encryption responder key")[0],
        child_integ_r=all_of("integrity responder key")[0],
    )  # fmt: skip
    print(f"# source: strongSwan 5.9.8 charon level-4 log ({case}), charon as responder")
    for k, v in rec.items():
        if isinstance(v, str):
            print(f"{k} = {v}")
            continue
        h = v.hex()
        print(f"{k} = {h[:64]}")
        for j in range(64, len(h), 64):
            print(f"    {h[j : j + 64]}")
    print()


if __name__ == "__main__":
    main()
