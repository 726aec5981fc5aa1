//! Protocol constants shared by the Rust data plane and the Python control plane (exported to
//! Python by the bindings, so they are defined only here).

pub use crate::crypto::AUTH_KEY_LEN;

/// The RFC 3948 / RFC 8229 non-ESP marker: a UDP payload (or stream frame) starting with these
/// four zero bytes is a control message, not ESP (SPI 0 is never a valid SPI).
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];
/// The RFC 3948 §2.3 NAT-keepalive: a one-byte UDP payload 0xFF, accepted and ignored.
pub const NAT_KEEPALIVE: u8 = 0xFF;
/// The smallest SPI an SA may have (0 is the marker, 1-255 are IANA-reserved); enforced by
/// [`crate::esp::SecurityAssociation::new`] (tested against this constant).
pub const MIN_SPI: u32 = 256;
/// AES-CBC encryption key lengths (AES-128/192/256).
pub const ENC_KEY_LENS: [usize; 3] = [16, 24, 32];
/// The IANA port of ESP-in-UDP (RFC 3948).
pub const ESP_IN_UDP_PORT: u16 = 4500;
/// IP protocol number of ESP.
pub const IPPROTO_ESP: i32 = 50;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::esp::SecurityAssociation;

    #[test]
    fn min_spi_is_what_the_sa_enforces() {
        assert!(SecurityAssociation::new(MIN_SPI - 1, &[0; 16], &[0; 32], 64, false).is_err());
        assert!(SecurityAssociation::new(MIN_SPI, &[0; 16], &[0; 32], 64, false).is_ok());
        for n in ENC_KEY_LENS {
            assert!(
                SecurityAssociation::new(MIN_SPI, &vec![0; n], &[0; AUTH_KEY_LEN], 64, false)
                    .is_ok()
            );
        }
    }
}
