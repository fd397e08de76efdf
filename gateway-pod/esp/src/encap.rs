//! RFC 3948 demultiplexing of what arrives on UDP 4500: NAT-keepalives, IKE behind the
//! non-ESP marker, and ESP.

/// What a UDP 4500 datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// RFC 3948 §2.3: a single 0xFF octet, sent to keep NAT mappings alive; dropped.
    Keepalive,
    /// RFC 3948 §2.2: four zero octets (the non-ESP marker) precede an IKE message.
    Ike(&'a [u8]),
    /// Anything else starts with a non-zero SPI: an ESP packet.
    Esp {
        /// The SPI, for the O(1) SA lookup.
        spi: u32,
        /// The whole ESP packet (from the SPI on).
        packet: &'a [u8],
    },
    /// Too short to be any of these.
    Invalid,
}

/// The 4-byte marker that tells IKE from ESP on port 4500.
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];

/// Classifies a datagram received on UDP 4500.
pub fn classify(datagram: &[u8]) -> Datagram<'_> {
    match datagram {
        [0xff] => Datagram::Keepalive,
        [0, 0, 0, 0, ike @ ..] => Datagram::Ike(ike),
        // An ESP header (SPI + sequence number) is 8 octets; RFC 3948 §2.2: "the SPI field in
        // the ESP header MUST NOT be zero", which the arm above already took.
        [a, b, c, d, _, _, _, _, ..] => Datagram::Esp {
            spi: u32::from_be_bytes([*a, *b, *c, *d]),
            packet: datagram,
        },
        _ => Datagram::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_keepalive_ike_and_esp_apart() {
        assert_eq!(classify(&[0xff]), Datagram::Keepalive);
        assert_eq!(classify(&[0, 0, 0, 0, 1, 2, 3]), Datagram::Ike(&[1, 2, 3]));
        let esp = [0, 0, 1, 2, 0, 0, 0, 1, 9];
        assert_eq!(
            classify(&esp),
            Datagram::Esp {
                spi: 0x102,
                packet: &esp
            }
        );
        assert_eq!(classify(&[1, 2, 3]), Datagram::Invalid);
        assert_eq!(classify(&[]), Datagram::Invalid);
        assert_eq!(classify(&[0, 0, 0]), Datagram::Invalid);
    }
}
