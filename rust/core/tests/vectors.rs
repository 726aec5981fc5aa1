//! Known-answer vectors from `tests/vectors/*.txt` (format: `tests/vectors/README.md`), run
//! through the public API of `simpletun_core`: `crypto::{Cipher, Hmac256}` and
//! `SecurityAssociation::decap_in_place`. The same files are checked on the Python side with
//! the `cryptography` package (`tests/test_vectors.py`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use simpletun_core::crypto::{Cipher, Hmac256, ICV_LEN};
use simpletun_core::esp::PAYLOAD_OFFSET;
use simpletun_core::SecurityAssociation;

/// One record: its `case` name, the line it starts on, and its byte-string fields.
#[derive(Debug)]
struct Record {
    case: String,
    line: usize,
    fields: BTreeMap<String, Vec<u8>>,
}

impl Record {
    fn get(&self, name: &str) -> &[u8] {
        self.fields
            .get(name)
            .unwrap_or_else(|| panic!("{} (line {}): missing field {name:?}", self.case, self.line))
    }
    fn opt(&self, name: &str) -> Option<&[u8]> {
        self.fields.get(name).map(|v| v.as_slice())
    }
    fn iv(&self, name: &str) -> [u8; 16] {
        self.get(name)
            .try_into()
            .unwrap_or_else(|_| panic!("{}: {name} is not 16 bytes", self.case))
    }
    fn be(&self, name: &str) -> u64 {
        let v = self.get(name);
        assert!(v.len() <= 8, "{}: {name} longer than 8 bytes", self.case);
        v.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64)
    }
}

fn decode_value(text: &str, where_: &str) -> Vec<u8> {
    if text.len() >= 2 && text.starts_with('"') && text.ends_with('"') {
        let s = &text[1..text.len() - 1];
        assert!(s.is_ascii(), "{where_}: non-ASCII string");
        return s.as_bytes().to_vec();
    }
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len() % 2 == 0, "{where_}: odd number of hex digits");
    digits
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).unwrap();
            u8::from_str_radix(s, 16).unwrap_or_else(|_| panic!("{where_}: bad hex {s:?}"))
        })
        .collect()
}

fn parse(text: &str, file: &str) -> Vec<Record> {
    let mut out = Vec::new();
    // (name, raw text parts) in order, for the record being read.
    let mut raw: Vec<(String, Vec<String>)> = Vec::new();
    let mut start = 0;
    let mut flush = |raw: &mut Vec<(String, Vec<String>)>, start: usize| {
        if raw.is_empty() {
            return;
        }
        let where_ = format!("{file}:{start}");
        assert_eq!(
            raw[0].0, "case",
            "{where_}: a record must start with 'case ='"
        );
        let case = raw[0].1.join(" ");
        let mut fields = BTreeMap::new();
        for (name, parts) in raw.drain(..).skip(1) {
            let v = decode_value(&parts.join(" "), &format!("{where_} {name}"));
            assert!(
                fields.insert(name.clone(), v).is_none(),
                "{where_}: {name} repeated"
            );
        }
        out.push(Record {
            case,
            line: start,
            fields,
        });
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut raw, start);
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let last = raw
                .last_mut()
                .unwrap_or_else(|| panic!("{file}:{n}: stray continuation"));
            assert_ne!(last.0, "case", "{file}:{n}: the case line cannot continue");
            last.1.push(line.trim().to_string());
            continue;
        }
        let (name, value) = line
            .split_once(" =")
            .unwrap_or_else(|| panic!("{file}:{n}: expected 'name = value': {line:?}"));
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{file}:{n}: bad field name {name:?}"
        );
        if raw.is_empty() {
            start = n;
        }
        raw.push((name.to_string(), vec![value.trim().to_string()]));
    }
    flush(&mut raw, start);
    out
}

fn load(name: &str) -> Vec<Record> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "tests",
        "vectors",
        name,
    ]
    .iter()
    .collect();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse(&text, name)
}

#[test]
fn parser_reads_hex_strings_and_continuations() {
    let recs = parse(
        "# c\ncase = a b\nkey = 0a0B 0c\n      0d\ndata = \"Hi There\"\n\n\ncase = two\nx =\n",
        "t",
    );
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].case, "a b");
    assert_eq!(recs[0].get("key"), &[10, 11, 12, 13]);
    assert_eq!(recs[0].get("data"), b"Hi There");
    assert_eq!((recs[1].case.as_str(), recs[1].line), ("two", 8));
    assert_eq!(recs[1].get("x"), b"");
}

#[test]
#[should_panic(expected = "odd number of hex digits")]
fn parser_rejects_odd_hex() {
    parse("case = a\nkey = 012\n", "t");
}

#[test]
#[should_panic(expected = "must start with 'case ='")]
fn parser_rejects_record_without_case() {
    parse("key = 00\n", "t");
}

