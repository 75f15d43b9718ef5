//! The coordinator's live view of its agents: who is attached, their readiness, and the
//! commands awaiting a result on each connection.
//!
//! One mutex guards the whole table; every critical section is a few map operations and
//! never awaits, which keeps it cheap at 10,000 agents.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use api::model::{
    AgentName, AgentStatus, Availability, CommandId, CommandProgress, CommandResult,
    CoordinatorMessage, Environment, Heartbeat, Hello, Role, to_unix_ms,
};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Progress reports not yet taken by the journal; beyond this the oldest are dropped.
const PROGRESS_BACKLOG: usize = 1024;

/// Presence changes not yet taken by the journal; beyond this the oldest are dropped.
const PRESENCE_BACKLOG: usize = 1024;

/// Identifies one attachment of an agent; a stale connection cannot touch a newer one.
pub type Generation = u64;

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Table>>,
    progress: broadcast::Sender<(AgentName, CommandProgress)>,
    presence: broadcast::Sender<Presence>,
}

/// An agent known to this registry lost its connection, or came back after one. The first
/// attachment of an agent since the coordinator started is neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub agent: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub change: PresenceChange,
    pub at: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    /// Its stream ended or went silent: why.
    Lost(String),
    /// It attached again after it was lost; `replaced` when its previous connection had not
    /// been seen to end (it restarted, or its connection was cut without a word).
    Back { replaced: bool },
}

#[derive(Default)]
struct Table {
    agents: BTreeMap<AgentName, Entry>,
    next_generation: Generation,
}

struct Entry {
    hello: Hello,
    ready: bool,
    detail: String,
    last_heartbeat: Instant,
    last_heartbeat_at: SystemTime,
    connected_since: SystemTime,
    peer: Option<SocketAddr>,
    conn: Option<Connection>,
    /// The agent's clock minus ours at its last heartbeat that carried one (milliseconds).
    clock_offset_ms: Option<i64>,
}

/// The queue of messages towards one agent's stream. Boxed: the queue allocates its slots in
/// blocks of 32, and a block of boxes is 256 bytes where one of messages is 6.6 KiB — per
/// attached agent, for as long as it stays attached.
pub type Outbound = mpsc::Sender<Box<CoordinatorMessage>>;

struct Connection {
    generation: Generation,
    tx: Outbound,
    pending: HashMap<CommandId, oneshot::Sender<CommandResult>>,
}

