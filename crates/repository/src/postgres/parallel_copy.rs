//! Loading one data archive through several connections at once.
//!
//! pg_restore loads a table with one `COPY`, so one large table keeps one backend (one core)
//! busy while the others have nothing left to do: `pg_restore -j` spreads tables over jobs,
//! never the rows of one table. Here pg_restore only turns the archive into its SQL script
//! (`--file=-`, no database connection); the rows of each `COPY ... FROM stdin` block are
//! dealt, in chunks of whole lines, to the same `COPY` running on several connections, each
//! taking the next chunk when it has sent its last. In COPY's text format a row is one line
//! (newlines inside values are escaped), so any split at line ends loads the same rows.
//!
//! The other statements of a data archive (session settings first, then the values of the
//! table's sequences) are run as they come: the settings before the first `COPY` on every
//! connection, anything later on the first one only.

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use tokio::io::{AsyncRead, AsyncReadExt};

/// What to do about a script this loader cannot run.
pub(crate) const ONE_COPY: &str = "restore with one COPY per table (copy_streams = 1 in the \
     database agent's [postgres] table; --copy-streams 1 for `rollcall repo restore-postgres`)";

/// Bytes of rows handed to one connection at a time.
pub(crate) const CHUNK: usize = 256 * 1024;

/// How much of the script is read from the pipe at once.
const READ_SIZE: usize = 1024 * 1024;

/// The end of a COPY block's rows: a line holding `\.` (a value starting with a backslash is
/// escaped in COPY text, so no row is this line).
const END_OF_ROWS: &[u8] = b"\\.\n";

/// The statements up to the next `COPY` (possibly none), and that `COPY`'s statement (`None`
/// at the end of the script).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Statements {
    pub(crate) sql: String,
    pub(crate) copy: Option<String>,
}

/// Reads a plain-format script as `pg_restore --file=-` writes it: statements, and after each
/// `COPY ... FROM stdin;` line the rows up to the `\.` line.
pub(crate) struct ScriptReader<R> {
    reader: R,
    buf: BytesMut,
    eof: bool,
    /// Between a `COPY` line and its `\.` line.
    in_rows: bool,
    /// Bytes of script read so far.
    read: u64,
    /// Bytes at the start of the buffer known not to hold the end of the current rows.
    scanned: usize,
}

impl<R: AsyncRead + Unpin> ScriptReader<R> {
    pub(crate) fn new(reader: R) -> ScriptReader<R> {
        ScriptReader {
            reader,
            buf: BytesMut::with_capacity(READ_SIZE),
            eof: false,
            in_rows: false,
            read: 0,
            scanned: 0,
        }
    }

    /// Bytes of script read so far.
    pub(crate) fn consumed(&self) -> u64 {
        self.read
    }

