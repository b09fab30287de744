//! The bastion's configuration loader: TOML parsing into the strict structs, then
//! `validate()` (every service's checks: DNS static records, SSH admins' authorized_keys
//! options and rules, SMTP addresses...). It must never panic, whatever the file says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // File paths in a fuzzed config must not make validate() read devices or huge files.
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    if let Ok(cfg) = toml::from_str::<bastide::config::Config>(text) {
        let _ = cfg.validate();
    }
});
