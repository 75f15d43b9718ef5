//! cowork-sim: a small but real miniature of the runbook's service ("Open Cowork Cloud"), so
//! Rollcall has a fleet to back up, break and restore.
//!
//! Every role reads and writes one Postgres database and one object store, so a bad restore
//! shows: missing artifacts, projections that disagree with events, double-fired workflows,
//! duplicate channel deliveries.
//!
//! Two profiles ([`profile`]): `kind` (the default: maintenance mode, bare table names,
//! `/healthz`) and `real`, which behaves like the real service behind the runbook (`cloud_`
//! tables, no maintenance mode, migrations on boot, exits when Postgres terminates its
//! connection, an overlay file in every role's working directory). [`Deps::profile`] carries it
//! to every statement.
//!
//! Codemap:
//! - [`profile`]: the profiles, the overlay file (`./cowork-sim.toml`, env `COWORK_PROFILE`),
//!   and the one place that names relations per profile ([`Profile::sql`] expands `{table}`).
//! - [`schema`]: the embedded migrations (`migrations/`, relation names in braces), recorded in
//!   `schema_migrations` (kind) or `cloud_migrations` (real).
//! - [`store`]: connecting, ids, and the checks Rollcall relies on: [`store::counts`],
//!   [`store::verify_artifacts`], [`store::verify_projections`].
//! - [`projection`]: the session view folded from events.
//! - [`auth`]: API tokens (stored as SHA-256) and their scopes.
//! - [`objects`]: opening an object store from a URL (`file:///dir`, `s3://bucket/prefix`).
//! - [`web`]: the HTTP role (health, operator and session APIs, maintenance mode in the kind
//!   profile; in the real one no maintenance, no `/healthz`, named `/readyz` checks).
//! - [`worker`]: turns prompt commands into events, projections, artifacts and checkpoints.
//! - [`scheduler`]: claims due workflows, one run per due time.
//! - [`gateway`]: delivers channel deliveries in order to a sink, with retries and cursors.
//! - [`sink`]: the receiving end of the gateway (HTTP server or JSONL file) that counts duplicates.
//! - [`seed`]: realistic data at any scale. [`load`]: a write-load client for drills.
//! - [`smoke`]: the bounded post-restore checks (the real profile's worker smoke writes its
//!   prompt to the database with a connection that may write while web's role is frozen).

pub mod auth;
pub mod cli;
pub mod gateway;
pub mod load;
pub mod objects;
pub mod profile;
pub mod projection;
pub mod scheduler;
pub mod schema;
pub mod seed;
pub mod sink;
pub mod smoke;
pub mod store;
pub mod web;
pub mod worker;

use std::sync::Arc;

use anyhow::Result;
use object_store::ObjectStore;
use sqlx::PgPool;

pub use objects::{ObjectStoreOptions, open_object_store};
pub use profile::{Overlay, Profile};
pub use store::{DeliveryCounts, RestoreCounts, connect, counts};

/// The two things every role works on: the control-plane database and the object store.
#[derive(Clone)]
pub struct Deps {
    pub pool: PgPool,
    pub objects: Arc<dyn ObjectStore>,
    /// The object store URL, for diagnostics (it carries no credentials).
    pub objects_url: String,
    /// Which service this is: its table names and its behaviour.
    pub profile: Profile,
}

impl Deps {
    /// Connects to Postgres and opens the object store.
    pub async fn connect(
        database_url: &str,
        object_store_url: &str,
        options: &ObjectStoreOptions,
        profile: Profile,
    ) -> Result<Deps> {
        let objects = open_object_store(object_store_url, options)?;
        let pool = connect(database_url).await?;
        Ok(Deps {
            pool,
            objects,
            objects_url: object_store_url.to_owned(),
            profile,
        })
    }
}
