//! The environment the `process` adapter gives the role's children: `env` tables from
//! agent.toml and `env_file`s of `KEY=VALUE` lines. Values may be secrets (the role's database
//! password, its signing key), so nothing here shows one: `Debug` prints names only, and
//! errors name the file, the line and the key, never what a line holds.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// A table of environment variables (`env = { NAME = "value" }`).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct EnvVars(pub BTreeMap<String, String>);

impl EnvVars {
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &String> {
        self.0.values()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, comma-separated (for logs).
    pub fn names(&self) -> String {
        self.0.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The first name or value the OS cannot pass to a child, as a problem to report.
    pub fn problem(&self) -> Option<String> {
        self.0.iter().find_map(|(k, v)| {
            if let Some(p) = name_problem(k) {
                Some(p)
            } else if v.contains('\0') {
                Some(format!("the value of {k} holds a NUL byte"))
            } else {
                None
            }
        })
    }
}

impl fmt::Debug for EnvVars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: values may be secrets, and settings are printed with `{:?}` in places.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Why `name` cannot be an environment variable's name, if it cannot.
fn name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    (!valid).then(|| {
        format!(
            "{name:?} is not a variable name (letters, digits and _, not starting with a digit)"
        )
    })
}

/// A line of an env file that is not `KEY=VALUE`, a comment or blank.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvFileError {
    /// 1-based.
    pub line: usize,
    pub problem: String,
}

impl fmt::Display for EnvFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

/// Parses an env file: `KEY=VALUE` per line (spaces around both trimmed, an optional
/// `export ` before the key, one pair of matching quotes around the value taken off, nothing
/// else interpreted), `#` comment lines and blank lines ignored. A later line wins.
pub fn parse_env_file(text: &str) -> Result<EnvVars, EnvFileError> {
    let mut vars = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let problem = |problem: String| EnvFileError {
            line: i + 1,
            problem,
        };
        let Some((key, value)) = line.split_once('=') else {
            // The line itself may be a secret pasted without its name: never quote it.
            return Err(problem("not KEY=VALUE (no `=`)".into()));
        };
        let key = key.trim();
        let key = key.strip_prefix("export ").map_or(key, str::trim_start);
        if let Some(p) = name_problem(key) {
            return Err(problem(p));
        }
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| {
                value
                    .strip_prefix(*q)
                    .and_then(|v| v.strip_suffix(*q))
                    .filter(|_| value.len() >= 2)
            })
            .unwrap_or(value);
        if value.contains('\0') {
            return Err(problem(format!("the value of {key} holds a NUL byte")));
        }
        vars.insert(key.to_owned(), value.to_owned());
    }
    Ok(EnvVars(vars))
}

/// Reads and parses `path`; the error names the file and line (never its contents).
pub fn read_env_file(path: &Path) -> anyhow::Result<EnvVars> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {} ({e})", path.display()))?;
    parse_env_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn env_files_parse_pairs_and_skip_comments() {
        let vars = parse_env_file(
            "# the role's secrets\n\nSECRET_KEY=s3cr=et\n  export DATABASE_URL = \"postgres://a:b@db/app\"  \n\
             QUOTED='x y'\nEMPTY=\nSECRET_KEY=later\n",
        )
        .unwrap();
        let got: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            [
                ("DATABASE_URL", "postgres://a:b@db/app"),
                ("EMPTY", ""),
                ("QUOTED", "x y"),
                ("SECRET_KEY", "later"),
            ]
        );
        assert_eq!(
            format!("{vars:?}"),
            r#"{"DATABASE_URL", "EMPTY", "QUOTED", "SECRET_KEY"}"#
        );
    }

    #[test]
    fn malformed_lines_are_named_by_number_without_their_contents() {
        let err = parse_env_file("A=1\n# fine\nhunter2\n").unwrap_err();
        assert_eq!(err.to_string(), "line 3: not KEY=VALUE (no `=`)");
        let err = parse_env_file("A=1\n1BAD=x\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(
            err.problem.contains("\"1BAD\" is not a variable name"),
            "{err}"
        );
        let err = parse_env_file("=value-without-a-name\n").unwrap_err();
        assert!(!err.to_string().contains("value-without"), "{err}");
        assert_eq!(
            EnvVars(BTreeMap::from([("A-B".into(), "x".into())])).problem(),
            Some(
                "\"A-B\" is not a variable name (letters, digits and _, not starting with a digit)"
                    .into()
            )
        );
    }
}
