//! Secret references: where each secret of an environment lives (manager, reference, version,
//! KMS key, last rotation), recorded in a recovery point. Never the secret's value: nothing
//! here reads a secret manager, and the sources refuse fields that would carry a value.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Field names that would hold a secret rather than point at it.
const VALUE_FIELDS: [&str; 6] = [
    "value",
    "secret",
    "plaintext",
    "password",
    "token",
    "secret_value",
];

/// One secret of an environment, by reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// What the secret is for, e.g. `cookie-secret`, `oidc-client-secret`.
    pub name: String,
    /// Which manager holds it, e.g. `aws-secrets-manager`, `gcp-secret-manager`, `vault`,
    /// `azure-key-vault`, `kubernetes`.
    pub manager: String,
    /// Where it lives in that manager: an ARN, a resource name, a path.
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The KMS key that protects it, when the manager reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<DateTime<Utc>>,
}

/// Where the references of an environment come from.
#[derive(Debug, Clone)]
pub enum SecretRefSource {
    /// A TOML file of `[[secret]]` tables with the fields of [`SecretRef`] (a `.json` file
    /// holding `{"secret": [...]}` also works). `rotated_at` is an RFC 3339 time.
    File(PathBuf),
    /// Environment variables `<prefix><NAME>` (name lowercased, `_` becomes `-`) whose value
    /// is `manager=...;reference=...;version=...;kms_key=...;rotated_at=...`.
    Env { prefix: String },
    /// References given directly (e.g. from the coordinator's own configuration).
    List(Vec<SecretRef>),
}

impl SecretRefSource {
    /// The default environment prefix: `ROLLCALL_SECRET_REF_COOKIE_SECRET=...`.
    pub fn default_env() -> SecretRefSource {
        SecretRefSource::Env {
            prefix: "ROLLCALL_SECRET_REF_".to_owned(),
        }
    }
}

/// Loads and validates the references from every source, sorted by name.
pub fn load_secret_refs(sources: &[SecretRefSource]) -> Result<Vec<SecretRef>> {
    let mut all = Vec::new();
    for source in sources {
        match source {
            SecretRefSource::File(path) => all.extend(load_file(path)?),
            SecretRefSource::Env { prefix } => all.extend(load_env(prefix, std::env::vars())?),
            SecretRefSource::List(list) => {
                for secret in list {
                    validate(secret, "the configured secret references")?;
                }
                all.extend(list.iter().cloned());
            }
        }
    }
    let mut seen = BTreeSet::new();
    for secret in &all {
        if !seen.insert(secret.name.clone()) {
            bail!(
                "secret reference {:?} is defined twice: keep one definition",
                secret.name
            );
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

fn load_file(path: &Path) -> Result<Vec<SecretRef>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("read secret reference file {shown}: check the path and permissions")
    })?;
    let document: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        // Do not echo the parser's snippet: the file might hold a value by mistake.
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "secret reference file {shown} is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            )
        })?
    } else {
        let value: toml::Value = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(0);
            anyhow::anyhow!(
                "secret reference file {shown} is not valid TOML at line {line}: {}",
                e.message()
            )
        })?;
        toml_to_json(value)
    };
    let Some(entries) = document.get("secret").and_then(|s| s.as_array()) else {
        bail!("secret reference file {shown} has no `[[secret]]` entries");
    };
    let mut secrets = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let place = format!("secret reference file {shown}, entry {}", i + 1);
        let Some(table) = entry.as_object() else {
            bail!("{place} is not a table");
        };
        for key in table.keys() {
            refuse_value_field(key, &place)?;
        }
        let secret: SecretRef = serde_json::from_value(entry.clone())
            .map_err(|e| anyhow::anyhow!("{place}: {}", describe_serde_error(&e)))?;
        validate(&secret, &place)?;
        secrets.push(secret);
    }
    Ok(secrets)
}

fn load_env(prefix: &str, vars: impl Iterator<Item = (String, String)>) -> Result<Vec<SecretRef>> {
    let mut secrets = Vec::new();
    for (var, raw) in vars {
        let Some(suffix) = var.strip_prefix(prefix) else {
            continue;
        };
        let place = format!("environment variable {var}");
        let name = suffix.to_ascii_lowercase().replace('_', "-");
        let (mut manager, mut reference, mut version, mut kms_key, mut rotated_at) =
            (None, None, None, None, None);
        for field in raw.split(';').map(str::trim).filter(|f| !f.is_empty()) {
            let Some((key, value)) = field.split_once('=') else {
                bail!(
                    "{place}: expected `key=value` pairs separated by `;` \
                     (manager, reference, version, kms_key, rotated_at)"
                );
            };
            let key = key.trim();
            refuse_value_field(key, &place)?;
            let value = value.trim().to_owned();
            match key {
                "manager" => manager = Some(value),
                "reference" | "ref" => reference = Some(value),
                "version" => version = Some(value),
                "kms_key" | "kms" => kms_key = Some(value),
                "rotated_at" => {
                    let at = DateTime::parse_from_rfc3339(&value).map_err(|_| {
                        anyhow::anyhow!("{place}: rotated_at is not an RFC 3339 time")
                    })?;
                    rotated_at = Some(at.with_timezone(&Utc));
                }
                other => bail!(
                    "{place}: unknown key `{other}` (expected manager, reference, version, \
                     kms_key, rotated_at)"
                ),
            }
        }
        let secret = SecretRef {
            name,
            manager: manager.unwrap_or_default(),
            reference: reference.unwrap_or_default(),
            version,
            kms_key,
            rotated_at,
        };
        validate(&secret, &place)?;
        secrets.push(secret);
    }
    Ok(secrets)
}

