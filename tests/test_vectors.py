"""Known-answer vectors (tests/vectors/*.txt, format in tests/vectors/README.md).

Each file is checked twice: through the ``cryptography`` package (which validates the data files
themselves, independently of simpletun) and through the ``simpletun`` extension. The extension
exposes only ESP-level API, so the primitives are reached through ESP packets: each AES-CBC
vector's IV and ciphertext, completed into an authentic ESP packet, must decap to the vector's
plaintext; packets built by our SA under the vectors' keys must carry exactly the ciphertext and
ICV the (vector-checked) reference primitives give; and the whole-packet vectors of
esp_packets.txt (the first embeds RFC 3602 case 5) must decap to their inner packets.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from esp_reference import RefSA, cbc_decrypt, cbc_encrypt, hmac_sha256

from simpletun import ReplayError, SecurityAssociation

VECTOR_DIR = Path(__file__).parent / "vectors"
_FIELD = re.compile(r"^([a-z0-9_]+) =(?: (.*))?$")


class VectorFormatError(ValueError):
    pass


def _value(text: str, where: str) -> bytes:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].encode("ascii")
    digits = "".join(text.split())
    if not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", digits):
        raise VectorFormatError(f"{where}: not hex and not a quoted string: {text!r}")
    return bytes.fromhex(digits)


def parse_vectors(text: str, filename: str = "<text>") -> list[dict]:
    """Parse the vector format into dicts: ``case`` (str), ``line`` (int), and bytes fields."""
    records: list[dict] = []
    raw: dict[str, list[str]] = {}
    start = 0
    last: str | None = None

    def flush() -> None:
        nonlocal raw, last
        if raw:
            where = f"{filename}:{start}"
            if "case" not in raw:
                raise VectorFormatError(f"{where}: record without 'case ='")
            rec: dict = {"case": " ".join(raw.pop("case")), "line": start}
            for name, parts in raw.items():
                rec[name] = _value(" ".join(parts), f"{where} {name}")
            records.append(rec)
        raw, last = {}, None

    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            flush()
            continue
        if line[0] in " \t":
            if last is None or last == "case":
                raise VectorFormatError(f"{filename}:{n}: continuation line without a hex value")
            raw[last].append(line.strip())
            continue
        m = _FIELD.match(line.rstrip())
        if not m:
            raise VectorFormatError(f"{filename}:{n}: expected 'name = value': {line!r}")
        name, value = m.group(1), m.group(2) or ""
        if name in raw:
            raise VectorFormatError(f"{filename}:{n}: field {name!r} repeated")
        if not raw:
            start = n
            if name != "case":
                raise VectorFormatError(f"{filename}:{n}: a record must start with 'case ='")
        raw[name] = [value]
        last = name
    flush()
    return records


def load(name: str) -> list[dict]:
    path = VECTOR_DIR / name
    return parse_vectors(path.read_text(encoding="ascii"), name)


def cases(name: str):
    return [pytest.param(r, id=r["case"]) for r in load(name)]


def require(rec: dict, *fields: str) -> None:
    missing = [f for f in fields if f not in rec]
    assert not missing, f"{rec['case']} (line {rec['line']}) lacks {missing}"


# --- the parser itself --------------------------------------------------------------------------


def test_parser_reads_hex_ascii_and_continuations():
    text = (
        "# comment\n"
        "case = one two\n"
        "key = 0a0B 0c\n"
        "      0d\n"
        'data = "Hi There"\n'
        "\n\n"
        "# another\n"
        "case = second\n"
        "x =\n"
    )
    recs = parse_vectors(text)
    assert recs == [
        {"case": "one two", "line": 2, "key": bytes([10, 11, 12, 13]), "data": b"Hi There"},
        {"case": "second", "line": 9, "x": b""},
    ]


@pytest.mark.parametrize(
    "text",
    [
        "key = 00\n",  # no case line first
        "case = a\nkey = 0\n",  # odd number of hex digits
        "case = a\nkey = zz\n",  # not hex
        "case = a\nkey = 00\nkey = 01\n",  # repeated field
        "case = a\n  00\n",  # continuation of the case line
        "case = a\nKey: 00\n",  # not name = value
    ],
)
def test_parser_rejects_malformed_files(text):
    with pytest.raises(VectorFormatError):
        parse_vectors(text)


def test_vector_files_have_the_expected_cases():
    """Guards against a file being emptied or cut short: the generic tests would pass on nothing."""
    names = {r["case"] for r in load("aes_cbc.txt")}
    assert {f"RFC 3602 case {i}" for i in range(1, 6)} <= {n.split(" (")[0] for n in names}
    assert {len(r["key"]) for r in load("aes_cbc.txt")} == {16, 24, 32}
    hm = [r["case"] for r in load("hmac_sha256.txt")]
    assert [c for c in hm if c.startswith("RFC 4231 case")] == [
        "RFC 4231 case 1",
        "RFC 4231 case 2",
        "RFC 4231 case 3",
        "RFC 4231 case 4",
        "RFC 4231 case 5 (truncated to 128 bits)",
        "RFC 4231 case 6",
        "RFC 4231 case 7",
    ]
    assert [c for c in hm if c.startswith("RFC 4868")] == [
        f"RFC 4868 AUTH256-{i}" for i in (1, 2, 3, 4)
    ]
    assert len(load("esp_packets.txt")) >= 6


# --- the data files, checked with the cryptography package --------------------------------------


@pytest.mark.parametrize("rec", cases("aes_cbc.txt"))
def test_aes_cbc_vector_with_cryptography(rec):
    require(rec, "key", "iv", "plaintext", "ciphertext")
    assert len(rec["key"]) in (16, 24, 32)
    assert len(rec["plaintext"]) == len(rec["ciphertext"]) > 0
    assert len(rec["plaintext"]) % 16 == 0
    assert cbc_encrypt(rec["key"], rec["iv"], rec["plaintext"]) == rec["ciphertext"]
    assert cbc_decrypt(rec["key"], rec["iv"], rec["ciphertext"]) == rec["plaintext"]


@pytest.mark.parametrize("rec", cases("hmac_sha256.txt"))
def test_hmac_vector_with_cryptography(rec):
    require(rec, "key", "data")
    assert "mac" in rec or "icv" in rec
    full = hmac_sha256(rec["key"], rec["data"])
    if "mac" in rec:
        assert len(rec["mac"]) == 32
        assert full == rec["mac"]
    if "icv" in rec:
        assert len(rec["icv"]) == 16
        assert full[:16] == rec["icv"]


def _ref_sa(rec: dict) -> RefSA:
    return RefSA(
        spi=int.from_bytes(rec["spi"], "big"),
        enc_key=rec["enc_key"],
        auth_key=rec["auth_key"],
        esn=rec["esn"] == b"\x01",
    )


ESP_FIELDS = ("spi", "esn", "enc_key", "auth_key", "seq", "iv", "next_header", "inner", "packet")


@pytest.mark.parametrize("rec", cases("esp_packets.txt"))
def test_esp_packet_vector_with_reference(rec):
    """The reference ESP rebuilds each packet bit for bit, and takes it apart again."""
    require(rec, *ESP_FIELDS)
    assert len(rec["spi"]) == 4 and len(rec["seq"]) == 8 and len(rec["next_header"]) == 1
    assert rec["esn"] in (b"\x00", b"\x01")
    ref = _ref_sa(rec)
    seq = int.from_bytes(rec["seq"], "big")
    built = ref.encap(rec["inner"], seq=seq, iv=rec["iv"], next_header=rec["next_header"][0])
    assert built == rec["packet"]
    d = ref.decap(rec["packet"], seq_hi=seq >> 32)
    assert (d.next_header, d.inner, d.seq) == (rec["next_header"][0], rec["inner"], seq)


def test_esp_vector_embeds_rfc3602_case5():
    """The first ESP vector is RFC 3602 case 5 with an HMAC-SHA-256-128 ICV appended: its SPI,
    sequence number, IV and ciphertext are the RFC's, so our decap must parse the RFC's packet."""
    cbc = next(r for r in load("aes_cbc.txt") if r["case"].startswith("RFC 3602 case 5"))
    esp = load("esp_packets.txt")[0]
    assert esp["enc_key"] == cbc["key"]
    assert esp["packet"][:8] == bytes.fromhex("0000432100000001")
    assert esp["packet"][8:24] == cbc["iv"]
    assert esp["packet"][24:-16] == cbc["ciphertext"]
    assert esp["inner"] + bytes(range(1, 15)) + b"\x0e\x01" == cbc["plaintext"]


# --- through the extension ----------------------------------------------------------------------


def _esp_groups() -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for rec in load("esp_packets.txt"):
        key = (rec["spi"], rec["esn"], rec["enc_key"], rec["auth_key"])
        groups.setdefault(key, []).append(rec)
    return list(groups.values())


@pytest.mark.parametrize(
    "group", [pytest.param(g, id=" + ".join(r["case"] for r in g)) for g in _esp_groups()]
)
def test_esp_packet_vectors_decap_with_our_sa(group):
    """Records with the same keys go, in file order, through one receiving SA (README.md)."""
    first = group[0]
    sa = SecurityAssociation(
        spi=int.from_bytes(first["spi"], "big"),
        enc_key=first["enc_key"],
        auth_key=first["auth_key"],
        replay_window=64,
        esn=first["esn"] == b"\x01",
    )
    top = 0
    for rec in group:
        assert sa.decap(rec["packet"]) == (rec["next_header"][0], rec["inner"]), rec["case"]
        top = max(top, int.from_bytes(rec["seq"], "big"))
        assert sa.rx_highest_seq == top, rec["case"]
        with pytest.raises(ReplayError):
            sa.decap(rec["packet"])
    assert sa.stats["decap_packets"] == len(group)
    assert sa.stats["drop_replay"] == len(group)


AUTH_KEY = bytes(range(0xC0, 0xE0))


@pytest.mark.parametrize("rec", cases("aes_cbc.txt"))
def test_our_decap_gives_aes_cbc_vector_plaintext(rec):
    """An ESP packet whose IV and ciphertext are the vector's, followed by one more ciphertext
    block that decrypts to a valid trailer (pad 1..14, pad length 14, next header 4): our decap
    must return exactly the vector's plaintext, i.e. our AES-CBC decryption gives the RFC's."""
    key, iv, ct = rec["key"], rec["iv"], rec["ciphertext"]
    trailer = bytes(range(1, 15)) + bytes([14, 4])
    # CBC: P_last = D(C_last) ^ C_prev, so C_last = E(P_last ^ C_prev) (one block, zero IV = ECB).
    last = cbc_encrypt(key, bytes(16), bytes(a ^ b for a, b in zip(trailer, ct[-16:], strict=True)))
    ref = RefSA(spi=0x00004321, enc_key=key, auth_key=AUTH_KEY)
    authed = struct.pack(">II", ref.spi, 1) + iv + ct + last
    packet = authed + ref.icv(authed, 1)
    assert ref.decap(packet).inner == rec["plaintext"]  # the construction itself is right
    sa = SecurityAssociation(spi=ref.spi, enc_key=key, auth_key=AUTH_KEY, replay_window=64)
    assert sa.enc_key_bits == len(key) * 8
    assert sa.decap(packet) == (4, rec["plaintext"])


@pytest.mark.parametrize("rec", cases("aes_cbc.txt"))
def test_our_encap_is_aes_cbc_under_vector_key(rec):
    """Our SA encrypting the vector's plaintext: the reference (checked against this very vector
    above) decrypts and authenticates it, and re-encrypting our payload under our packet's IV
    with the vector's primitive gives our ciphertext bit for bit."""
    sa = SecurityAssociation(spi=0x00004321, enc_key=rec["key"], auth_key=AUTH_KEY)
    packet = sa.encap(rec["plaintext"], next_header=41)
    ref = RefSA(spi=0x00004321, enc_key=rec["key"], auth_key=AUTH_KEY)
    d = ref.decap(packet)
    assert (d.next_header, d.inner, d.seq) == (41, rec["plaintext"], 1)
    assert cbc_encrypt(rec["key"], d.iv, d.plaintext) == packet[24:-16]


def _auth_key_vectors():
    return [pytest.param(r, id=r["case"]) for r in load("hmac_sha256.txt") if len(r["key"]) == 32]


@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
@pytest.mark.parametrize("rec", _auth_key_vectors())
def test_our_icv_is_hmac_sha256_128_under_vector_key(rec, esn):
    """With a 32-byte vector key (RFC 4868 AUTH256-n) as the auth key, our ICV is
    HMAC-SHA-256-128 over SPI..ciphertext (+ seq high bits with ESN): the function that, on the
    vector's own data, gives the vector's result."""
    key = rec["key"]
    assert hmac_sha256(key, rec["data"])[:16] == rec.get("icv", rec.get("mac", b"")[:16])
    sa = SecurityAssociation(spi=0x01000000, enc_key=bytes(16), auth_key=key, esn=esn)
    seq = (5 << 32) + 9 if esn else 9
    sa._skip_tx_seq_to(seq - 1)
    packet = sa.encap(b"\x45" + bytes(39))
    tail = struct.pack(">I", seq >> 32) if esn else b""
    assert packet[4:8] == struct.pack(">I", seq & 0xFFFFFFFF)
    assert packet[-16:] == hmac_sha256(key, packet[:-16] + tail)[:16]
