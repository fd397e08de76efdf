//! Decodes arbitrary bytes as an IKE message; whatever decodes must re-encode to bytes that
//! decode to the same message, and encoding must be canonical (a second round gives the same
//! bytes). SK bodies are also decoded as if they were plaintext, to reach every payload decoder
//! through the inner chain.
#![no_main]

use concentrator_ike::payload::{decode_inner_chain, encode_chain};
use concentrator_ike::{Message, Payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::decode(data) else { return };
    let bytes = msg.to_vec();
    let again = Message::decode(&bytes).expect("a re-encoded message decodes");
    assert_eq!(again, msg);
    assert_eq!(again.to_vec(), bytes, "encoding is canonical");

    if let Some(Payload::Sk(sk)) = msg.payloads.last()
        && let Ok(inner) = decode_inner_chain(sk.first_inner, sk.body)
    {
        let mut bytes = Vec::new();
        encode_chain(&inner, &mut bytes);
        assert_eq!(decode_inner_chain(sk.first_inner, &bytes).as_ref(), Ok(&inner));
    }
});