    /// Reads more of the script; false at its end.
    async fn fill(&mut self) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        self.buf.reserve(READ_SIZE);
        let n = self
            .reader
            .read_buf(&mut self.buf)
            .await
            .context("read the SQL script pg_restore writes")?;
        if n == 0 {
            self.eof = true;
        }
        self.read += n as u64;
        Ok(n > 0)
    }

    /// The statements up to the next `COPY ... FROM stdin;` line and that statement (without
    /// its `;`), after which [`ScriptReader::next_rows`] yields its rows; `None` at the end.
    pub(crate) async fn next_statements(&mut self) -> Result<Option<Statements>> {
        if self.in_rows {
            bail!("the statements after a COPY were asked for before all its rows were read");
        }
        let mut sql = Vec::new();
        loop {
            let Some(end) = memchr::memchr(b'\n', &self.buf) else {
                if self.fill().await? {
                    continue;
                }
                // A last line without a newline still counts.
                sql.extend_from_slice(&self.buf.split());
                return if sql.is_empty() {
                    Ok(None)
                } else {
                    Ok(Some(Statements {
                        sql: utf8(sql)?,
                        copy: None,
                    }))
                };
            };
            let line = self.buf.split_to(end + 1);
            if line.starts_with(b"\\") {
                // A psql command. pg_restore (15.14 and later) brackets its script with
                // `\restrict KEY` / `\unrestrict KEY`, which stop psql from running commands
                // smuggled into the data; nothing here runs psql commands, so they are skipped.
                // Any other one means a script this loader does not know.
                if line.starts_with(b"\\restrict") || line.starts_with(b"\\unrestrict") {
                    continue;
                }
                bail!(
                    "the SQL script of the archive holds the psql command {:?}, which loading \
                     over several connections does not run: {ONE_COPY}",
                    String::from_utf8_lossy(line.trim_ascii_end())
                );
            }
            if let Some(statement) = copy_statement(&line) {
                self.in_rows = true;
                return Ok(Some(Statements {
                    sql: utf8(sql)?,
                    copy: Some(utf8(statement.to_vec())?),
                }));
            }
            sql.extend_from_slice(&line);
        }
    }

    /// The next chunk of the current `COPY`'s rows: whole lines, `max` bytes or a little less
    /// (fewer only at the end of the rows; more only for one line longer than `max`). `None`
    /// once its `\.` line is read (and again until the next `COPY`).
    pub(crate) async fn next_rows(&mut self, max: usize) -> Result<Option<Bytes>> {
        if !self.in_rows {
            return Ok(None);
        }
        let max = max.max(1);
        loop {
            // The buffer starts at a line start here.
            if self.buf.starts_with(END_OF_ROWS) {
                let _ = self.buf.split_to(END_OF_ROWS.len());
                self.scanned = 0;
                self.in_rows = false;
                return Ok(None);
            }
            // Where the rows end, if the `\.` line has arrived (searching only what has not
            // been searched yet, and the 3 bytes before it that could start the marker).
            let from = self.scanned.saturating_sub(3);
            let rows_end = match memchr::memmem::find(&self.buf[from..], b"\n\\.\n") {
                Some(at) => Some(from + at + 1),
                None => {
                    self.scanned = self.buf.len();
                    None
                }
            };
            let limit = match rows_end {
                Some(end) => end.min(max),
                None if self.buf.len() >= max => max,
                None => {
                    if self.fill().await? {
                        continue;
                    }
                    bail!(
                        "the SQL script of the archive ends inside the rows of a COPY: \
                         pg_restore stopped early or the archive is damaged"
                    );
                }
            };
            let cut = match memchr::memrchr(b'\n', &self.buf[..limit]) {
                Some(at) => Some(at + 1),
                // One line longer than `max`: take it whole, once it is all here.
                None => memchr::memchr(b'\n', &self.buf).map(|at| at + 1),
            };
            match cut {
                Some(cut) => {
                    self.scanned = self.scanned.saturating_sub(cut);
                    return Ok(Some(self.buf.split_to(cut).freeze()));
                }
                None => {
                    if !self.fill().await? {
                        bail!(
                            "the SQL script of the archive ends inside the rows of a COPY: \
                             pg_restore stopped early or the archive is damaged"
                        );
                    }
                }
            }
        }
    }
}

/// `COPY public.t (a, b) FROM stdin` from its line in a script.
fn copy_statement(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    (line.starts_with(b"COPY ") && line.ends_with(b" FROM stdin;")).then(|| &line[..line.len() - 1])
}

fn utf8(bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("the SQL script of the archive is not UTF-8 ({e}): {ONE_COPY}")
    })
}

/// Whether a stretch of script holds anything but comments and blank lines.
fn has_statements(sql: &str) -> bool {
    sql.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with("--")
    })
}

/// More connections for a load that is already running, as job slots free up.
pub(crate) struct Joining<'a> {
    /// Job slots other work has finished with; a connection that joins takes one for good
    /// (the caller gives back [`Loaded::joined`] when the load is over).
    pub(crate) slots: &'a tokio::sync::Semaphore,
    /// Opens one more connection to the target database.
    pub(crate) connect: &'a (dyn Fn() -> BoxFuture<'a, Result<PgConnection>> + Send + Sync),
    /// At most this many connections in all.
    pub(crate) max: usize,
    /// Bytes of script expected in all: a connection joins only while at least
    /// [`JOIN_MIN_LEFT`] of them are still to come.
    pub(crate) expected: u64,
}

/// What is left of a load for another connection to be worth opening.
pub(crate) const JOIN_MIN_LEFT: u64 = 16 * 1024 * 1024;

/// A finished load: its connections, each in a transaction still open.
pub(crate) struct Loaded {
    pub(crate) rows: u64,
    pub(crate) conns: Vec<PgConnection>,
    /// Connections that joined (each holding a job slot from [`Joining::slots`]).
    pub(crate) joined: u32,
    /// `COPY` statements run.
    pub(crate) copies: u32,
}

