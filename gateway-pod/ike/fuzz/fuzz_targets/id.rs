//! Decodes arbitrary bytes as the body of one payload (`Identity`); whatever decodes must survive
//! an encode/decode round trip unchanged, and encoding must be canonical.
#![no_main]

use concentrator_ike::payload::Identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = Identity::decode(data) else {
        return;
    };
    let mut bytes = Vec::new();
    decoded.encode(&mut bytes);
    let again = Identity::decode(&bytes).expect("a re-encoded body decodes");
    assert_eq!(again, decoded);
    let mut twice = Vec::new();
    again.encode(&mut twice);
    assert_eq!(twice, bytes, "encoding is canonical");
});
