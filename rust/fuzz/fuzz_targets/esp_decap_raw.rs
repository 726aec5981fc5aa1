//! ESP decapsulation of arbitrary bytes. The first input byte chooses the SA (ESN or not, key
//! size, window size), the next eight a sequence number the receiver has already accepted (so
//! the replay check runs against a moved window), and the rest is the packet. Decapsulation must
//! not panic; if it ever accepts, the inner range must lie within the buffer and a second copy
//! must be refused as a replay; every call is counted exactly once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use simpletun_core::crypto::ICV_LEN;
use simpletun_core::esp::PAYLOAD_OFFSET;
use simpletun_core::DropReason;
use simpletun_fuzz::{Input, SaParams};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let p = SaParams::from_byte(inp.u8());
    let mut rx = p.sa();
    // With ESN the window can move at most about 2^32 per packet (the receiver infers the high
    // bits), so a high starting point is reached in steps of 2^31.
    let prime = if p.esn {
        inp.u64() % (1 << 36)
    } else {
        inp.u64() & 0xffff_ffff
    };
    let mut calls = 0u64;
    while rx.rx_highest_seq() < prime {
        let seq = prime.min(rx.rx_highest_seq() + (1 << 31));
        let mut tx = p.sender();
        assert!(tx.skip_tx_seq_to(seq - 1));
        let pkt = tx.encap(&[0x45; 20], None).expect("encap");
        assert!(rx.decap(&pkt).is_ok(), "priming packet {seq:#x} refused");
        calls += 1;
    }
    let pkt = inp.rest();

    let mut buf = pkt.to_vec();
    let r = rx.decap_in_place(&mut buf);
    calls += 1;
    if let Ok(d) = &r {
        assert!(
            d.inner.start <= d.inner.end && d.inner.end <= buf.len(),
            "{:?}",
            d.inner
        );
        assert_eq!(d.inner.start, PAYLOAD_OFFSET);
        assert!(d.inner.end + 2 + ICV_LEN <= buf.len());
    }
    if matches!(r, Ok(_) | Err(DropReason::BadPadding)) {
        // The ICV verified: the same packet again is a replay.
        let mut again = pkt.to_vec();
        assert_eq!(rx.decap_in_place(&mut again), Err(DropReason::Replay));
        calls += 1;
    }
    let st = rx.stats();
    let drops: u64 = st.drops.iter().map(|(_, c)| c).sum();
    assert_eq!(st.decap_packets + drops, calls, "counters do not add up");
});
