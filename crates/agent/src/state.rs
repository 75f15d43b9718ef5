//! The agent's state directory: the highest coordinator epoch it has seen and the results of
//! the commands it executed. Both survive restarts, which is what makes epoch fencing and
//! command dedupe hold across an agent crash.
//!
//! Layout: `epoch` (decimal), `results/<sha256 of command id>.json`, `lock` (held while the
//! agent runs, so two agents cannot share one directory).
//!
//! Results of actions without side effects (ping, describe) are remembered in memory only,
//! bounded: repeating such an action after a restart changes nothing, and writing a file per
//! health probe would cost more than the probe.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use api::model::{CommandId, CommandResult, Epoch};
use sha2::{Digest, Sha256};

/// How many results of read-only actions are remembered for dedupe.
const VOLATILE_RESULTS: usize = 4096;

pub struct StateDir {
    dir: PathBuf,
    highest_epoch: Option<Epoch>,
    results: HashMap<CommandId, CommandResult>,
    /// Read-only results, oldest first, at most `VOLATILE_RESULTS`.
    volatile: HashMap<CommandId, CommandResult>,
    volatile_order: std::collections::VecDeque<CommandId>,
    _lock: nix::fcntl::Flock<File>,
}

/// What the epoch check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochCheck {
    /// Equal to the highest seen, or newer (and now persisted as the highest).
    Current,
    /// Lower than the highest seen: the sender is a stale coordinator.
    Stale { highest: Epoch },
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<StateDir> {
        std::fs::create_dir_all(dir.join("results")).with_context(|| {
            format!(
                "create state directory {} (state_dir in the agent config)",
                dir.display()
            )
        })?;
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .with_context(|| format!("open {}", dir.join("lock").display()))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| {
                anyhow::anyhow!(
                    "state directory {} is in use by another agent ({errno}); give each agent \
                     its own state_dir",
                    dir.display()
                )
            })?;

        let epoch_file = dir.join("epoch");
        let highest_epoch = match std::fs::read_to_string(&epoch_file) {
            Ok(text) => {
                let value: u64 = text.trim().parse().with_context(|| {
                    format!(
                        "{} is corrupt ({:?}); it must hold the highest coordinator epoch seen \
                         — restore it from a backup, or delete it only if no stale coordinator \
                         can be running",
                        epoch_file.display(),
                        text.trim()
                    )
                })?;
                Epoch::new(value).ok()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => bail!("read {}: {e}", epoch_file.display()),
        };

        let mut results = HashMap::new();
        for entry in std::fs::read_dir(dir.join("results"))
            .with_context(|| format!("list {}", dir.join("results").display()))?
        {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            // A torn write (crash mid-write) is skipped: that command was never reported done,
            // so executing it again is the correct outcome.
            let parsed = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<CommandResult>(&bytes).ok());
            match parsed {
                Some(result) => {
                    results.insert(result.command_id.clone(), result);
                }
                None => {
                    tracing::warn!(file = %path.display(), "skipping unreadable recorded result")
                }
            }
        }
        Ok(StateDir {
            dir: dir.to_path_buf(),
            highest_epoch,
            results,
            volatile: HashMap::new(),
            volatile_order: std::collections::VecDeque::new(),
            _lock: lock,
        })
    }

    pub fn highest_epoch(&self) -> Option<Epoch> {
        self.highest_epoch
    }

    /// Compares `epoch` with the highest seen; a newer one is made durable before returning,
    /// so nothing is acted on under an epoch a restart could forget.
    pub fn observe_epoch(&mut self, epoch: Epoch) -> Result<EpochCheck> {
        match self.highest_epoch {
            Some(highest) if epoch < highest => Ok(EpochCheck::Stale { highest }),
            Some(highest) if epoch == highest => Ok(EpochCheck::Current),
            _ => {
                write_atomic(&self.dir.join("epoch"), epoch.to_string().as_bytes(), true)
                    .context("persist the coordinator epoch")?;
                self.highest_epoch = Some(epoch);
                Ok(EpochCheck::Current)
            }
        }
    }

    pub fn recorded(&self, id: &CommandId) -> Option<&CommandResult> {
        self.results.get(id).or_else(|| self.volatile.get(id))
    }

    /// Results recorded on disk (those of actions with side effects).
    pub fn recorded_count(&self) -> u64 {
        self.results.len() as u64
    }

    /// Records a result. With `durable` (actions with side effects) it is written and fsynced
    /// before this returns; otherwise it is remembered in memory only.
    pub fn record(&mut self, result: &CommandResult, durable: bool) -> Result<()> {
        if !durable {
            if self.volatile_order.len() >= VOLATILE_RESULTS
                && let Some(oldest) = self.volatile_order.pop_front()
            {
                self.volatile.remove(&oldest);
            }
            self.volatile_order.push_back(result.command_id.clone());
            self.volatile
                .insert(result.command_id.clone(), result.clone());
            return Ok(());
        }
        let name = hex::encode(Sha256::digest(result.command_id.as_str().as_bytes()));
        let path = self.dir.join("results").join(format!("{name}.json"));
        let bytes = serde_json::to_vec(result).context("encode result")?;
        write_atomic(&path, &bytes, durable)
            .with_context(|| format!("record result of command {}", result.command_id))?;
        self.results
            .insert(result.command_id.clone(), result.clone());
        Ok(())
    }
}

