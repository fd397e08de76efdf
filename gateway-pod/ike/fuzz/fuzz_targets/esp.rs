//! ESP receive path on arbitrary datagrams: the UDP 4500 demux, the inner-header parser and
//! `Inbound::open` (SPI check, ESN inference, replay check, ICV, padding) must refuse or accept
//! without panicking, and an accepted packet's inner range must lie inside the buffer. The
//! TCP MSS clamp reads the same untrusted inner packets: it must not panic, and a second
//! clamp to the same MSS changes nothing.
#![no_main]

use concentrator_algorithms::Encryption;
use concentrator_crypto::aead::AeadKey;
use concentrator_esp::Inbound;
use concentrator_esp::encap::{Datagram, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = concentrator_esp::ip::parse(data);
    let mut inner = data.to_vec();
    let max = u16::from_be_bytes([data.first().copied().unwrap_or(5), 0x14]);
    concentrator_esp::mss::clamp(&mut inner, max);
    let once = inner.clone();
    assert!(!concentrator_esp::mss::clamp(&mut inner, max));
    assert_eq!(inner, once);
    let Datagram::Esp { spi, packet } = classify(data) else { return };
    let Ok(key) = AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &[7; 20]) else { return };
    let esn = packet.len() % 2 == 1;
    let mut inbound = Inbound::new(spi, key, esn, 64);
    let mut buf = packet.to_vec();
    if let Ok(o) = inbound.open(&mut buf) {
        assert!(o.inner.end <= buf.len());
        let _ = concentrator_esp::ip::parse(&buf[o.inner]);
    }
});
