//! Decodes arbitrary bytes as RFC 5685 REDIRECT and REDIRECTED_FROM data; whatever decodes
//! re-encodes to the same bytes.
#![no_main]

use concentrator_ike::redirect::{
    decode_redirect, decode_redirected_from, encode_redirect, encode_redirected_from,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((gw, nonce)) = decode_redirect(data) {
        let nonce = (!nonce.is_empty()).then_some(nonce);
        assert_eq!(encode_redirect(&gw, nonce), data);
    }
    if let Ok(gw) = decode_redirected_from(data) {
        assert_eq!(encode_redirected_from(&gw), data);
    }
});
