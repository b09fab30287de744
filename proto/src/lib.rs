//! The gRPC contract between `bastide` and `bastide-agent` (package `bastide.v1`).
#![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod codec;

pub mod v1 {
    tonic::include_proto!("bastide.v1");
}