fn refuse_value_field(key: &str, place: &str) -> Result<()> {
    if VALUE_FIELDS.contains(&key.to_ascii_lowercase().as_str()) {
        bail!(
            "{place}: field `{key}` would hold a secret value; record only where the secret \
             lives (manager, reference, version, kms_key, rotated_at) and remove the value \
             from this file or variable"
        );
    }
    Ok(())
}

fn validate(secret: &SecretRef, place: &str) -> Result<()> {
    let name_ok = !secret.name.is_empty()
        && secret
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok {
        bail!(
            "{place}: secret name {:?} must be letters, digits, `-`, `_` or `.`",
            secret.name
        );
    }
    if secret.manager.trim().is_empty() {
        bail!(
            "{place}: secret {:?} has no `manager` (e.g. aws-secrets-manager, vault)",
            secret.name
        );
    }
    if secret.reference.trim().is_empty() {
        bail!(
            "{place}: secret {:?} has no `reference` (the ARN, resource name or path where it \
             lives)",
            secret.name
        );
    }
    Ok(())
}

/// serde's messages can quote the offending value ("invalid type: string \"...\""); keep only
/// the part before the quote.
fn describe_serde_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(": string") {
        Some(i) => format!("{}: a field has the wrong type", &text[..i]),
        None => text,
    }
}

fn toml_to_json(value: toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s),
        toml::Value::Integer(i) => J::from(i),
        toml::Value::Float(f) => J::from(f),
        toml::Value::Boolean(b) => J::Bool(b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            J::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_toml_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.toml");
        std::fs::write(
            &path,
            r#"
[[secret]]
name = "cookie-secret"
manager = "aws-secrets-manager"
reference = "arn:aws:secretsmanager:eu-west-1:1:secret:cowork/cookie"
version = "v7"
kms_key = "arn:aws:kms:eu-west-1:1:key/abc"
rotated_at = 2026-03-01T00:00:00Z

[[secret]]
name = "billing-webhook-secret"
manager = "vault"
reference = "secret/data/cowork/billing"
"#,
        )
        .expect("write");
        let refs = load_secret_refs(&[SecretRefSource::File(path)]).expect("load");
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].name, "billing-webhook-secret");
        assert_eq!(refs[1].version.as_deref(), Some("v7"));
        assert_eq!(
            refs[1].rotated_at.map(|t| t.to_rfc3339()),
            Some("2026-03-01T00:00:00+00:00".to_owned())
        );
    }

    #[test]
    fn refuses_values_without_printing_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.toml");
        std::fs::write(
            &path,
            "[[secret]]\nname = \"cookie\"\nmanager = \"vault\"\nreference = \"x\"\nvalue = \"hunter2-plaintext\"\n",
        )
        .expect("write");
        let err = load_secret_refs(&[SecretRefSource::File(path)]).expect_err("refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("field `value` would hold a secret value"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");

        let err = load_env(
            "P_",
            [(
                "P_TOKEN".to_owned(),
                "manager=env;secret=hunter2".to_owned(),
            )]
            .into_iter(),
        )
        .expect_err("refused");
        assert!(!format!("{err:#}").contains("hunter2"));
    }

    #[test]
    fn loads_environment_references() {
        let vars = [
            (
                "RC_OIDC_CLIENT_SECRET".to_owned(),
                "manager=gcp-secret-manager; reference=projects/p/secrets/oidc; version=3; \
                 rotated_at=2026-01-02T03:04:05Z"
                    .to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let refs = load_env("RC_", vars.into_iter()).expect("load");
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].name, "oidc-client-secret");
        assert_eq!(refs[0].manager, "gcp-secret-manager");
        assert_eq!(refs[0].version.as_deref(), Some("3"));
        let err = load_env(
            "RC_",
            [("RC_X".to_owned(), "manager=v".to_owned())].into_iter(),
        )
        .expect_err("no reference");
        assert!(err.to_string().contains("has no `reference`"), "{err}");
    }
}
