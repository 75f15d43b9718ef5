//! Profiles: the kind miniature (`kind`, the default) and one that behaves like the real service
//! behind the runbook (`real`), and the one place that names the tables of each.
//!
//! Every SQL statement (queries, `COPY`, the migrations) is written once with its relation names
//! in braces, `SELECT count(*) FROM {sessions}`, and expanded per profile by [`Profile::sql`]:
//! `kind` drops the braces (the schema it always had, byte for byte), `real` prefixes `cloud_`
//! (`cloud_sessions`), as the real service does. The migration ledger is [`Profile::ledger`].
//!
//! Which profile a command runs is chosen by the overlay file `./cowork-sim.toml` in its working
//! directory (`profile = "kind" | "real"`), else the environment (`COWORK_PROFILE`), else
//! `kind`: the file wins, as the real service's overlay config does over its environment. In the
//! real profile the roles (web, worker, scheduler, gateway) refuse to start without the overlay
//! file, so a role started in the wrong directory fails at once ([`Overlay::require_for_role`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The overlay file every command reads from its working directory.
pub const OVERLAY_FILE: &str = "cowork-sim.toml";
/// The environment variable that selects a profile when no overlay file does.
pub const PROFILE_ENV: &str = "COWORK_PROFILE";
/// The prefix of every relation of the real profile.
pub const REAL_PREFIX: &str = "cloud_";

/// How the service behaves; see the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// The miniature as it always was: maintenance mode, bare table names, `/healthz`.
    #[default]
    Kind,
    /// Like the real service: `cloud_` tables, no maintenance mode, migrations on boot, exits
    /// when Postgres ends its connection, an overlay file in the working directory.
    Real,
}

/// Every table of the schema, by its kind-profile name: counts, tests and the docs read it.
pub const TABLES: &[&str] = &[
    "tenants",
    "accounts",
    "memberships",
    "api_tokens",
    "sessions",
    "session_events",
    "session_projections",
    "session_commands",
    "worker_leases",
    "worker_heartbeats",
    "artifact_index",
    "workflows",
    "workflow_runs",
    "byok_secrets",
    "subscriptions",
    "usage_events",
    "channel_bindings",
    "channel_session_bindings",
    "channel_deliveries",
    "audit_events",
];

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Kind => "kind",
            Profile::Real => "real",
        }
    }

    /// The name of a relation (table, index, function, trigger) in this profile.
    pub fn name(self, kind_name: &str) -> String {
        match self {
            Profile::Kind => kind_name.to_owned(),
            Profile::Real => format!("{REAL_PREFIX}{kind_name}"),
        }
    }

    /// The migration ledger: `schema_migrations`, or `cloud_migrations`.
    pub fn ledger(self) -> &'static str {
        match self {
            Profile::Kind => "schema_migrations",
            Profile::Real => "cloud_migrations",
        }
    }

    /// `template` with every `{name}` replaced by this profile's name for it. The result is
    /// cached for the life of the process (templates are the program's own statements, so the
    /// cache holds two copies of each at most), which gives sqlx the `&'static str` it wants.
    pub fn sql(self, template: &'static str) -> &'static str {
        static CACHE: OnceLock<Mutex<HashMap<(Profile, &'static str), &'static str>>> =
            OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let mut cache = match cache.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        cache
            .entry((self, template))
            .or_insert_with(|| Box::leak(self.expand(template).into_boxed_str()))
    }

    /// `template` expanded (see [`Profile::sql`]) into a new string. A brace that does not
    /// enclose a lowercase identifier (`'{}'::jsonb`, `'{a,b}'`, `[0-9a-f]{64}`) is left as
    /// written.
    pub fn expand(self, template: &str) -> String {
        let mut out = String::with_capacity(template.len() + 64);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let ident_len = after
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(after.len());
            let starts_with_letter = after.starts_with(|c: char| c.is_ascii_lowercase());
            if starts_with_letter && after[ident_len..].starts_with('}') {
                out.push_str(&self.name(&after[..ident_len]));
                rest = &after[ident_len + 1..];
            } else {
                out.push('{');
                rest = after;
            }
        }
        out.push_str(rest);
        out
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Profile {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Profile> {
        match s.trim() {
            "kind" => Ok(Profile::Kind),
            "real" => Ok(Profile::Real),
            other => bail!("unknown profile {other:?}: use \"kind\" or \"real\""),
        }
    }
}

/// The overlay file's keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayFile {
    profile: Option<Profile>,
}

/// What a command learned from its working directory and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub profile: Profile,
    /// The overlay file read, if there was one.
    pub file: Option<PathBuf>,
}

