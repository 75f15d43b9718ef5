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
    /// `spiffe://rollcall/operator/<name>`
    Operator { name: String },
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
            Identity::Operator { name } => write!(f, "{PREFIX}operator/{name}"),
            Identity::Coordinator => write!(f, "{PREFIX}coordinator"),
        }
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
            },
            Identity::Coordinator,
        ];
        for id in ids {
            assert_eq!(Identity::from_uri(&id.to_uri()), Some(id.clone()), "{id}");
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
        ] {
            assert_eq!(Identity::from_uri(uri), None, "{uri}");
        }
    }
}