/// Runs a script on `conns`, each in a transaction left open (the caller commits them all, or
/// drops them to roll back), every `COPY` on all of them at once with its rows dealt out in
/// chunks of at most `chunk` bytes. With `joining`, more connections join while rows remain.
pub(crate) async fn load_script(
    script: impl AsyncRead + Unpin,
    mut conns: Vec<PgConnection>,
    chunk: usize,
    joining: Option<Joining<'_>>,
) -> Result<Loaded> {
    if conns.is_empty() {
        bail!("no connection to load the archive through");
    }
    for conn in &mut conns {
        sqlx::raw_sql("BEGIN")
            .execute(&mut *conn)
            .await
            .context("open a transaction")?;
    }
    let mut reader = ScriptReader::new(script);
    // The session settings before the first COPY, for connections that join later.
    let mut preamble: Option<String> = None;
    let mut loaded = Loaded {
        rows: 0,
        conns,
        joined: 0,
        copies: 0,
    };
    while let Some(Statements { sql, copy }) = reader.next_statements().await? {
        if has_statements(&sql) {
            // Session settings come before the first COPY and every connection needs them;
            // what follows (sequence values) must run once.
            let targets = if preamble.is_none() {
                &mut loaded.conns[..]
            } else {
                &mut loaded.conns[..1]
            };
            for conn in targets {
                run(conn, &sql).await?;
            }
        }
        let preamble = preamble.get_or_insert(sql);
        if let Some(statement) = copy {
            let conns = std::mem::take(&mut loaded.conns);
            let (rows, conns, joined) = copy_rows(
                &mut reader,
                conns,
                &statement,
                chunk,
                preamble,
                joining.as_ref(),
            )
            .await
            .with_context(|| format!("load the rows of {statement}"))?;
            loaded.rows += rows;
            loaded.conns = conns;
            loaded.joined += joined;
            loaded.copies += 1;
        }
    }
    Ok(loaded)
}

async fn run(conn: &mut PgConnection, sql: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(&mut *conn)
        .await
        .with_context(|| format!("run {}", first_statement(sql)))?;
    Ok(())
}

/// One COPY on every connection, fed from the shared reader until its rows end; connections
/// join as `joining` allows. Returns the rows, the connections and how many joined.
async fn copy_rows<R: AsyncRead + Unpin>(
    reader: &mut ScriptReader<R>,
    conns: Vec<PgConnection>,
    statement: &str,
    chunk: usize,
    preamble: &str,
    joining: Option<&Joining<'_>>,
) -> Result<(u64, Vec<PgConnection>, u32)> {
    let reader = &tokio::sync::Mutex::new(reader);
    let stream = |mut conn: PgConnection| async move {
        let mut copy = conn.copy_in_raw(statement).await?;
        loop {
            let rows = reader.lock().await.next_rows(chunk).await?;
            match rows {
                Some(rows) => {
                    copy.send(rows).await?;
                    // Take turns even while every socket still accepts all it is given, so
                    // that each backend starts loading at once, not when the first one's
                    // socket buffer is full.
                    tokio::task::yield_now().await;
                }
                None => break,
            }
        }
        let rows = copy.finish().await?;
        Ok::<_, anyhow::Error>((conn, rows))
    };
    let mut total = conns.len();
    let mut running: FuturesUnordered<_> = conns.into_iter().map(stream).collect();
    let (mut rows, mut done, mut joined) = (0, Vec::new(), 0);
    // One more connection, once a job slot is free and enough rows are left for it.
    let join = |total: usize| async move {
        let joining = joining?;
        if total >= joining.max {
            return None;
        }
        let permit = joining.slots.acquire().await.ok()?;
        let read = reader.lock().await.consumed();
        if joining.expected.saturating_sub(read) < JOIN_MIN_LEFT {
            return None;
        }
        let conn = async {
            let mut conn = (joining.connect)().await?;
            sqlx::raw_sql("BEGIN")
                .execute(&mut conn)
                .await
                .context("open a transaction")?;
            run(&mut conn, preamble).await?;
            Ok::<_, anyhow::Error>(conn)
        };
        Some(conn.await.map(|conn| (conn, permit)))
    };
    let mut joinable = joining.is_some();
    loop {
        tokio::select! {
            finished = running.next() => match finished {
                Some(finished) => {
                    let (conn, n) = finished?;
                    rows += n;
                    done.push(conn);
                }
                None => break,
            },
            extra = join(total), if joinable => match extra {
                Some(Err(e)) => return Err(e.context("open one more connection for the rows")),
                Some(Ok((conn, permit))) => {
                    permit.forget();
                    joined += 1;
                    total += 1;
                    running.push(stream(conn));
                }
                // Nothing more to gain from this COPY.
                None => joinable = false,
            },
        }
    }
    Ok((rows, done, joined))
}

