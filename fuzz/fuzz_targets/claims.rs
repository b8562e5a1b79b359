//! Token claims to rights: any JSON value is either read or refused with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ssehub::auth::rights_from_claims(&claims);
    }
});
