//! Durable file writes and secret-file checks, shared with the agent (`bastide-common`).

pub use bastide_common::fsutil::*;