impl Overlay {
    /// Reads `./cowork-sim.toml` from the current directory and `COWORK_PROFILE`.
    pub fn load() -> Result<Overlay> {
        // "." rather than the resolved directory: a removed working directory has no overlay.
        let env = std::env::var(PROFILE_ENV).ok();
        Overlay::load_from(Path::new("."), env.as_deref())
    }

    /// Reads `<dir>/cowork-sim.toml`; the file's `profile` wins over `env`, which wins over
    /// the default (`kind`).
    pub fn load_from(dir: &Path, env: Option<&str>) -> Result<Overlay> {
        let path = dir.join(OVERLAY_FILE);
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                toml::from_str::<OverlayFile>(&text)
                    .with_context(|| format!("read the overlay file {}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("read the overlay file {}", path.display()));
            }
        };
        let from_env = match env.map(str::trim).filter(|v| !v.is_empty()) {
            Some(value) => Some(
                value
                    .parse::<Profile>()
                    .with_context(|| format!("read {PROFILE_ENV}"))?,
            ),
            None => None,
        };
        let profile = file
            .as_ref()
            .and_then(|f| f.profile)
            .or(from_env)
            .unwrap_or_default();
        Ok(Overlay {
            profile,
            file: file.map(|_| path),
        })
    }

    /// A role of the real profile reads its overlay file from its working directory, like the
    /// real service: started elsewhere, it fails here instead of running half-configured.
    pub fn require_for_role(&self, role: &str) -> Result<()> {
        if self.profile == Profile::Real && self.file.is_none() {
            let dir = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "?".to_owned());
            bail!(
                "the {role} role of the real profile reads its overlay config ./{OVERLAY_FILE} \
                 from its working directory, and {dir} has none: start it in the directory that \
                 holds {OVERLAY_FILE} (the process adapter's `cwd`)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_names_per_profile() {
        let t = "SELECT count(*) FROM {sessions} s JOIN {session_events} e ON true \
                 WHERE x = '{}'::jsonb AND y = '{a,b}' AND z = '{Upper}'";
        assert_eq!(
            Profile::Kind.expand(t),
            "SELECT count(*) FROM sessions s JOIN session_events e ON true \
             WHERE x = '{}'::jsonb AND y = '{a,b}' AND z = '{Upper}'"
        );
        assert_eq!(
            Profile::Real.expand(t),
            "SELECT count(*) FROM cloud_sessions s JOIN cloud_session_events e ON true \
             WHERE x = '{}'::jsonb AND y = '{a,b}' AND z = '{Upper}'"
        );
        assert_eq!(Profile::Real.sql("{x}"), "cloud_x");
        assert!(std::ptr::eq(
            Profile::Real.sql("{x}"),
            Profile::Real.sql("{x}")
        ));
        assert_eq!(Profile::Kind.expand("{unclosed"), "{unclosed");
        assert_eq!(Profile::Real.expand("'^[0-9a-f]{64}$'"), "'^[0-9a-f]{64}$'");
    }

    #[test]
    fn the_file_wins_over_the_environment() {
        let dir = tempfile::tempdir().expect("temp dir");
        let none = Overlay::load_from(dir.path(), None).expect("load");
        assert_eq!(none.profile, Profile::Kind);
        assert!(none.file.is_none());
        let env = Overlay::load_from(dir.path(), Some("real")).expect("load");
        assert_eq!(env.profile, Profile::Real);
        assert!(env.require_for_role("web").is_err());
        assert!(Overlay::load_from(dir.path(), Some("nice")).is_err());
        std::fs::write(dir.path().join(OVERLAY_FILE), "profile = \"kind\"\n").expect("write");
        let file = Overlay::load_from(dir.path(), Some("real")).expect("load");
        assert_eq!(file.profile, Profile::Kind);
        std::fs::write(dir.path().join(OVERLAY_FILE), "profile = \"real\"\n").expect("write");
        let real = Overlay::load_from(dir.path(), None).expect("load");
        assert_eq!(real.profile, Profile::Real);
        real.require_for_role("web").expect("has its overlay");
        std::fs::write(dir.path().join(OVERLAY_FILE), "profle = \"real\"\n").expect("write");
        assert!(Overlay::load_from(dir.path(), None).is_err());
        std::fs::write(dir.path().join(OVERLAY_FILE), "").expect("write");
        let empty = Overlay::load_from(dir.path(), Some("real")).expect("load");
        assert_eq!(empty.profile, Profile::Real);
        assert!(empty.file.is_some());
    }
}
