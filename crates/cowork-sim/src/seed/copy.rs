//! The seed's bulk rows as PostgreSQL `COPY` text: a chunk of sessions holds one buffer per
//! table, and is streamed into its tables parents first.

use anyhow::{Context, Result};

use crate::Profile;
use bytes::Bytes;

use crate::store::DeliveryCounts;

/// One chunk of sessions rendered as COPY text (tab-separated, `\N` for NULL).
#[derive(Default)]
pub(super) struct Chunk {
    pub(super) sessions_copy: Vec<u8>,
    pub(super) events_copy: Vec<u8>,
    pub(super) projections_copy: Vec<u8>,
    pub(super) commands_copy: Vec<u8>,
    pub(super) leases_copy: Vec<u8>,
    pub(super) artifacts_copy: Vec<u8>,
    pub(super) usage_copy: Vec<u8>,
    pub(super) cursors_copy: Vec<u8>,
    pub(super) deliveries_copy: Vec<u8>,
    pub(super) objects: Vec<(String, Bytes)>,
    pub(super) sessions: u64,
    pub(super) events: u64,
    pub(super) commands: u64,
    pub(super) bound_sessions: u64,
    pub(super) deliveries: DeliveryCounts,
}

impl Chunk {
    /// Streams the chunk into its tables, parents before children.
    pub(super) async fn copy_into(
        &self,
        conn: &mut sqlx::PgConnection,
        profile: Profile,
    ) -> Result<()> {
        let tables: [(&'static str, &Vec<u8>); 9] = [
            (
                "COPY {sessions} (id, tenant_id, account_id, title, status, next_event_sequence, \
                 created_at, updated_at) FROM STDIN",
                &self.sessions_copy,
            ),
            (
                "COPY {session_events} (session_id, sequence, kind, payload, created_at) FROM STDIN",
                &self.events_copy,
            ),
            (
                "COPY {session_projections} (session_id, sequence, view, updated_at) FROM STDIN",
                &self.projections_copy,
            ),
            (
                "COPY {session_commands} (id, session_id, kind, payload, status, claimed_by, \
                 attempt_count, created_at, updated_at) FROM STDIN",
                &self.commands_copy,
            ),
            (
                "COPY {worker_leases} (session_id, worker_id, lease_token, expires_at, \
                 checkpoint_version) FROM STDIN",
                &self.leases_copy,
            ),
            (
                "COPY {artifact_index} (id, tenant_id, session_id, kind, object_key, size_bytes, \
                 sha256, content_type, created_at) FROM STDIN",
                &self.artifacts_copy,
            ),
            (
                "COPY {usage_events} (tenant_id, session_id, kind, quantity) FROM STDIN",
                &self.usage_copy,
            ),
            (
                "COPY {channel_session_bindings} (binding_id, session_id, last_event_sequence) \
                 FROM STDIN",
                &self.cursors_copy,
            ),
            (
                "COPY {channel_deliveries} (public_delivery_id, binding_id, session_id, \
                 event_sequence, payload, status, attempt_count, next_attempt_at, claimed_by, \
                 claim_expires_at, last_error, sent_at) FROM STDIN",
                &self.deliveries_copy,
            ),
        ];
        for (statement, data) in tables {
            if data.is_empty() {
                continue;
            }
            let statement = profile.sql(statement);
            let table = statement.split_whitespace().nth(1).unwrap_or("?");
            let mut copy = conn
                .copy_in_raw(statement)
                .await
                .with_context(|| format!("start copying into {table}"))?;
            copy.send(data.as_slice())
                .await
                .with_context(|| format!("copy rows into {table}"))?;
            copy.finish()
                .await
                .with_context(|| format!("finish copying into {table}"))?;
        }
        Ok(())
    }
}

/// One row of COPY text being written.
pub(super) struct Row<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Row<'a> {
    pub(super) fn new(buf: &'a mut Vec<u8>) -> Row<'a> {
        Row { buf, first: true }
    }

    fn sep(&mut self) {
        if !self.first {
            self.buf.push(b'\t');
        }
        self.first = false;
    }

    pub(super) fn text(mut self, s: &str) -> Row<'a> {
        self.sep();
        for &b in s.as_bytes() {
            match b {
                b'\\' => self.buf.extend_from_slice(b"\\\\"),
                b'\t' => self.buf.extend_from_slice(b"\\t"),
                b'\n' => self.buf.extend_from_slice(b"\\n"),
                b'\r' => self.buf.extend_from_slice(b"\\r"),
                _ => self.buf.push(b),
            }
        }
        self
    }

    pub(super) fn int(mut self, n: i64) -> Row<'a> {
        self.sep();
        self.buf.extend_from_slice(n.to_string().as_bytes());
        self
    }

    pub(super) fn opt(mut self, s: Option<&str>) -> Row<'a> {
        match s {
            Some(s) => self.text(s),
            None => {
                self.sep();
                self.buf.extend_from_slice(b"\\N");
                self
            }
        }
    }

    pub(super) fn end(self) {
        self.buf.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_and_nulls() {
        let mut buf = Vec::new();
        Row::new(&mut buf)
            .text("a\tb\\c\nd")
            .int(-4)
            .opt(None)
            .opt(Some("x"))
            .end();
        assert_eq!(buf, b"a\\tb\\\\c\\nd\t-4\t\\N\tx\n");
    }
}
