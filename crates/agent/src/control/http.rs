//! The `http` freeze adapter: calls the role's admin endpoint (cowork-sim:
//! `POST /admin/maintenance {"enabled": true|false}`) with an operator bearer token read from an
//! environment variable or a file at call time. The token is never logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::config::ConfigError;
use serde::Deserialize;

/// `[control.http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFreezeConfig {
    /// The admin endpoint, e.g. "http://127.0.0.1:8080/admin/maintenance".
    pub url: String,
    #[serde(default = "default_freeze_body")]
    pub freeze_body: String,
    #[serde(default = "default_unfreeze_body")]
    pub unfreeze_body: String,
    /// Environment variable holding the bearer token.
    pub token_env: Option<String>,
    /// File holding the bearer token (relative to agent.toml).
    pub token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
}

fn default_freeze_body() -> String {
    r#"{"enabled": true}"#.into()
}

fn default_unfreeze_body() -> String {
    r#"{"enabled": false}"#.into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

pub struct HttpFreeze {
    url: String,
    freeze_body: String,
    unfreeze_body: String,
    token: TokenSource,
    client: reqwest::Client,
}

enum TokenSource {
    None,
    Env(String),
    File(PathBuf),
}

impl HttpFreeze {
    pub fn new(file: &Path, config: &HttpFreezeConfig) -> Result<HttpFreeze> {
        if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
            bail!(ConfigError::new(
                file,
                format!("control.http.url = {:?} is not an http(s) URL", config.url),
                "e.g. url = \"http://127.0.0.1:8080/admin/maintenance\""
            ));
        }
        let token = match (&config.token_env, &config.token_file) {
            (Some(_), Some(_)) => bail!(ConfigError::new(
                file,
                "control.http sets both token_env and token_file",
                "keep one"
            )),
            (Some(var), None) => TokenSource::Env(var.clone()),
            (None, Some(path)) => TokenSource::File(super::resolve_path(file, path)),
            (None, None) => TokenSource::None,
        };
        let client = super::http_client(config.timeout)?;
        Ok(HttpFreeze {
            url: config.url.clone(),
            freeze_body: config.freeze_body.clone(),
            unfreeze_body: config.unfreeze_body.clone(),
            token,
            client,
        })
    }

    fn token(&self) -> Result<Option<String>> {
        match &self.token {
            TokenSource::None => Ok(None),
            TokenSource::Env(var) => std::env::var(var).map(Some).map_err(|_| {
                anyhow::anyhow!(
                    "control.http.token_env names {var}, which is not set in the agent's \
                     environment; set it (the agent never stores the token)"
                )
            }),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .with_context(|| format!("read control.http.token_file {}", path.display())),
        }
    }

    pub async fn set(&self, frozen: bool) -> Result<String> {
        let body = if frozen {
            &self.freeze_body
        } else {
            &self.unfreeze_body
        };
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(token) = self.token()? {
            request = request.bearer_auth(token);
        }
        let what = if frozen { "freeze" } else { "unfreeze" };
        let response = request
            .send()
            .await
            .with_context(|| format!("{what}: POST {} failed", self.url))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => " (check the operator token the agent sends)",
                _ => "",
            };
            bail!(
                "{what}: POST {} answered {status}{hint}: {}",
                self.url,
                text.chars().take(300).collect::<String>()
            );
        }
        Ok(text.chars().take(300).collect())
    }
}
