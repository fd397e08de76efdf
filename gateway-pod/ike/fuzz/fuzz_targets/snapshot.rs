//! Decodes arbitrary bytes as an IKE SA snapshot (as another pod would send one): nothing
//! panics; whatever decodes re-encodes canonically, restores into the role it names (or is
//! refused with an error), and the restored SA runs its timers and snapshots again.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_algorithms::{parse_esp, parse_ike};
use concentrator_ike::endpoint::{Endpoint, EndpointConfig};
use concentrator_ike::payload::Identity;
use concentrator_ike::responder::{Config, IdBuf, SystemEntropy};
use concentrator_ike::sa::snapshot::IkeSaSnapshot;
use concentrator_ike::initiator;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(snapshot) = IkeSaSnapshot::decode(data) else {
        return;
    };
    let bytes = snapshot.encode();
    let again = IkeSaSnapshot::decode(&bytes).expect("a re-encoded snapshot decodes");
    assert_eq!(again.encode(), bytes, "encoding is canonical");

    let ike = vec![parse_ike("ike", "aes128gcm16-prfsha256-x25519").unwrap()];
    let esp = vec![parse_esp("esp", "aes128gcm16").unwrap()];
    let (local, remote) = ("10.2.0.0/24".parse().unwrap(), "10.1.0.0/24".parse().unwrap());
    let id = IdBuf::new(&Identity::Fqdn(b"gw.example"));
    let config = Arc::new(Config::new(ike.clone(), esp.clone(), local, remote, id.clone()));
    let initiator_config = Arc::new(initiator::Config::new(ike, esp, local, remote, id));
    let now = Instant::now();
    let mut ep = Endpoint::new(EndpointConfig::default(), config.clone());
    let Ok(sa) = ep.restore(again, config, initiator_config, now) else {
        return;
    };
    let later = now + Duration::from_secs(3600 * 24);
    ep.handle_timeout(later, &mut SystemEntropy);
    while ep.poll_transmit().is_some() {}
    while ep.poll_event().is_some() {}
    let _ = ep.snapshot(sa, later);
});