#[test]
fn aes_cbc_vectors() {
    let recs = load("aes_cbc.txt");
    let mut bits_seen = Vec::new();
    for r in &recs {
        let key = r.get("key");
        let iv = r.iv("iv");
        let (pt, ct) = (r.get("plaintext"), r.get("ciphertext"));
        assert!(
            !pt.is_empty() && pt.len() == ct.len() && pt.len() % 16 == 0,
            "{}",
            r.case
        );
        let cipher = Cipher::new(key).unwrap_or_else(|| panic!("{}: key refused", r.case));
        assert_eq!(cipher.key_bits() as usize, key.len() * 8, "{}", r.case);
        bits_seen.push(cipher.key_bits());

        let mut buf = pt.to_vec();
        cipher.cbc_encrypt(&iv, &mut buf);
        assert_eq!(buf, ct, "{}: encrypt", r.case);
        cipher.cbc_decrypt(&iv, &mut buf);
        assert_eq!(buf, pt, "{}: decrypt", r.case);

        // The first block alone, through the raw block cipher: E(P1 ^ IV) = C1.
        let mut block = [0u8; 16];
        for (i, b) in block.iter_mut().enumerate() {
            *b = pt[i] ^ iv[i];
        }
        cipher.encrypt_block(&mut block);
        assert_eq!(&block[..], &ct[..16], "{}: single block", r.case);
    }
    // RFC 3602 cases 1-5 and SP 800-38A F.2.1/3/5: all three key sizes are covered.
    assert!(
        recs.len() >= 8,
        "aes_cbc.txt has only {} records",
        recs.len()
    );
    for bits in [128, 192, 256] {
        assert!(bits_seen.contains(&bits), "no AES-{bits} vector");
    }
}

#[test]
fn hmac_sha256_vectors() {
    let recs = load("hmac_sha256.txt");
    let mut icv_checked = 0;
    for r in &recs {
        let mac = Hmac256::new(r.get("key"));
        let data = r.get("data");
        let full = mac.mac(&[data]);
        let icv = mac.icv(&[data]);
        assert!(
            r.opt("mac").is_some() || r.opt("icv").is_some(),
            "{}: no result",
            r.case
        );
        if let Some(want) = r.opt("mac") {
            assert_eq!(&full[..], want, "{}: mac", r.case);
            assert_eq!(
                &icv[..],
                &want[..ICV_LEN],
                "{}: icv = first 16 bytes of mac",
                r.case
            );
        }
        if let Some(want) = r.opt("icv") {
            assert_eq!(&icv[..], want, "{}: icv", r.case);
            icv_checked += 1;
        }
        // `parts` are concatenated: every split of the data gives the same result.
        for cut in 0..=data.len() {
            assert_eq!(
                mac.icv(&[&data[..cut], &data[cut..]]),
                icv,
                "{}: split at {cut}",
                r.case
            );
        }
        // The keyed state is reused, not consumed: a second call gives the same value.
        assert_eq!(mac.mac(&[data]), full, "{}: second use", r.case);
    }
    // RFC 4231 cases 1-7 and RFC 4868 AUTH256-1..4.
    assert_eq!(recs.len(), 11, "hmac_sha256.txt record count");
    assert_eq!(
        icv_checked, 5,
        "RFC 4231 case 5 and the four RFC 4868 authenticators"
    );
}

#[test]
fn cipher_refuses_other_key_lengths() {
    for n in [0usize, 1, 8, 15, 17, 20, 23, 25, 31, 33, 48, 64] {
        assert!(
            Cipher::new(&vec![0u8; n]).is_none(),
            "{n}-byte key accepted"
        );
    }
}

/// Records with the same SPI, ESN flag and keys share one receiving SA and are decapsulated in
/// file order (README.md).
#[test]
fn esp_packet_vectors_decap() {
    let recs = load("esp_packets.txt");
    assert!(
        recs.len() >= 6,
        "esp_packets.txt has only {} records",
        recs.len()
    );
    let mut sas: Vec<(Vec<u8>, SecurityAssociation)> = Vec::new();
    for r in &recs {
        let id: Vec<u8> = ["spi", "esn", "enc_key", "auth_key"]
            .iter()
            .flat_map(|f| r.get(f).iter().copied().chain([0xff]))
            .collect();
        let esn = match r.get("esn") {
            [0] => false,
            [1] => true,
            other => panic!("{}: esn = {other:?}", r.case),
        };
        if !sas.iter().any(|(k, _)| *k == id) {
            let sa = SecurityAssociation::new(
                r.be("spi") as u32,
                r.get("enc_key"),
                r.get("auth_key"),
                64,
                esn,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", r.case));
            sas.push((id.clone(), sa));
        }
        let sa = &mut sas.iter_mut().find(|(k, _)| *k == id).unwrap().1;
        let before = sa.rx_highest_seq();
        let seq = r.be("seq");
        let mut pkt = r.get("packet").to_vec();
        let d = sa
            .decap_in_place(&mut pkt)
            .unwrap_or_else(|e| panic!("{}: {e}", r.case));
        assert_eq!(d.seq, seq, "{}: inferred sequence number", r.case);
        assert_eq!(d.next_header, r.get("next_header")[0], "{}", r.case);
        assert_eq!(d.inner.start, PAYLOAD_OFFSET, "{}", r.case);
        assert_eq!(&pkt[d.inner.clone()], r.get("inner"), "{}: inner", r.case);
        assert_eq!(
            sa.rx_highest_seq(),
            before.max(seq),
            "{}: window top",
            r.case
        );
        // And once is enough: the same packet again is a replay.
        let again = sa.decap(r.get("packet"));
        assert_eq!(
            again,
            Err(simpletun_core::DropReason::Replay),
            "{}: replay",
            r.case
        );
    }
}
