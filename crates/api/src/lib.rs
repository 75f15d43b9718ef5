//! Rollcall's wire contract: the generated gRPC code (`pb`) and the validated domain model.
//!
//! Prost types stay in this crate and in the thin gRPC adapters; everything else works with
//! `model` types, converted once on receive with `TryFrom<pb::X>`.

pub mod codec;
pub mod config;
pub mod errors;
pub mod human;
pub mod identity;
pub mod model;
pub mod redact;

/// Generated protobuf and tonic code. Only `api` and the gRPC adapters touch these types.
pub mod pb {
    #[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
    pub mod agent {
        tonic::include_proto!("rollcall.agent.v1");
    }
    #[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
    pub mod operator {
        tonic::include_proto!("rollcall.operator.v1");
    }
}

/// The version every Rollcall binary reports in its hello and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The log filter `rollcall coordinator` and `rollcall agent` use when `RUST_LOG` is unset:
/// INFO for our own targets, only warnings from the HTTP/2 and SQL stacks.
pub const DEFAULT_LOG_FILTER: &str = "info,h2=warn,hyper=warn,tower=warn,sqlx=warn";