/// The first statement of a stretch of script, for an error message.
fn first_statement(sql: &str) -> String {
    let line = sql
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("--"))
        .unwrap_or("");
    let mut shown: String = line.chars().take(120).collect();
    if shown.len() < line.len() {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    const SCRIPT: &str = "--\n-- PostgreSQL database dump\n--\n\n\\restrict K3y\n\n\
        SET client_encoding = 'UTF8';\n\
        SELECT pg_catalog.set_config('search_path', '', false);\n\n\
        --\n-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: -\n--\n\n\
        COPY public.t (id, note) FROM stdin;\n1\tone\n2\ttwo \\\\. not an end\n3\t\\.x\n\\.\n\n\n\
        --\n-- Data for Name: u; Type: TABLE DATA; Schema: public; Owner: -\n--\n\n\
        COPY public.u (id) FROM stdin;\n\\.\n\n\n\
        SELECT pg_catalog.setval('public.t_id_seq', 3, true);\n\n--\n-- done\n--\n\n\
        \\unrestrict K3y\n\n";

    /// Reads `script` through a reader that hands out `step` bytes at a time, taking rows in
    /// chunks of `max`.
    async fn read_all(
        script: &str,
        step: usize,
        max: usize,
    ) -> Vec<(String, Option<String>, Vec<String>)> {
        let (mut tx, rx) = tokio::io::duplex(step.max(1));
        let bytes = script.as_bytes().to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in bytes.chunks(step.max(1)) {
                tx.write_all(piece).await.expect("write");
            }
        });
        let mut reader = ScriptReader::new(rx);
        let mut out = Vec::new();
        while let Some(s) = reader.next_statements().await.expect("statements") {
            let mut chunks = Vec::new();
            while let Some(rows) = reader.next_rows(max).await.expect("rows") {
                assert!(
                    rows.ends_with(b"\n"),
                    "a chunk ends at a line end: {rows:?}"
                );
                chunks.push(String::from_utf8(rows.to_vec()).expect("utf8"));
            }
            out.push((s.sql, s.copy, chunks));
        }
        writer.await.expect("writer");
        out
    }

    #[tokio::test]
    async fn a_script_splits_into_statements_and_rows_wherever_the_reads_fall() {
        let whole = read_all(SCRIPT, 64 * 1024, CHUNK).await;
        assert_eq!(whole.len(), 3);
        assert!(whole[0].0.contains("SET client_encoding = 'UTF8';"));
        assert!(!whole[0].0.contains("restrict") && !whole[2].0.contains("restrict"));
        assert_eq!(
            whole[0].1.as_deref(),
            Some("COPY public.t (id, note) FROM stdin")
        );
        assert_eq!(
            whole[0].2.concat(),
            "1\tone\n2\ttwo \\\\. not an end\n3\t\\.x\n"
        );
        assert_eq!(whole[1].1.as_deref(), Some("COPY public.u (id) FROM stdin"));
        assert!(whole[1].2.is_empty(), "an empty table has no rows");
        assert!(whole[2].0.contains("setval"));
        assert_eq!(whole[2].1, None);
        // Any read size and any chunk size give the same statements and the same rows.
        for step in [1, 2, 3, 5, 7, 13, 64] {
            for max in [1, 4, 9, 16, 1024] {
                let got = read_all(SCRIPT, step, max).await;
                assert_eq!(got.len(), whole.len(), "step {step}, max {max}");
                for (g, w) in got.iter().zip(&whole) {
                    assert_eq!((&g.0, &g.1), (&w.0, &w.1), "step {step}, max {max}");
                    assert_eq!(g.2.concat(), w.2.concat(), "step {step}, max {max}");
                    // At most `max` bytes, or one line longer than that.
                    assert!(
                        g.2.iter()
                            .all(|c| c.len() <= max || c.find('\n') == Some(c.len() - 1)),
                        "step {step}, max {max}: {:?}",
                        g.2
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_script_cut_inside_rows_is_an_error() {
        let cut = "SET x = 1;\nCOPY public.t (id) FROM stdin;\n1\n2\n";
        let mut reader = ScriptReader::new(cut.as_bytes());
        let first = reader
            .next_statements()
            .await
            .expect("statements")
            .expect("some");
        assert!(first.copy.is_some());
        let mut err = None;
        for _ in 0..3 {
            match reader.next_rows(CHUNK).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a cut script must not end its rows cleanly"),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let err = format!("{:#}", err.expect("an error"));
        assert!(err.contains("ends inside the rows of a COPY"), "{err}");
    }

    #[test]
    fn only_a_whole_copy_from_stdin_line_starts_rows() {
        assert_eq!(
            copy_statement(b"COPY public.t (a) FROM stdin;\n"),
            Some(&b"COPY public.t (a) FROM stdin"[..])
        );
        assert_eq!(copy_statement(b"COPY public.t (a) FROM stdin;"), None);
        assert_eq!(copy_statement(b"-- COPY public.t (a) FROM stdin;\n"), None);
        assert!(!has_statements("--\n-- comment\n--\n\n"));
        assert!(has_statements("--\nSET x = 1;\n"));
        assert_eq!(
            first_statement("--\n\nSET a = 1;\nSET b = 2;\n"),
            "SET a = 1;"
        );
    }

    /// Awkward values (tabs, newlines, backslashes, a lone `\.`, NULLs, non-ASCII, bytea,
    /// jsonb, arrays) through a real pg_dump archive and pg_restore script, loaded by three
    /// connections (one joining on the way) in chunks of a few rows: the same rows arrive, and
    /// the sequence value too.
    #[tokio::test]
    async fn rows_dealt_over_connections_arrive_exactly() {
        let cluster = ephemeral_pg::Cluster::start().expect("start a throwaway Postgres");
        for db in ["app", "restored"] {
            cluster.create_database(db).expect("create database");
        }
        let schema = "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             note text, raw bytea, doc jsonb, tags text[], at timestamptz);";
        cluster.psql("app", schema).expect("schema");
        cluster.psql("restored", schema).expect("schema");
        cluster
            .psql(
                "app",
                "INSERT INTO t (note, raw, doc, tags, at) SELECT \
                   CASE g % 7 WHEN 0 THEN NULL WHEN 1 THEN E'tab\\there' \
                     WHEN 2 THEN E'line\\nbreak\\r\\n' WHEN 3 THEN E'\\\\.' \
                     WHEN 4 THEN E'back\\\\slash \\\\N' WHEN 5 THEN 'grüße ✓ ' || g \
                     ELSE repeat('x', g % 300) END, \
                   decode(md5(g::text), 'hex'), \
                   jsonb_build_object('g', g, 'q', E'\"quoted\"\\t'), \
                   ARRAY['a b', NULL, E'c\\\\d'], now() - g * interval '1 minute' \
                 FROM generate_series(1, 3000) g",
            )
            .expect("rows");
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("data.dump");
        let status = std::process::Command::new(cluster.bin_dir().join("pg_dump"))
            .arg(cluster.url("app"))
            .args([
                "--format=custom",
                "--compress=0",
                "--section=data",
                "--table=t",
            ])
            .arg(format!("--file={}", archive.display()))
            .status()
            .expect("pg_dump");
        assert!(status.success());
        let script = tokio::process::Command::new(cluster.bin_dir().join("pg_restore"))
            .args(["--no-owner", "--no-acl", "--file=-"])
            .arg(&archive)
            .output()
            .await
            .expect("pg_restore");
        assert!(script.status.success());

        let options: sqlx::postgres::PgConnectOptions =
            cluster.url("restored").parse().expect("url");
        // Two connections from the start, a third joining as soon as it may.
        let mut conns = Vec::new();
        for _ in 0..2 {
            conns.push(PgConnection::connect_with(&options).await.expect("connect"));
        }
        let slots = tokio::sync::Semaphore::new(5);
        let connect = || -> BoxFuture<'_, Result<PgConnection>> {
            Box::pin(async { Ok(PgConnection::connect_with(&options).await?) })
        };
        let joining = Joining {
            slots: &slots,
            connect: &connect,
            max: 3,
            expected: u64::MAX,
        };
        let mut loaded = load_script(&script.stdout[..], conns, 700, Some(joining))
            .await
            .expect("load");
        assert_eq!((loaded.rows, loaded.copies), (3000, 1));
        assert_eq!((loaded.joined, loaded.conns.len()), (1, 3));
        assert_eq!(
            slots.available_permits(),
            4,
            "the joined one holds its slot"
        );
        // Every connection took part (each sees its own rows until they commit).
        for conn in &mut loaded.conns {
            let mine: i64 = sqlx::query_scalar("SELECT count(*) FROM public.t")
                .fetch_one(&mut *conn)
                .await
                .expect("count");
            assert!(mine > 0 && mine < 3000, "{mine} rows on one connection");
        }
        for conn in &mut loaded.conns {
            sqlx::raw_sql("COMMIT")
                .execute(&mut *conn)
                .await
                .expect("commit");
        }
        let digest = "SELECT md5(string_agg(t::text, '|' ORDER BY id)), count(*), \
                      (SELECT last_value FROM t_id_seq) FROM t";
        assert_eq!(
            cluster.psql("restored", digest).expect("digest"),
            cluster.psql("app", digest).expect("digest")
        );
    }
}
