//! Every configuration shipped in `deploy/` loads and validates as written, the way
//! `rollcall agent` and `rollcall coordinator` read it at start: the agent files (also the one
//! inside the Kubernetes manifest) through their checks, data plane and role control; the
//! coordinator files (also the Kubernetes one) through loading and the repository check; and
//! `deploy/agent.toml`'s commented examples, uncommented. The systemd units and
//! `local-fleet.sh` are not configs Rollcall reads; the script is syntax-checked (`bash -n`).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The `toml` files of a directory, but the coordinator's `rollcall.toml`.
fn agent_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "toml")
                && p.file_name().is_some_and(|n| n != "rollcall.toml")
        })
        .collect();
    files.sort();
    files
}

/// The block under `key: |` in a Kubernetes ConfigMap, unindented.
fn embedded(manifest: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    assert!(lines.next().is_some(), "{}: no {key}", manifest.display());
    let block: Vec<&str> = lines
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .collect();
    assert!(!block.is_empty(), "{}: {key} is empty", manifest.display());
    block
        .iter()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads an agent config and builds what `rollcall agent` builds from it before attaching.
fn check_agent(file: &Path, state: &Path) -> agent::config::AgentConfig {
    let shown = file.display();
    let config: agent::config::AgentConfig = api::config::load_toml(file, "deploy/agent.toml")
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    agent::checks::Checks::from_config(
        file,
        &config.checks,
        &config.invariants,
        &config.references,
        config.smoke.as_ref(),
    )
    .unwrap_or_else(|e| panic!("{shown}: {e:#}"));
    agent::data::DataPlane::from_config(
        file,
        &config.name,
        &config.environment,
        config.postgres.as_ref(),
        config.objects.as_ref(),
    )
    .unwrap_or_else(|e| panic!("{shown}: {e:#}"));
    agent::control::RoleControl::from_config(file, &config.control, &state.join(&config.name))
        .unwrap_or_else(|e| panic!("{shown}: {e:#}"));
    config
}

#[test]
fn every_shipped_agent_config_loads_as_written() {
    let state = tempfile::tempdir().unwrap();
    let mut files = vec![deploy().join("agent.toml")];
    files.extend(agent_files(&deploy().join("cowork-sim")));
    files.extend(agent_files(&deploy().join("cowork-sim-real")));
    let k8s = state.path().join("k8s-agent.toml");
    std::fs::write(
        &k8s,
        embedded(
            &deploy().join("kubernetes/web-with-agent.yaml"),
            "agent.toml",
        ),
    )
    .unwrap();
    files.push(k8s);
    assert!(files.len() >= 13, "{files:?}");
    for file in &files {
        check_agent(file, state.path());
    }
}

#[test]
fn every_shipped_coordinator_config_loads_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let k8s = dir.path().join("k8s-rollcall.toml");
    std::fs::write(
        &k8s,
        embedded(
            &deploy().join("kubernetes/coordinator.yaml"),
            "rollcall.toml",
        ),
    )
    .unwrap();
    for file in [
        deploy().join("rollcall.toml"),
        deploy().join("cowork-sim/rollcall.toml"),
        deploy().join("cowork-sim-real/rollcall.toml"),
        k8s,
    ] {
        let shown = file.display();
        let loaded = coordinator::config::load(&file).unwrap_or_else(|e| panic!("{shown}: {e:#}"));
        assert!(!loaded.environments.is_empty(), "{shown}");
        loaded
            .check_repositories()
            .unwrap_or_else(|e| panic!("{shown}: {e:#}"));
    }
}

/// `deploy/agent.toml` with every commented `key = value` line and table header uncommented
/// (prose and continuation comments stay comments): the documented options, all at once.
fn uncommented_agent_example() -> String {
    let text = std::fs::read_to_string(deploy().join("agent.toml")).unwrap();
    let option = |l: &str| {
        let code = l.split(" #").next().unwrap_or(l).trim_end();
        let header = code.starts_with('[') && code.ends_with(']');
        let key = l.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        });
        header || key
    };
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if option(rest) => rest.to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_agent_examples_load_uncommented() {
    let dir = tempfile::tempdir().unwrap();
    // What the examples name on the agent's machine: the children's working directory, their
    // env file, the token and database URL variables.
    std::fs::create_dir_all(dir.path().join("srv/web")).unwrap();
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::write(
        dir.path().join("secrets/web.env"),
        "# none yet\nMODE=restore\n",
    )
    .unwrap();
    let text = uncommented_agent_example()
        .replace("cwd = \"/srv/web\"", "cwd = \"srv/web\"")
        .replace(
            "\"/var/lib/rollcall/scratch\"",
            &format!("\"{}\"", dir.path().join("pg-scratch").display()),
        )
        .replace(
            "\"/var/lib/rollcall/objects-scratch\"",
            &format!("\"{}\"", dir.path().join("objects-scratch").display()),
        );
    for documented in [
        "[control.process]",
        "first_start_env = { RUN_MIGRATIONS = \"false\" }",
        "[postgres.freeze]",
        "[[check.expect_json]]",
        "[[check.expect_metric]]",
        "[[reference]]",
        "[smoke]",
    ] {
        assert!(
            text.contains(&format!("\n{documented}")),
            "{documented} not uncommented"
        );
    }
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, &text).unwrap();
    let config = check_agent(&file, dir.path());
    assert_eq!(config.checks.len(), 3);
    assert!(config.postgres.is_some() && config.objects.is_some());
}

#[test]
fn the_local_fleet_script_parses() {
    // A bash script (its shebang says so).
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(deploy().join("local-fleet.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
