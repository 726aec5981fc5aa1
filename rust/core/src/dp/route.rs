//! Inner-packet addressing: allowed prefixes, longest-prefix match, address extraction.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    v6: bool,
    bits: u128,
    len: u8,
}

fn mask(len: u8, width: u8) -> u128 {
    if len == 0 {
        0
    } else {
        (u128::MAX << (128 - len as u32)) >> (128 - width as u32)
    }
}

fn key(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(a) => (false, u32::from(a) as u128),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

impl Prefix {
    /// `addr/len`; `None` if `len` exceeds the address width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let (v6, bits) = key(addr);
        let width = if v6 { 128 } else { 32 };
        if len > width {
            return None;
        }
        Some(Prefix {
            v6,
            bits: bits & mask(len, width),
            len,
        })
    }

    pub fn len(&self) -> u8 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let (v6, bits) = key(addr);
        let width = if v6 { 128 } else { 32 };
        v6 == self.v6 && bits & mask(self.len, width) == self.bits
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a: IpAddr = if self.v6 {
            IpAddr::V6(self.bits.into())
        } else {
            IpAddr::V4((self.bits as u32).into())
        };
        write!(f, "{a}/{}", self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        let bad = || format!("{s:?} is not an IPv4/IPv6 prefix like 10.0.0.0/24 or fd00::/64");
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let width = if addr.is_ipv6() { 128 } else { 32 };
        let len = match l {
            Some(l) => l.parse::<u8>().map_err(|_| bad())?,
            None => width,
        };
        Prefix::new(addr, len).ok_or_else(bad)
    }
}

/// Source and destination of an inner IP packet; `None` unless a well-formed IPv4/IPv6 header.
pub fn inner_addrs(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let s: [u8; 4] = pkt[12..16].try_into().ok()?;
            let d: [u8; 4] = pkt[16..20].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 if pkt.len() >= 40 => {
            let s: [u8; 16] = pkt[8..24].try_into().ok()?;
            let d: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

/// Longest-prefix-match table from prefixes to peer ids (linear scan over a list sorted by
/// decreasing prefix length; tunnels have few peers).
#[derive(Default, Clone)]
pub struct RouteTable {
    entries: Vec<(Prefix, u32)>,
}

impl RouteTable {
    pub fn insert(&mut self, p: Prefix, peer: u32) {
        self.entries.push((p, peer));
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.0.len));
    }
    pub fn remove_peer(&mut self, peer: u32) {
        self.entries.retain(|(_, id)| *id != peer);
    }
    /// The peer already owning exactly this prefix, if any.
    pub fn owner(&self, p: &Prefix) -> Option<u32> {
        self.entries.iter().find(|(q, _)| q == p).map(|(_, id)| *id)
    }
    pub fn lookup(&self, addr: IpAddr) -> Option<u32> {
        self.entries
            .iter()
            .find(|(p, _)| p.contains(addr))
            .map(|(_, id)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm() {
        let mut t = RouteTable::default();
        t.insert("10.0.0.0/8".parse().unwrap(), 1);
        t.insert("10.1.0.0/16".parse().unwrap(), 2);
        t.insert("::/0".parse().unwrap(), 3);
        t.insert("10.1.2.3".parse().unwrap(), 4);
        assert_eq!(t.lookup("10.9.9.9".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("10.1.9.9".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(4));
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), Some(3));
        assert_eq!(t.lookup("192.168.0.1".parse().unwrap()), None);
        assert_eq!(
            "10.1.2.3/8".parse::<Prefix>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("0.0.0.0/0"
            .parse::<Prefix>()
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }
}

/// A hash of an inner IP packet's flow, the same for both directions: the addresses and, for
/// TCP and UDP (unfragmented IPv4, IPv6 without extension headers), the ports, each pair
/// taken in sorted order. Packets that are not IP hash to 0. Every bit depends on every input
/// byte (FNV-1a, then a 64-bit finaliser), so [`pick`] spreads flows whose ports differ only
/// in a few bits (Linux gives `connect` even ports).
pub fn flow_hash(pkt: &[u8]) -> u64 {
    let (a, b, proto, l4) = match pkt.first().map(|v| v >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0;
            let l4 = (!frag && ihl >= 20).then_some(ihl);
            (&pkt[12..16], &pkt[16..20], pkt[9], l4)
        }
        Some(6) if pkt.len() >= 40 => (&pkt[8..24], &pkt[24..40], pkt[6], Some(40)),
        _ => return 0,
    };
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |bytes: &[u8]| {
        for &x in bytes {
            h = (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    mix(lo);
    mix(hi);
    mix(&[proto]);
    if let Some(off) = l4.filter(|&o| matches!(proto, 6 | 17) && pkt.len() >= o + 4) {
        let (p, q) = (&pkt[off..off + 2], &pkt[off + 2..off + 4]);
        let (p, q) = if p <= q { (p, q) } else { (q, p) };
        mix(p);
        mix(q);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Which of `n` queues a flow hash picks (the high bits: multiply and shift).
pub fn pick(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod flow_tests {
    use super::{flow_hash, pick};

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn symmetric_and_port_sensitive() {
        let a = tcp4([10, 0, 0, 1], [10, 0, 0, 2], 40000, 5201);
        let b = tcp4([10, 0, 0, 2], [10, 0, 0, 1], 5201, 40000);
        assert_eq!(flow_hash(&a), flow_hash(&b));
        let c = tcp4([10, 0, 0, 1], [10, 0, 0, 2], 40001, 5201);
        assert_ne!(flow_hash(&a), flow_hash(&c));
        assert_eq!(flow_hash(&[0x10, 0, 0]), 0);
        // Eight connections from even ports (as Linux picks them) use both of two queues.
        let used: std::collections::HashSet<usize> = (0..8)
            .map(|i| {
                pick(
                    flow_hash(&tcp4([10, 0, 0, 2], [10, 0, 0, 1], 40000 + 2 * i, 5201)),
                    2,
                )
            })
            .collect();
        assert_eq!(used.len(), 2);
        assert!((0..1000u64).all(|h| pick(h.wrapping_mul(0x9e37_79b9_7f4a_7c15), 3) < 3));
        assert_eq!(pick(u64::MAX, 2), 1);
        assert_eq!(flow_hash(&[]), 0);
    }
}
