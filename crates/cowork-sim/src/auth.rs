//! API tokens: issued once in plaintext, stored only as their SHA-256, each with one scope.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::Row as _;

use crate::Profile;
use crate::store::new_id;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// A user's desktop app: sessions of its tenant.
    Desktop,
    /// An operator: workspace, diagnostics, metrics, maintenance mode.
    Operator,
    /// The channel gateway's service token.
    Gateway,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Desktop, Scope::Operator, Scope::Gateway];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Desktop => "desktop",
            Scope::Operator => "operator",
            Scope::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Scope> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .with_context(|| {
                format!("unknown token scope {s:?}: use one of desktop, operator, gateway")
            })
    }
}

/// The hex SHA-256 of a token: the only form stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A token just issued; `token` is shown here and nowhere else.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedToken {
    pub id: String,
    pub scope: Scope,
    pub tenant_id: Option<String>,
    pub token: String,
}

/// A fresh random token: `cws_<scope>_<40 hex digits>`.
pub fn generate_token(scope: Scope) -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill(&mut bytes);
    format!("cws_{}_{}", scope.as_str(), hex::encode(bytes))
}

/// Issues a token. Desktop tokens need a tenant; operator and gateway tokens may be fleet-wide.
pub async fn issue_token(
    pool: &PgPool,
    profile: Profile,
    scope: Scope,
    tenant_id: Option<&str>,
    account_id: Option<&str>,
    name: &str,
) -> Result<IssuedToken> {
    if scope == Scope::Desktop && tenant_id.is_none() {
        anyhow::bail!("a desktop token belongs to a tenant: pass --tenant TENANT_ID");
    }
    let token = generate_token(scope);
    let id = new_id("tok");
    sqlx::query(profile.sql(
        "INSERT INTO {api_tokens} (id, tenant_id, account_id, name, token_sha256, scope)
         VALUES ($1, $2, $3, $4, $5, $6)",
    ))
    .bind(&id)
    .bind(tenant_id)
    .bind(account_id)
    .bind(name)
    .bind(hash_token(&token))
    .bind(scope.as_str())
    .execute(pool)
    .await
    .with_context(|| {
        format!(
            "issue a {scope} token{} (does the tenant exist and is the schema migrated?)",
            tenant_id
                .map(|t| format!(" for tenant {t}"))
                .unwrap_or_default()
        )
    })?;
    Ok(IssuedToken {
        id,
        scope,
        tenant_id: tenant_id.map(str::to_owned),
        token,
    })
}

/// Who is calling, as established from a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub scope: Scope,
    pub tenant_id: Option<String>,
    pub account_id: Option<String>,
}

/// Looks a presented token up by its hash; `None` when unknown or revoked.
pub async fn authenticate(
    pool: &PgPool,
    profile: Profile,
    token: &str,
) -> Result<Option<Principal>> {
    let row = sqlx::query(profile.sql(
        "SELECT id, scope, tenant_id, account_id FROM {api_tokens}
         WHERE token_sha256 = $1 AND revoked_at IS NULL",
    ))
    .bind(hash_token(token))
    .fetch_optional(pool)
    .await
    .context("look up an API token")?;
    let Some(row) = row else { return Ok(None) };
    let scope: String = row.try_get("scope")?;
    Ok(Some(Principal {
        token_id: row.try_get("id")?,
        scope: scope.parse()?,
        tenant_id: row.try_get("tenant_id")?,
        account_id: row.try_get("account_id")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_unknown_is_refused() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>().ok(), Some(scope));
        }
        let err = "admin".parse::<Scope>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("desktop, operator, gateway")));
    }

    #[test]
    fn tokens_are_random_and_hash_to_hex() {
        let a = generate_token(Scope::Operator);
        assert!(a.starts_with("cws_operator_"));
        assert_ne!(a, generate_token(Scope::Operator));
        let h = hash_token(&a);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&a));
    }
}
