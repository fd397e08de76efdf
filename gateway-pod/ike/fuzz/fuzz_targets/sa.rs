//! Decodes arbitrary bytes as the body of one payload (`Sa`); whatever decodes must survive
//! an encode/decode round trip unchanged, and encoding must be canonical.
#![no_main]

use concentrator_ike::payload::Sa;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| concentrator_test_util::round_trip!(Sa, data));
