//! The VIP front's per-pod addresses file, which the operator writes and every gateway
//! reads: arbitrary bytes (a member name, then the file) never panic, and an address found
//! comes from a line that names the member.
#![no_main]

use concentrator_fleet::director::address_in_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (name, file) = text.split_once('\n').unwrap_or((text, ""));
    if let Some(address) = address_in_file(file, name) {
        assert!(!name.is_empty() && file.contains(name), "{address} for {name:?}");
    }
});
