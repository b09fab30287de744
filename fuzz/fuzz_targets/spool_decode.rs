//! The mail spool's `.msg` files, read back at start after a crash (torn or corrupted
//! files): `decode` must refuse anything incomplete and never panic; what it accepts
//! round-trips through `encode`.
#![no_main]

use bastide::smtp::spool::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((meta, content)) = decode(data) {
        assert_eq!(meta.size, content.len());
        assert!(!meta.recipients.is_empty());
        let again = encode(&meta, content);
        let (m2, c2) = decode(&again).expect("re-encoded spool file decodes");
        assert_eq!(c2, content);
        assert_eq!(m2.recipients.len(), meta.recipients.len());
    }
});