/// Writes via a temporary file and rename, so readers see the old or the new content only.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    if durable {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(&tmp, path)?;
    if durable && let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::model::Outcome;
    use std::time::SystemTime;

    fn epoch(n: u64) -> Epoch {
        Epoch::new(n).expect("epoch")
    }

    #[test]
    fn epoch_and_results_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut state = StateDir::open(dir.path()).expect("open");
            assert_eq!(
                state.observe_epoch(epoch(3)).expect("observe"),
                EpochCheck::Current
            );
            assert_eq!(
                state.observe_epoch(epoch(5)).expect("observe"),
                EpochCheck::Current
            );
            state
                .record(
                    &CommandResult {
                        command_id: CommandId::parse("run/0/web-1/1").expect("id"),
                        epoch: epoch(5),
                        outcome: Outcome::Succeeded,
                        message: "done".into(),
                        replayed: false,
                        started: SystemTime::now(),
                        finished: SystemTime::now(),
                        detail: None,
                    },
                    true,
                )
                .expect("record");
        }
        let mut state = StateDir::open(dir.path()).expect("reopen");
        assert_eq!(state.highest_epoch(), Some(epoch(5)));
        assert_eq!(
            state.observe_epoch(epoch(4)).expect("observe"),
            EpochCheck::Stale { highest: epoch(5) }
        );
        let id = CommandId::parse("run/0/web-1/1").expect("id");
        assert_eq!(state.recorded(&id).expect("recorded").message, "done");
    }

    #[test]
    fn read_only_results_are_remembered_in_memory_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let result = |i: usize| CommandResult {
            command_id: CommandId::parse(&format!("ping/{i}")).expect("id"),
            epoch: epoch(1),
            outcome: Outcome::Succeeded,
            message: String::new(),
            replayed: false,
            started: SystemTime::now(),
            finished: SystemTime::now(),
            detail: None,
        };
        {
            let mut state = StateDir::open(dir.path()).expect("open");
            for i in 0..VOLATILE_RESULTS + 10 {
                state.record(&result(i), false).expect("record");
            }
            assert!(
                state.recorded(&result(0).command_id).is_none(),
                "oldest evicted"
            );
            assert!(
                state
                    .recorded(&result(VOLATILE_RESULTS + 9).command_id)
                    .is_some()
            );
            assert_eq!(state.recorded_count(), 0);
        }
        let state = StateDir::open(dir.path()).expect("reopen");
        assert!(
            state
                .recorded(&result(VOLATILE_RESULTS + 9).command_id)
                .is_none()
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("results"))
                .expect("dir")
                .count(),
            0
        );
    }

    #[test]
    fn two_agents_cannot_share_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = StateDir::open(dir.path()).expect("open");
        let err = StateDir::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(
            err.to_string().contains("in use by another agent"),
            "{err:#}"
        );
    }

    #[test]
    fn a_corrupt_epoch_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("epoch"), "banana").expect("write");
        let err = StateDir::open(dir.path()).err().expect("corrupt epoch");
        assert!(format!("{err:#}").contains("is corrupt"), "{err:#}");
    }
}
