//! A database copied from another server into a swap's restore copy: `pg_dump` of the source
//! piped straight into `pg_restore` of `<db>_restore_<tag>`, both counted, the copy marked
//! prepared. A managed provider's point-in-time restore lands in a new instance; this brings
//! that instance's database next to the live one, so the logical swap ([`commit_swap_marked`])
//! puts it in place with every guarantee the swap of a point has.
//!
//! [`commit_swap_marked`]: super::swap::commit_swap_marked

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::Connection as _;
use tokio::process::Command;

use super::catalog::{count_rows, count_specs};
use super::conn::{DbUrl, collect_stderr, connect, last_lines, pick_tool, tool_candidates};
use super::swap::{DatabaseSwap, SwapState};
use super::{CountSelection, CountSpec};

/// How [`copy_into_swap`] reaches the tools and the servers.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Directory of `pg_dump` / `pg_restore`; PATH and `/usr/lib/postgresql/*/bin` when unset.
    pub bin_dir: Option<PathBuf>,
    pub connect_timeout: Duration,
}

/// What [`copy_into_swap`] left in the restore copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// The copy's counts, each equal to the source's.
    pub counts: BTreeMap<String, i64>,
    /// The source server's version, as it says it.
    pub source_version: String,
}

/// Copies the database of `source_url` into the swap's restore copy (`<db>_restore_<tag>`,
/// created empty; an unfinished one of an earlier attempt dropped first), checks that the copy
/// counts what the source counts (`selection` on the source), and marks it prepared with
/// `mark` for [`super::swap::commit_swap_marked`]. Nothing live changes: a failure leaves at
/// most the unmarked restore copy, which the next attempt drops and `kept` lists.
pub async fn copy_into_swap(
    swap: &mut DatabaseSwap,
    source_url: &str,
    mark: &str,
    selection: &CountSelection,
    options: &CopyOptions,
) -> Result<Copied> {
    let names = swap.names().clone();
    let stale_restore = match swap.state().await? {
        SwapState::Swapped | SwapState::Interrupted => bail!(
            "a restore was already swapped in under this tag ({} holds the database it \
             replaced): there is nothing left to prepare",
            names.pre
        ),
        SwapState::NoLive => bail!(
            "the live database {} does not exist (and no swap of this tag is under way); check \
             the database URL — refusing to guess",
            names.live
        ),
        SwapState::Fresh { stale_restore } => stale_restore,
    };
    let source = DbUrl::parse(source_url)?;
    let mut conn = connect(&source, options.connect_timeout).await?;
    let (major, source_version): (i32, String) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int / 10000, \
         current_setting('server_version')",
    )
    .fetch_one(&mut conn)
    .await
    .with_context(|| format!("read the server version of {}", source.display))?;
    let mut specs = count_specs(&mut conn, selection)
        .await
        .with_context(|| format!("list the tables to count in {}", source.display))?;
    // A listed table the source does not have (created after the time it was restored to)
    // is not counted: the copy holds what the source holds.
    let missing = crate::postgres::catalog::missing_tables(&mut conn, &specs)
        .await
        .with_context(|| format!("look up the tables to count in {}", source.display))?;
    specs.retain(|s| !missing.contains(&s.table));
    let _ = conn.close().await;

    let min_major = u32::try_from(major).unwrap_or(0);
    let dump_tools = tool_candidates("pg_dump", options.bin_dir.as_deref())?;
    let (pg_dump, _) = pick_tool(&dump_tools, "pg_dump", min_major).await?;
    let restore_tools = tool_candidates("pg_restore", options.bin_dir.as_deref())?;
    let (pg_restore, _) = pick_tool(&restore_tools, "pg_restore", min_major).await?;

    let target_url = swap.create_restore_target(stale_restore).await?;
    let target = DbUrl::parse(&target_url)?;
    let mut dump = Command::new(&pg_dump);
    dump.args(["--format=custom", "--no-owner", "--no-acl", "--compress=0"])
        .arg(format!("--dbname={}", source.without_password))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    source.apply_password(&mut dump);
    let mut dumper = dump.spawn().context("start pg_dump")?;
    let dumped = dumper
        .stdout
        .take()
        .context("open pg_dump's output")?
        .into_owned_fd()
        .context("open pg_dump's output")?;
    let dump_err = collect_stderr(dumper.stderr.take());
    let mut restore = Command::new(&pg_restore);
    restore
        .args([
            "--no-owner",
            "--no-acl",
            "--exit-on-error",
            "--single-transaction",
        ])
        .arg(format!("--dbname={}", target.without_password))
        .stdin(Stdio::from(dumped))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    target.apply_password(&mut restore);
    let mut restorer = restore.spawn().context("start pg_restore")?;
    let restore_err = collect_stderr(restorer.stderr.take());
    let (dumped, restored) = tokio::join!(dumper.wait(), restorer.wait());
    let dumped = dumped.context("wait for pg_dump")?;
    let restored = restored.context("wait for pg_restore")?;
    let (dump_err, restore_err) = (
        dump_err.await.unwrap_or_default(),
        restore_err.await.unwrap_or_default(),
    );
    if !dumped.success() {
        bail!(
            "pg_dump of {} failed ({dumped}): {}; nothing live was changed ({} is left \
             unfinished)",
            source.display,
            last_lines(&dump_err, 5),
            names.restore
        );
    }
    if !restored.success() {
        bail!(
            "pg_restore into {} failed ({restored}): {}; nothing live was changed",
            names.restore,
            last_lines(&restore_err, 5)
        );
    }

    let counts = count_both(&source, &target, &specs, options.connect_timeout).await?;
    let (at_source, copied) = counts;
    let wrong: Vec<String> = at_source
        .iter()
        .filter(|(key, want)| copied.get(*key) != Some(*want))
        .map(|(key, want)| {
            format!(
                "{key} has {} rows, the source {want}",
                copied.get(key).copied().unwrap_or(0)
            )
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "the copy in {} does not match {}: {}; nothing live was changed",
            names.restore,
            source.display,
            wrong.join(", ")
        );
    }
    swap.mark_prepared(mark).await?;
    Ok(Copied {
        counts: copied,
        source_version,
    })
}

async fn count_both(
    source: &DbUrl,
    target: &DbUrl,
    specs: &[CountSpec],
    timeout: Duration,
) -> Result<(BTreeMap<String, i64>, BTreeMap<String, i64>)> {
    let mut counted = Vec::new();
    for db in [source, target] {
        let mut conn = connect(db, timeout).await?;
        let counts = count_rows(&mut conn, specs)
            .await
            .with_context(|| format!("count the rows of {}", db.display))?;
        let _ = conn.close().await;
        counted.push(counts);
    }
    let copied = counted.pop().unwrap_or_default();
    let at_source = counted.pop().unwrap_or_default();
    Ok((at_source, copied))
}
