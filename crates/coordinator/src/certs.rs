//! `rollcall certs init`: a development CA and the certificates of a local fleet.
//!
//! Each agent certificate carries its identity as a SAN URI (`api::identity`), which is what
//! the coordinator checks an agent's claimed name and role against. Running `init` again on
//! the same directory keeps the CA and existing certificates and adds what is missing, so new
//! agents can join a fleet whose certificates are already deployed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use api::identity::{Identity, OperatorRole};
use api::model::{AgentName, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const COORDINATOR_CERT: &str = "coordinator.pem";
pub const COORDINATOR_KEY: &str = "coordinator-key.pem";
pub const OPERATOR_CERT: &str = "operator.pem";
pub const OPERATOR_KEY: &str = "operator-key.pem";

/// Where the certificate and key of agent `name` live inside a certs directory.
pub fn agent_files(dir: &Path, name: &AgentName) -> (PathBuf, PathBuf) {
    let agents = dir.join("agents");
    (
        agents.join(format!("{name}.pem")),
        agents.join(format!("{name}-key.pem")),
    )
}

/// Where the certificate and key of operator `name` (`--operator NAME:ROLE`) live inside a
/// certs directory.
pub fn operator_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let operators = dir.join("operators");
    (
        operators.join(format!("{name}.pem")),
        operators.join(format!("{name}-key.pem")),
    )
}

/// Parses `NAME:ROLE` as given to `--operator` (roles: viewer, operator, admin).
pub fn parse_operator_spec(spec: &str) -> Result<(String, OperatorRole)> {
    let Some((name, role)) = spec.split_once(':') else {
        bail!("--operator {spec:?}: expected NAME:ROLE, e.g. alice:viewer");
    };
    api::identity::check_operator_name(name)
        .map_err(|e| anyhow::anyhow!("--operator {spec:?}: {e}"))?;
    let role =
        OperatorRole::parse(role).map_err(|e| anyhow::anyhow!("--operator {spec:?}: {e}"))?;
    Ok((name.to_owned(), role))
}

#[derive(Debug, Clone)]
pub struct InitRequest {
    pub dir: PathBuf,
    pub agents: Vec<(AgentName, Role)>,
    /// Extra DNS names or IP addresses for the coordinator certificate (localhost,
    /// 127.0.0.1 and ::1 are always included).
    pub coordinator_hosts: Vec<String>,
    /// Name carried by the operator certificate (`operator.pem`, an admin).
    pub operator: String,
    /// Operator certificates with a role, in `operators/NAME.pem`.
    pub operators: Vec<(String, OperatorRole)>,
}

/// What `init` did, for the CLI to report.
#[derive(Debug, Default)]
pub struct InitReport {
    pub created: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

/// Parses `NAME:ROLE` as given to `--agent`.
pub fn parse_agent_spec(spec: &str) -> Result<(AgentName, Role)> {
    let Some((name, role)) = spec.split_once(':') else {
        bail!("--agent {spec:?}: expected NAME:ROLE, e.g. web-1:web");
    };
    let name = AgentName::parse(name).with_context(|| format!("--agent {spec:?}"))?;
    let role = Role::parse(role).with_context(|| format!("--agent {spec:?}"))?;
    Ok((name, role))
}

pub fn init(req: &InitRequest) -> Result<InitReport> {
    let dir = &req.dir;
    std::fs::create_dir_all(dir.join("agents"))
        .with_context(|| format!("create certificate directory {}", dir.display()))?;
    let mut report = InitReport::default();

    let (ca_cert_path, ca_key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let (ca_pem, ca_key_pem) = if ca_cert_path.exists() && ca_key_path.exists() {
        report.kept.push(ca_cert_path.clone());
        (read(&ca_cert_path)?, read(&ca_key_path)?)
    } else if ca_cert_path.exists() || ca_key_path.exists() {
        bail!(
            "{} holds only half of a CA (need both {CA_CERT} and {CA_KEY}): restore the missing \
             file or use an empty directory",
            dir.display()
        );
    } else {
        let key = KeyPair::generate().context("generate CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Rollcall development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .context("self-sign CA certificate")?;
        write_pair(
            &ca_cert_path,
            &cert.pem(),
            &ca_key_path,
            &key.serialize_pem(),
            &mut report,
        )?;
        (cert.pem(), key.serialize_pem())
    };
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("parse CA key {}", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("parse CA certificate {}", ca_cert_path.display()))?;

    // Coordinator: a server certificate for the agent stream and the operator API.
    let mut sans = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        SanType::URI(Identity::Coordinator.to_uri().as_str().try_into()?),
    ];
    for host in &req.coordinator_hosts {
        match host.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(host.as_str().try_into().with_context(
                || format!("--coordinator-host {host:?} is not a DNS name"),
            )?)),
        }
    }
    leaf(
        &issuer,
        "rollcall coordinator",
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
        &dir.join(COORDINATOR_CERT),
        &dir.join(COORDINATOR_KEY),
        &mut report,
    )?;

