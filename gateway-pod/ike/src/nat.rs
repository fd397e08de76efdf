//! NAT detection hashes (RFC 7296 §2.23).

use std::net::{IpAddr, SocketAddr};

use concentrator_crypto::util::{SHA1_LEN, sha1};

/// RFC 7296 §2.23: "The data associated with these Notify types is the SHA-1 digest of the
/// SPIs (in the order they appear in the header), IP address, and port from which this
/// packet was sent." (for NAT_DETECTION_SOURCE_IP; DESTINATION_IP hashes the destination).
/// `spi_r` is zero in an IKE_SA_INIT request.
pub fn nat_detection_hash(spi_i: u64, spi_r: u64, addr: SocketAddr) -> [u8; SHA1_LEN] {
    let port = addr.port().to_be_bytes();
    match addr.ip() {
        IpAddr::V4(a) => sha1(&[&spi_i.to_be_bytes(), &spi_r.to_be_bytes(), &a.octets(), &port]),
        IpAddr::V6(a) => sha1(&[&spi_i.to_be_bytes(), &spi_r.to_be_bytes(), &a.octets(), &port]),
    }
}

/// Whether `addr` is behind a NAT as seen from the hashes the peer sent: none of them matches
/// (RFC 7296 §2.23: "If none of the NAT_DETECTION_SOURCE_IP payload(s) received matches the
/// expected value of the source IP and port found from the IP header of the packet containing
/// the payload, it means that the system sending those payloads is behind a NAT"). `None`
/// when the peer sent no hash of that kind.
pub fn behind_nat<'a>(
    hashes: impl IntoIterator<Item = &'a [u8]>,
    spi_i: u64,
    spi_r: u64,
    addr: SocketAddr,
) -> Option<bool> {
    let expected = nat_detection_hash(spi_i, spi_r, addr);
    let mut any = false;
    for h in hashes {
        if h == expected {
            return Some(false);
        }
        any = true;
    }
    any.then_some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_covers_spis_address_and_port() {
        let a: SocketAddr = "192.0.2.1:500".parse().unwrap();
        let h = nat_detection_hash(1, 0, a);
        assert_eq!(
            h,
            sha1(&[&[0, 0, 0, 0, 0, 0, 0, 1], &[0; 8], &[192, 0, 2, 1], &[1, 244]])
        );
        assert_ne!(h, nat_detection_hash(1, 0, "192.0.2.1:4500".parse().unwrap()));
        assert_ne!(h, nat_detection_hash(1, 2, a));
        assert_eq!(behind_nat([&h[..]], 1, 0, a), Some(false));
        assert_eq!(behind_nat([&[0u8; 20][..]], 1, 0, a), Some(true));
        assert_eq!(behind_nat([], 1, 0, a), None);
    }
}
