//! UDP segmentation offloads for ESP-in-UDP: `UDP_SEGMENT` sends a run of equal-sized
//! datagrams to one destination as one message ([`gso_runs`] finds the runs,
//! `sys::send_groups` sends them), `UDP_GRO` lets one received message hold several datagrams
//! of one flow glued together, their size in a control message ([`gro_segment`], read by
//! `sys::recvmmsg`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::sys;

pub const SOL_UDP: libc::c_int = 17;
/// `UDP_SEGMENT` (send, `u16` segment size) and `UDP_GRO` (receive, `int` segment size).
pub const UDP_SEGMENT: libc::c_int = 103;
pub const UDP_GRO: libc::c_int = 104;
/// Most datagrams one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS` before 6.9).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes one `UDP_SEGMENT` send may carry (a UDP payload; IPv4 header included in 65535).
pub const GSO_MAX_BYTES: usize = 65535 - 20 - 8;

/// Whether the kernel knows `UDP_SEGMENT` on this socket (reading it works from Linux 4.18).
pub fn has_udp_segment(fd: RawFd) -> bool {
    sys::getsockopt_int(fd, SOL_UDP, UDP_SEGMENT).is_ok()
}

/// Ask the kernel to coalesce received datagrams (`UDP_GRO`, Linux 5.0); fails without it.
pub fn enable_udp_gro(fd: RawFd) -> io::Result<()> {
    sys::setsockopt_int(fd, SOL_UDP, UDP_GRO, 1)
}

/// The `UDP_GRO` segment size in a received message's control data, 0 if none.
///
/// # Safety
/// `msg` must be a message the kernel filled in, its control buffer still alive.
pub unsafe fn gro_segment(msg: &libc::msghdr) -> usize {
    let mut c = libc::CMSG_FIRSTHDR(msg);
    while !c.is_null() {
        if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
            let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
            return usize::try_from(v).unwrap_or(0);
        }
        c = libc::CMSG_NXTHDR(msg, c);
    }
    0
}

/// Runs of `pkts` one `UDP_SEGMENT` message can carry: consecutive datagrams to one
/// destination, all of the first one's length but the last (which may be shorter), at most
/// [`GSO_MAX_SEGMENTS`] and [`GSO_MAX_BYTES`]. Returns the run lengths, in order.
pub fn gso_runs(pkts: &[(&[u8], SocketAddr)]) -> Vec<usize> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < pkts.len() {
        let (first, to) = (pkts[i].0.len(), pkts[i].1);
        let mut n = 1;
        let mut total = first;
        while i + n < pkts.len() && n < GSO_MAX_SEGMENTS && first > 0 {
            let (p, t) = (pkts[i + n].0, pkts[i + n].1);
            if t != to || p.len() > first || total + p.len() > GSO_MAX_BYTES {
                break;
            }
            n += 1;
            total += p.len();
            if p.len() < first {
                break;
            }
        }
        runs.push(n);
        i += n;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn runs_follow_the_udp_segment_rules() {
        let a: SocketAddr = "192.0.2.1:4500".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:4500".parse().unwrap();
        let big = [0u8; 1000];
        let small = [0u8; 300];
        let pk = |p: &'static [u8], to| (p, to);
        let big: &'static [u8] = Box::leak(Box::new(big));
        let small: &'static [u8] = Box::leak(Box::new(small));
        // equal, equal, shorter (ends the run), then another destination, then a longer one.
        let pkts = [
            pk(big, a),
            pk(big, a),
            pk(small, a),
            pk(big, a),
            pk(big, b),
            pk(small, b),
            pk(big, b),
        ];
        assert_eq!(gso_runs(&pkts), vec![3, 1, 2, 1]);
        let many: Vec<(&[u8], SocketAddr)> = (0..100).map(|_| (big, a)).collect();
        assert_eq!(gso_runs(&many), vec![64, 36]);
        let huge = vec![0u8; 9000];
        let jumbo: Vec<(&[u8], SocketAddr)> = (0..10).map(|_| (&huge[..], a)).collect();
        assert_eq!(gso_runs(&jumbo), vec![7, 3], "at most 65507 bytes per run");
    }

    /// One message of 5 × 1000 bytes + 300 arrives as six datagrams (no GRO asked), or
    /// coalesced with a 1000-byte segment size when GRO is on: the bytes are the same.
    #[test]
    fn gso_send_arrives_as_segments() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payload: Vec<u8> = (0..5300u32).map(|i| (i % 251) as u8).collect();
        let to = rx.local_addr().unwrap();
        let pkts: Vec<(&[u8], SocketAddr)> = payload.chunks(1000).map(|c| (c, to)).collect();
        if !has_udp_segment(tx.as_raw_fd()) {
            println!("skipped: kernel without UDP_SEGMENT");
            return;
        }
        match sys::send_groups(tx.as_raw_fd(), &pkts, false, true) {
            (6, None) => {}
            other => panic!("GSO send: {other:?}"),
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < payload.len() {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            assert!(n == 1000 || n == 300, "segment of {n} bytes");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, payload);

        if enable_udp_gro(rx.as_raw_fd()).is_err() {
            println!("skipped GRO half: kernel refuses UDP_GRO");
            return;
        }
        assert_eq!(
            sys::send_groups(tx.as_raw_fd(), &pkts, false, true),
            (6, None)
        );
        let mut got = Vec::new();
        let mut bufs = vec![vec![0u8; 65536]; 4];
        let mut segs = Vec::new();
        while got.len() < payload.len() {
            let mut r = Vec::new();
            sys::recvmmsg(rx.as_raw_fd(), &mut bufs, &mut r, true).unwrap();
            for (i, (n, from, trunc, seg)) in r.into_iter().enumerate() {
                assert_eq!(from, Some(tx.local_addr().unwrap()));
                assert!(!trunc);
                segs.push((n, seg));
                got.extend_from_slice(&bufs[i][..n]);
            }
        }
        assert_eq!(got, payload);
        assert!(
            segs.iter().any(|&(n, seg)| seg == 1000 && n > 1000),
            "coalesced on receive: {segs:?}"
        );
    }
}