    let operator = Identity::Operator {
        name: req.operator.clone(),
        role: OperatorRole::Admin,
    };
    leaf(
        &issuer,
        &format!("rollcall operator {}", req.operator),
        vec![SanType::URI(operator.to_uri().as_str().try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
        &dir.join(OPERATOR_CERT),
        &dir.join(OPERATOR_KEY),
        &mut report,
    )?;

    if !req.operators.is_empty() {
        std::fs::create_dir_all(dir.join("operators"))
            .with_context(|| format!("create {}", dir.join("operators").display()))?;
    }
    for (name, role) in &req.operators {
        let id = Identity::Operator {
            name: name.clone(),
            role: *role,
        };
        let (cert, key) = operator_files(dir, name);
        same_identity(&cert, &id, &format!("{name}:{role}"))?;
        leaf(
            &issuer,
            &format!("rollcall operator {name} ({role})"),
            vec![SanType::URI(id.to_uri().as_str().try_into()?)],
            ExtendedKeyUsagePurpose::ClientAuth,
            &cert,
            &key,
            &mut report,
        )?;
    }

    for (name, role) in &req.agents {
        let id = Identity::Agent {
            name: name.clone(),
            role: role.clone(),
        };
        let (cert, key) = agent_files(dir, name);
        same_identity(&cert, &id, &format!("{name}:{role}"))?;
        leaf(
            &issuer,
            &format!("rollcall agent {name} ({role})"),
            vec![SanType::URI(id.to_uri().as_str().try_into()?)],
            ExtendedKeyUsagePurpose::ClientAuth,
            &cert,
            &key,
            &mut report,
        )?;
    }
    Ok(report)
}

/// Refuses to keep an existing certificate at `cert` that carries another identity than `id`
/// (`spec` as the operator wrote it).
fn same_identity(cert: &Path, id: &Identity, spec: &str) -> Result<()> {
    if !cert.exists() {
        return Ok(());
    }
    let existing = std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?;
    let ids = api::identity::in_certificate_pem(&existing);
    if !ids.contains(id) {
        bail!(
            "{} already exists for another identity ({}); delete it to issue a certificate \
             for {spec}",
            cert.display(),
            ids.iter()
                .map(Identity::to_uri)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    cert_path: &Path,
    key_path: &Path,
    report: &mut InitReport,
) -> Result<()> {
    if cert_path.exists() && key_path.exists() {
        report.kept.push(cert_path.to_path_buf());
        return Ok(());
    }
    let key = KeyPair::generate().context("generate key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("sign certificate for {common_name}"))?;
    write_pair(
        cert_path,
        &cert.pem(),
        key_path,
        &key.serialize_pem(),
        report,
    )
}

fn write_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
    report: &mut InitReport,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Keys are created 0600 from the start, never world-readable for an instant.
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key_path)
        .with_context(|| format!("create {}", key_path.display()))?;
    key.write_all(key_pem.as_bytes())
        .with_context(|| format!("write {}", key_path.display()))?;
    std::fs::write(cert_path, cert_pem)
        .with_context(|| format!("write {}", cert_path.display()))?;
    report.created.push(cert_path.to_path_buf());
    report.created.push(key_path.to_path_buf());
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(dir: &Path, agents: &[&str]) -> InitRequest {
        InitRequest {
            dir: dir.to_path_buf(),
            agents: agents
                .iter()
                .map(|s| parse_agent_spec(s).expect("valid spec"))
                .collect(),
            coordinator_hosts: vec!["coord.internal".into(), "10.0.0.5".into()],
            operator: "ops".into(),
            operators: Vec::new(),
        }
    }

    #[test]
    fn operators_get_certificates_with_their_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut req = request(dir.path(), &[]);
        req.operators = vec![
            parse_operator_spec("vera:viewer").expect("spec"),
            parse_operator_spec("ada:admin").expect("spec"),
        ];
        init(&req).expect("init");
        let ids =
            |path: PathBuf| api::identity::in_certificate_pem(&std::fs::read(path).expect("cert"));
        assert_eq!(
            ids(operator_files(dir.path(), "vera").0),
            vec![Identity::Operator {
                name: "vera".into(),
                role: OperatorRole::Viewer
            }]
        );
        assert_eq!(
            ids(operator_files(dir.path(), "ada").0),
            vec![Identity::Operator {
                name: "ada".into(),
                role: OperatorRole::Admin
            }]
        );
        // operator.pem stays an admin.
        assert_eq!(
            ids(dir.path().join(OPERATOR_CERT)),
            vec![Identity::Operator {
                name: "ops".into(),
                role: OperatorRole::Admin
            }]
        );
        // The same name for another role is refused, not silently kept.
        req.operators = vec![parse_operator_spec("vera:admin").expect("spec")];
        let err = init(&req).expect_err("role change");
        assert!(
            err.to_string()
                .contains("already exists for another identity"),
            "{err:#}"
        );
        for bad in ["vera", "vera:root", "../x:viewer"] {
            let err = parse_operator_spec(bad).expect_err(bad);
            assert!(format!("{err:#}").contains(&format!("{bad:?}")), "{err:#}");
        }
    }

    #[test]
    fn issues_identities_and_adds_agents_on_rerun() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = init(&request(dir.path(), &["web-1:web"])).expect("init");
        assert_eq!(first.created.len(), 8, "{:?}", first.created);
        let ca_before = std::fs::read(dir.path().join(CA_CERT)).expect("ca");

        let second = init(&request(dir.path(), &["web-1:web", "db-1:database"])).expect("rerun");
        assert_eq!(
            second.created.len(),
            2,
            "only the new agent: {:?}",
            second.created
        );
        assert_eq!(
            std::fs::read(dir.path().join(CA_CERT)).expect("ca"),
            ca_before
        );

        let (cert, key) = agent_files(dir.path(), &AgentName::parse("db-1").expect("name"));
        let ids = api::identity::in_certificate_pem(&std::fs::read(cert).expect("cert"));
        assert_eq!(
            ids,
            vec![Identity::Agent {
                name: AgentName::parse("db-1").expect("name"),
                role: Role::parse("database").expect("role"),
            }]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key).expect("key").permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "key must not be readable by others: {mode:o}"
        );
    }

    #[test]
    fn refuses_to_reissue_a_name_for_another_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(&request(dir.path(), &["w-1:worker"])).expect("init");
        let err = init(&request(dir.path(), &["w-1:web"])).expect_err("role change");
        assert!(
            err.to_string()
                .contains("already exists for another identity"),
            "{err:#}"
        );
    }

    #[test]
    fn agent_spec_errors_name_the_input() {
        let err = parse_agent_spec("web1").expect_err("no role");
        assert!(err.to_string().contains("NAME:ROLE"), "{err:#}");
        let err = parse_agent_spec("Web:web").expect_err("bad name");
        assert!(format!("{err:#}").contains("\"Web:web\""), "{err:#}");
    }
}