/// Why a command could not be handed to an agent's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    NotConnected,
    /// The agent's outbound queue is full: it is not reading its stream.
    Backlogged,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            inner: Arc::new(Mutex::new(Table::default())),
            progress: broadcast::channel(PROGRESS_BACKLOG).0,
            presence: broadcast::channel(PRESENCE_BACKLOG).0,
        }
    }

    /// Agents lost and back, as they happen (the engine journals them on unfinished runs).
    pub fn subscribe_presence(&self) -> broadcast::Receiver<Presence> {
        self.presence.subscribe()
    }

    fn publish(&self, hello: &Hello, change: PresenceChange, at: SystemTime) {
        // Nobody listening is fine: the journal's view of presence is best effort.
        let _ = self.presence.send(Presence {
            agent: hello.name.clone(),
            role: hello.role.clone(),
            environment: hello.environment.clone(),
            change,
            at,
        });
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock leaves plain data behind, still consistent enough to
        // keep serving; recover rather than take the coordinator down.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a new attachment, replacing any older connection of the same agent (its
    /// waiters are told it disconnected).
    pub fn attach(&self, hello: Hello, peer: Option<SocketAddr>, tx: Outbound) -> Generation {
        let mut table = self.lock();
        table.next_generation += 1;
        let generation = table.next_generation;
        let now = SystemTime::now();
        let name = hello.name.clone();
        let entry = Entry {
            hello,
            ready: false,
            detail: "attached; waiting for first heartbeat".into(),
            last_heartbeat: Instant::now(),
            last_heartbeat_at: now,
            connected_since: now,
            peer,
            clock_offset_ms: None,
            conn: Some(Connection {
                generation,
                tx,
                pending: HashMap::new(),
            }),
        };
        let back = table.agents.insert(name.clone(), entry).map(|old| {
            if old.conn.is_some() {
                tracing::warn!(agent = %name, "agent attached again; dropping its previous connection");
            }
            (old.hello, old.conn.is_some())
        });
        drop(table);
        if let Some((hello, replaced)) = back {
            self.publish(&hello, PresenceChange::Back { replaced }, now);
        }
        generation
    }

    pub fn heartbeat(&self, name: &AgentName, generation: Generation, hb: Heartbeat) {
        let mut table = self.lock();
        if let Some(entry) = table.agents.get_mut(name)
            && entry
                .conn
                .as_ref()
                .is_some_and(|c| c.generation == generation)
        {
            let now = SystemTime::now();
            entry.ready = hb.ready;
            entry.detail = hb.detail;
            entry.last_heartbeat = Instant::now();
            entry.last_heartbeat_at = now;
            if let Some(sent) = hb.sent_at {
                // The heartbeat's travel time counts as offset: milliseconds on a healthy link.
                let offset = to_unix_ms(sent).saturating_sub(to_unix_ms(now));
                let limit = api::human::CLOCK_OFFSET_WARN_MS;
                let was_off = entry.clock_offset_ms.is_some_and(|o| o.abs() > limit);
                if offset.abs() > limit && !was_off {
                    tracing::warn!(
                        agent = %name,
                        offset_ms = offset,
                        "agent {name}'s clock is {} the coordinator's: commands do not depend on \
                         it, but logs, reports and point stamps of different machines will not \
                         line up; synchronise the clocks (NTP, chrony)",
                        api::human::clock_offset(offset)
                    );
                } else if was_off && offset.abs() <= limit {
                    tracing::info!(agent = %name, offset_ms = offset, "agent {name}'s clock agrees with the coordinator's again");
                }
                entry.clock_offset_ms = Some(offset);
            }
        }
    }

    /// Progress of commands awaiting their result, as agents report it.
    pub fn subscribe_progress(&self) -> broadcast::Receiver<(AgentName, CommandProgress)> {
        self.progress.subscribe()
    }

    /// Publishes an agent's progress report, if its command still awaits a result on this
    /// connection (a report from a replaced connection or for a forgotten command is dropped).
    pub fn progress(&self, name: &AgentName, generation: Generation, progress: CommandProgress) {
        let mut table = self.lock();
        let Some(entry) = table.agents.get_mut(name) else {
            return;
        };
        let awaited = entry
            .conn
            .as_ref()
            .filter(|c| c.generation == generation)
            .is_some_and(|c| c.pending.contains_key(&progress.command_id));
        entry.last_heartbeat = Instant::now();
        entry.last_heartbeat_at = SystemTime::now();
        drop(table);
        if awaited {
            // Nobody listening is fine: progress is best effort.
            let _ = self.progress.send((name.clone(), progress));
        }
    }

    /// Hands a result to whoever awaits it. Results nobody awaits (the waiter gave up, or the
    /// result crossed a reconnect) are dropped: the sender re-sends with the same command id
    /// and the agent replays its recorded result.
    pub fn deliver(&self, name: &AgentName, generation: Generation, result: CommandResult) {
        let mut table = self.lock();
        let waiter = table
            .agents
            .get_mut(name)
            .and_then(|e| e.conn.as_mut())
            .filter(|c| c.generation == generation)
            .and_then(|c| c.pending.remove(&result.command_id));
        // Receiving any message proves the agent alive as much as a heartbeat does.
        if let Some(entry) = table.agents.get_mut(name) {
            entry.last_heartbeat = Instant::now();
            entry.last_heartbeat_at = SystemTime::now();
        }
        drop(table);
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(result);
            }
            None => tracing::debug!(
                agent = %name,
                command_id = %result.command_id,
                "result arrived with nobody waiting for it"
            ),
        }
    }

    /// Marks the agent unavailable if `generation` is still its connection.
    pub fn detach(&self, name: &AgentName, generation: Generation, reason: &str) {
        let mut table = self.lock();
        if let Some(entry) = table.agents.get_mut(name)
            && entry
                .conn
                .as_ref()
                .is_some_and(|c| c.generation == generation)
        {
            entry.conn = None;
            entry.ready = false;
            entry.detail = reason.to_owned();
            tracing::info!(agent = %name, "agent unavailable: {reason}");
            let hello = entry.hello.clone();
            drop(table);
            self.publish(
                &hello,
                PresenceChange::Lost(reason.to_owned()),
                SystemTime::now(),
            );
        }
    }

    /// Ends every connection (their streams close, so agents reconnect elsewhere).
    pub fn detach_all(&self, reason: &str) {
        let mut table = self.lock();
        for entry in table.agents.values_mut() {
            if entry.conn.take().is_some() {
                entry.ready = false;
                entry.detail = reason.to_owned();
            }
        }
    }

    /// Queues a message for an agent; with `waiter`, registers it to receive the result of
    /// the command `id`.
    pub fn send(
        &self,
        name: &AgentName,
        message: CoordinatorMessage,
        waiter: Option<(CommandId, oneshot::Sender<CommandResult>)>,
    ) -> Result<(), SendError> {
        let mut table = self.lock();
        let conn = table
            .agents
            .get_mut(name)
            .and_then(|e| e.conn.as_mut())
            .ok_or(SendError::NotConnected)?;
        match conn.tx.try_send(Box::new(message)) {
            Ok(()) => {
                if let Some((id, tx)) = waiter {
                    conn.pending.insert(id, tx);
                }
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::Backlogged),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::NotConnected),
        }
    }

    /// Forgets a waiter that gave up.
    pub fn forget(&self, name: &AgentName, id: &CommandId) {
        let mut table = self.lock();
        if let Some(conn) = table.agents.get_mut(name).and_then(|e| e.conn.as_mut()) {
            conn.pending.remove(id);
        }
    }

    /// Drops the connections of agents silent for longer than `timeout`; returns their names.
    pub fn expire(&self, timeout: Duration) -> Vec<AgentName> {
        let mut table = self.lock();
        let mut expired = Vec::new();
        let mut lost = Vec::new();
        for (name, entry) in table.agents.iter_mut() {
            if entry.conn.is_some() && entry.last_heartbeat.elapsed() > timeout {
                entry.conn = None;
                entry.ready = false;
                entry.detail = format!("no heartbeat for {}", humantime::format_duration(timeout));
                expired.push(name.clone());
                lost.push((entry.hello.clone(), entry.detail.clone()));
            }
        }
        drop(table);
        let now = SystemTime::now();
        for (hello, why) in lost {
            self.publish(&hello, PresenceChange::Lost(why), now);
        }
        expired
    }

    pub fn is_connected(&self, name: &AgentName) -> bool {
        self.lock()
            .agents
            .get(name)
            .is_some_and(|e| e.conn.is_some())
    }

    pub fn list(&self) -> Vec<AgentStatus> {
        self.lock()
            .agents
            .values()
            .map(|e| AgentStatus {
                name: e.hello.name.clone(),
                role: e.hello.role.clone(),
                environment: e.hello.environment.clone(),
                capabilities: e.hello.capabilities.clone(),
                version: e.hello.version.clone(),
                availability: if e.conn.is_some() {
                    Availability::Connected
                } else {
                    Availability::Unavailable
                },
                ready: e.conn.is_some() && e.ready,
                detail: e.detail.clone(),
                last_heartbeat_unix_ms: to_unix_ms(e.last_heartbeat_at),
                connected_since_unix_ms: to_unix_ms(e.connected_since),
                peer_address: e.peer.map(|p| p.to_string()).unwrap_or_default(),
                clock_offset_ms: e.clock_offset_ms,
            })
            .collect()
    }

    pub fn connected_count(&self) -> usize {
        self.lock()
            .agents
            .values()
            .filter(|e| e.conn.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::model::{Environment, Epoch, Outcome, Role};

    fn hello(name: &str) -> Hello {
        Hello {
            name: AgentName::parse(name).expect("name"),
            role: Role::parse("web").expect("role"),
            environment: Environment::parse("dev").expect("env"),
            capabilities: vec![],
            version: "0.1.0".into(),
            highest_epoch: None,
        }
    }

    fn result(id: &str) -> CommandResult {
        CommandResult {
            command_id: CommandId::parse(id).expect("id"),
            epoch: Epoch::new(1).expect("epoch"),
            outcome: Outcome::Succeeded,
            message: String::new(),
            replayed: false,
            started: SystemTime::now(),
            finished: SystemTime::now(),
            detail: None,
        }
    }

    #[test]
    fn a_stale_connection_cannot_detach_or_answer_for_a_newer_one() {
        let registry = Registry::new();
        let name = AgentName::parse("web-1").expect("name");
        let (tx1, _rx1) = mpsc::channel(4);
        let old = registry.attach(hello("web-1"), None, tx1);
        let (tx2, _rx2) = mpsc::channel(4);
        let new = registry.attach(hello("web-1"), None, tx2);

        let (wtx, mut wrx) = oneshot::channel();
        let id = CommandId::parse("c1").expect("id");
        registry
            .send(
                &name,
                CoordinatorMessage::Command(dummy_command()),
                Some((id, wtx)),
            )
            .expect("send");
        registry.deliver(&name, old, result("c1"));
        assert!(wrx.try_recv().is_err(), "old connection must not answer");
        registry.detach(&name, old, "old stream ended");
        assert!(registry.is_connected(&name));
        registry.deliver(&name, new, result("c1"));
        assert_eq!(wrx.try_recv().expect("answered").command_id.as_str(), "c1");
        registry.detach(&name, new, "stream ended");
        assert!(!registry.is_connected(&name));
        assert_eq!(registry.list()[0].availability, Availability::Unavailable);
    }

    #[test]
    fn agents_lost_and_back_are_published_but_a_first_attach_is_not() {
        let registry = Registry::new();
        let mut presence = registry.subscribe_presence();
        let name = AgentName::parse("web-1").expect("name");
        let (tx, _rx) = mpsc::channel(4);
        let first = registry.attach(hello("web-1"), None, tx);
        assert!(presence.try_recv().is_err(), "a first attach is no return");
        registry.detach(&name, first, "stream lost: reset");
        let lost = presence.try_recv().expect("lost");
        assert_eq!(
            (lost.agent.as_str(), lost.environment.as_str(), lost.change),
            (
                "web-1",
                "dev",
                PresenceChange::Lost("stream lost: reset".into())
            )
        );
        // A stale connection's end is not news.
        registry.detach(&name, first, "again");
        assert!(presence.try_recv().is_err());
        let (tx, _rx2) = mpsc::channel(4);
        let second = registry.attach(hello("web-1"), None, tx);
        assert_eq!(
            presence.try_recv().expect("back").change,
            PresenceChange::Back { replaced: false }
        );
        // Attached again while the old stream still looked open: back, replacing it.
        let (tx, _rx3) = mpsc::channel(4);
        registry.attach(hello("web-1"), None, tx);
        assert_eq!(
            presence.try_recv().expect("back").change,
            PresenceChange::Back { replaced: true }
        );
        registry.detach(&name, second, "replaced stream ended");
        assert!(presence.try_recv().is_err());
        assert_eq!(registry.expire(Duration::ZERO), vec![name]);
        assert!(matches!(
            presence.try_recv().expect("expired").change,
            PresenceChange::Lost(why) if why.starts_with("no heartbeat")
        ));
    }

    #[test]
    fn heartbeats_give_each_agents_clock_offset() {
        let registry = Registry::new();
        let (tx, _rx) = mpsc::channel(4);
        let g = registry.attach(hello("w-1"), None, tx);
        let name = AgentName::parse("w-1").expect("name");
        assert_eq!(registry.list()[0].clock_offset_ms, None, "not known yet");
        let beat = |sent_at| Heartbeat {
            ready: true,
            detail: "ok".into(),
            sent_at,
        };
        registry.heartbeat(
            &name,
            g,
            beat(Some(SystemTime::now() + Duration::from_secs(600))),
        );
        let offset = registry.list()[0].clock_offset_ms.expect("offset");
        assert!((599_000..=600_000).contains(&offset), "{offset}");
        registry.heartbeat(
            &name,
            g,
            beat(Some(SystemTime::now() - Duration::from_secs(90))),
        );
        let offset = registry.list()[0].clock_offset_ms.expect("offset");
        assert!((-91_000..=-90_000).contains(&offset), "{offset}");
        // An older agent's heartbeat (no clock) keeps the last estimate.
        registry.heartbeat(&name, g, beat(None));
        assert!(registry.list()[0].clock_offset_ms.is_some());
    }

    #[test]
    fn silent_agents_expire_and_heartbeats_keep_them() {
        let registry = Registry::new();
        let (tx, _rx) = mpsc::channel(4);
        let g = registry.attach(hello("w-1"), None, tx);
        let name = AgentName::parse("w-1").expect("name");
        registry.heartbeat(
            &name,
            g,
            Heartbeat {
                ready: true,
                detail: "ok".into(),
                sent_at: None,
            },
        );
        assert!(registry.expire(Duration::from_secs(60)).is_empty());
        assert!(registry.list()[0].ready);
        assert_eq!(registry.expire(Duration::ZERO), vec![name.clone()]);
        let status = &registry.list()[0];
        assert_eq!(status.availability, Availability::Unavailable);
        assert!(!status.ready);
        assert_eq!(
            registry.send(&name, CoordinatorMessage::Command(dummy_command()), None),
            Err(SendError::NotConnected)
        );
    }

    fn dummy_command() -> api::model::Command {
        api::model::Command {
            id: CommandId::parse("c1").expect("id"),
            epoch: Epoch::new(1).expect("epoch"),
            run_id: String::new(),
            time_limit: Duration::from_secs(1),
            trace_context: Default::default(),
            action: api::model::Action::Describe,
        }
    }
}
