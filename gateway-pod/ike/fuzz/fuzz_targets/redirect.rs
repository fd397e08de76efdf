//! Decodes arbitrary bytes as RFC 5685 REDIRECT and REDIRECTED_FROM data; whatever decodes
//! re-encodes to the same bytes. The same bytes as an IKE_SA_INIT request, as a fleet's
//! director inspects it: never a panic, and a redirectable one always gets an answer.
#![no_main]

use concentrator_ike::Message;
use concentrator_ike::endpoint::init_redirect_response;
use concentrator_ike::redirect::{
    GatewayId, decode_redirect, decode_redirected_from, encode_redirect, encode_redirected_from,
    inspect_init,
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
    if let Some(init) = inspect_init(data) {
        let gw = GatewayId::Ip(std::net::Ipv4Addr::new(192, 0, 2, 21).into());
        let answer = Message::decode(data).ok().and_then(|m| init_redirect_response(&m, &gw));
        if init.redirectable() {
            assert!(answer.is_some());
        }
    }
});
