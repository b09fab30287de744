//! Code shared by the bastion (`bastide`) and the agent (`bastide-agent`).

pub mod clidocs;
pub mod fsutil;
pub mod pin;
pub mod tomlcfg;
