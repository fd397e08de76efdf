//! Drives an endpoint (and the responders behind it) with a sequence of datagrams and clock
//! steps taken from the input: whatever arrives, in whatever order, from whichever address,
//! nothing panics, every queued datagram is an IKE message we can decode, and the SA counts
//! stay within the configured limits. Entropy is deterministic so that a seed holding a valid
//! IKE_SA_INIT gets answered and reaches the IKE_AUTH state.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_algorithms::{parse_esp, parse_ike};
use concentrator_ike::Message;
use concentrator_ike::endpoint::{Endpoint, EndpointConfig, EndpointEvent};
use concentrator_ike::payload::Identity;
use concentrator_ike::responder::{Config, IdBuf};
use concentrator_test_util::Counter;
use libfuzzer_sys::fuzz_target;

const LIMITS: EndpointConfig = EndpointConfig {
    cookie_threshold: 2,
    max_half_open: 4,
    half_open_timeout: Duration::from_secs(5),
    linger: Duration::from_secs(2),
    cookie_secret_lifetime: Duration::from_secs(10),
};

fuzz_target!(|data: &[u8]| {
    let config = Arc::new(Config::new(
        vec![parse_ike("ike", "aes128gcm16-prfsha256-x25519").expect("proposal")],
        vec![parse_esp("esp", "aes128gcm16").expect("proposal")],
        "10.2.0.0/24".parse().expect("subnet"),
        "10.1.0.0/24".parse().expect("subnet"),
        IdBuf::new(&Identity::Fqdn(b"gw")),
    ));
    let mut ep = Endpoint::new(LIMITS, config);
    let mut entropy = Counter::odd(0);
    let start = Instant::now();
    let mut now = start;
    let local: SocketAddr = "192.0.2.2:500".parse().expect("address");
    // Records: [kind][len hi][len lo][bytes...]; kind's low bits pick the sender and the port,
    // bit 7 a clock step of (len) milliseconds instead of a datagram.
    let mut rest = data;
    while let [kind, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if kind & 0x80 != 0 {
            now += Duration::from_millis(len as u64 * 10);
            ep.handle_timeout(now, &mut entropy);
            rest = tail;
        } else {
            let (datagram, after) = tail.split_at(len.min(tail.len()));
            let remote = SocketAddr::from((
                [192, 0, 2, 10 + (kind & 3)],
                if kind & 4 != 0 { 4500 } else { 500 },
            ));
            let _ = ep.handle_datagram(now, local, remote, datagram, &mut entropy);
            rest = after;
        }
        while let Some(t) = ep.poll_transmit() {
            assert!(
                Message::decode(&t.payload).is_ok(),
                "we sent something we cannot decode"
            );
        }
        while let Some(event) = ep.poll_event() {
            if let EndpointEvent::Sa {
                id,
                event: concentrator_ike::Event::PeerIdentified { .. },
                ..
            } = event
            {
                let _ = ep.provide_psk(id, now, Some(b"psk"), &mut entropy);
            }
        }
        let counts = ep.counts();
        assert!(counts.half_open <= LIMITS.max_half_open, "{counts:?}");
    }
});
