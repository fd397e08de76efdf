//! Decodes arbitrary bytes as the body of one payload (`Ts`); whatever decodes must survive
//! an encode/decode round trip unchanged, and encoding must be canonical.
#![no_main]

use concentrator_ike::payload::Ts;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = Ts::decode(data) else { return };
    let mut bytes = Vec::new();
    decoded.encode(&mut bytes);
    let again = Ts::decode(&bytes).expect("a re-encoded body decodes");
    assert_eq!(again, decoded);
    let mut twice = Vec::new();
    again.encode(&mut twice);
    assert_eq!(twice, bytes, "encoding is canonical");
});
