//! Durable file writes for the agent's state, shared with the bastion (`bastide-common`).

pub use bastide_common::fsutil::*;
