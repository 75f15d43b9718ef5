//! Who a TLS peer is: the identity Rollcall certificates carry as a SAN URI.
//!
//! `certs init` writes these URIs; the coordinator reads them from the peer certificate and
//! compares them with what an agent claims in its hello. Keeping the format here, beside the
//! wire contract, means the writer and the reader cannot drift apart.

use std::fmt;

use crate::model::{AgentName, Role};

const PREFIX: &str = "spiffe://rollcall/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `spiffe://rollcall/agent/<role>/<name>`
    Agent { name: AgentName, role: Role },
    /// `spiffe://rollcall/operator/<name>` (an admin, as every operator certificate issued
    /// before roles was) or `spiffe://rollcall/operator/<role>/<name>`.
    Operator { name: String, role: OperatorRole },
    /// `spiffe://rollcall/coordinator`
    Coordinator,
}

impl Identity {
    /// Parses a SAN URI; `None` when it is not a Rollcall identity (other SANs are ignored).
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["agent", role, name] => Some(Identity::Agent {
                name: AgentName::parse(name).ok()?,
                role: Role::parse(role).ok()?,
            }),
            ["operator", name] if !name.is_empty() => Some(Identity::Operator {
                name: (*name).to_owned(),
                role: OperatorRole::Admin,
            }),
            ["operator", role, name] if !name.is_empty() => Some(Identity::Operator {
                name: (*name).to_owned(),
                role: OperatorRole::parse(role).ok()?,
            }),
            ["coordinator"] => Some(Identity::Coordinator),
            _ => None,
        }
    }

    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent { name, role } => write!(f, "{PREFIX}agent/{role}/{name}"),
            // An admin keeps the form from before roles, so older coordinators read it too.
            Identity::Operator {
                name,
                role: OperatorRole::Admin,
            } => write!(f, "{PREFIX}operator/{name}"),
            Identity::Operator { name, role } => write!(f, "{PREFIX}operator/{role}/{name}"),
            Identity::Coordinator => write!(f, "{PREFIX}coordinator"),
        }
    }
}

/// What an operator may do (DESIGN.md, "Security"); each includes the ones before it.
///
/// * `viewer`: agents, runs, watch, report, points;
/// * `operator`: also backups, and drills and restore tests of environments that are not
///   `protected`;
/// * `admin`: also drills, recoveries and undos of protected environments, and prunes.
///
/// Which call needs which role is decided in one table, the coordinator's `access` module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OperatorRole {
    Viewer,
    Operator,
    Admin,
}

impl OperatorRole {
    pub const ALL: [OperatorRole; 3] = [
        OperatorRole::Viewer,
        OperatorRole::Operator,
        OperatorRole::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Viewer => "viewer",
            OperatorRole::Operator => "operator",
            OperatorRole::Admin => "admin",
        }
    }

    /// Parses `viewer`, `operator` or `admin`; the error names the input and the choices.
    pub fn parse(s: &str) -> Result<OperatorRole, String> {
        OperatorRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("operator role {s:?} is not one of viewer, operator, admin"))
    }
}

impl fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Checks an operator's name as certificates, file names and the journal carry it: letters,
/// digits, `.`, `-` and `_`, not starting with `.`, at most 64 characters.
pub fn check_operator_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "operator name {name:?} must be 1 to 64 letters, digits, '.', '-' or '_', not \
             starting with '.'"
        ))
    }
}

/// The Rollcall identities in a DER certificate (its SAN URIs); empty if it has none.
pub fn in_certificate_der(der: &[u8]) -> Vec<Identity> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Identity::from_uri(uri),
            _ => None,
        })
        .collect()
}

/// The Rollcall identities in the first certificate of PEM text.
pub fn in_certificate_pem(pem: &[u8]) -> Vec<Identity> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(der)) => in_certificate_der(&der),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_identity() {
        let ids = [
            Identity::Agent {
                name: AgentName::parse("web-1").expect("valid"),
                role: Role::parse("web").expect("valid"),
            },
            Identity::Operator {
                name: "alice".into(),
                role: OperatorRole::Admin,
            },
            Identity::Operator {
                name: "bob".into(),
                role: OperatorRole::Viewer,
            },
            Identity::Operator {
                name: "carol".into(),
                role: OperatorRole::Operator,
            },
            Identity::Coordinator,
        ];
        for id in ids {
            assert_eq!(Identity::from_uri(&id.to_uri()), Some(id.clone()), "{id}");
        }
    }

    #[test]
    fn operator_certificates_from_before_roles_are_admins() {
        assert_eq!(
            Identity::from_uri("spiffe://rollcall/operator/ops"),
            Some(Identity::Operator {
                name: "ops".into(),
                role: OperatorRole::Admin
            })
        );
        let admin = Identity::Operator {
            name: "ops".into(),
            role: OperatorRole::Admin,
        };
        assert_eq!(admin.to_uri(), "spiffe://rollcall/operator/ops");
        assert_eq!(
            Identity::from_uri("spiffe://rollcall/operator/viewer/bob"),
            Some(Identity::Operator {
                name: "bob".into(),
                role: OperatorRole::Viewer
            })
        );
    }

    #[test]
    fn operator_roles_and_names_are_checked() {
        assert!(OperatorRole::Viewer < OperatorRole::Operator);
        assert!(OperatorRole::Operator < OperatorRole::Admin);
        assert_eq!(OperatorRole::parse("admin"), Ok(OperatorRole::Admin));
        let e = OperatorRole::parse("root").expect_err("unknown role");
        assert!(
            e.contains("\"root\"") && e.contains("viewer, operator, admin"),
            "{e}"
        );
        assert!(check_operator_name("alice.b-1_x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_operator_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ignores_foreign_and_malformed_uris() {
        for uri in [
            "https://example.com/",
            "spiffe://other/agent/web/w1",
            "spiffe://rollcall/agent/web",
            "spiffe://rollcall/agent/web/w1/extra",
            "spiffe://rollcall/agent/WEB!/w1",
            "spiffe://rollcall/operator/",
            "spiffe://rollcall/operator/root/alice",
            "spiffe://rollcall/operator/viewer/",
        ] {
            assert_eq!(Identity::from_uri(uri), None, "{uri}");
        }
    }
}
