//! The data directories restores to a time kept beside the live one (see [`super::swap`]):
//! `DIR.pre_<tag>` (the directory a swap replaced) and what a prepare left that was never
//! swapped in (`DIR.restore_<tag>`, and `.DIR.restore_<tag>.rollcall-partial` of a prepare
//! killed while it unpacked or recovered). Listed like the kept databases, with their sizes,
//! and removed when an operator's prune chose one.
//!
//! As for databases, which copies may go is the coordinator's decision; this side refuses what
//! is never safe on the host itself: a path that is not a kept directory of the live one, any
//! removal while the live directory is not a data directory or a swap's marker is there (the
//! agent puts a previous directory back from `DIR.pre_<tag>` when it restarts), and a
//! directory a server may run from (`postmaster.pid`).

use std::path::{Path as FsPath, PathBuf};

use anyhow::{Context, Result, bail};

use super::swap::SwapDirs;
use crate::layout::is_run_tag;
use crate::postgres::kept::{KeptDatabase, KeptKind};

/// The kind and tag of `path` when it is a kept directory of the live data directory `live`.
pub fn kept_dir_name(live: &FsPath, path: &FsPath) -> Option<(KeptKind, String)> {
    let parent = live.parent()?;
    if path.parent()? != parent {
        return None;
    }
    let base = live.file_name()?.to_str()?;
    let name = path.file_name()?.to_str()?;
    let (kind, tag) = if let Some(rest) = name.strip_prefix(base) {
        if let Some(tag) = rest.strip_prefix(".pre_") {
            (KeptKind::DataDirPre, tag)
        } else if let Some(tag) = rest.strip_prefix(".restore_") {
            (KeptKind::DataDirPrepared, tag)
        } else {
            return None;
        }
    } else {
        let tag = name
            .strip_prefix('.')?
            .strip_prefix(base)?
            .strip_prefix(".restore_")?
            .strip_suffix(".rollcall-partial")?;
        (KeptKind::DataDirPrepared, tag)
    };
    is_run_tag(tag).then(|| (kind, tag.to_owned()))
}

/// The kept directories beside `live`, by name (the whole path), with their sizes (files'
/// bytes).
pub async fn list_kept_data_dirs(live: &FsPath) -> Result<Vec<KeptDatabase>> {
    let live = live.to_path_buf();
    tokio::task::spawn_blocking(move || list_blocking(&live))
        .await
        .context("the kept data directories' listing task")?
}

fn list_blocking(live: &FsPath) -> Result<Vec<KeptDatabase>> {
    let parent = live
        .parent()
        .with_context(|| format!("data_dir {} has no parent directory", live.display()))?;
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(parent).with_context(|| format!("read {}", parent.display()))? {
        let path = entry
            .with_context(|| format!("read {}", parent.display()))?
            .path();
        let Some((kind, tag)) = kept_dir_name(live, &path) else {
            continue;
        };
        if !path.is_dir() {
            continue;
        }
        kept.push(KeptDatabase {
            name: path.display().to_string(),
            kind,
            tag,
            bytes: tree_bytes(&path),
            // A server running from one is the removal's refusal to name (postmaster.pid).
            sessions: 0,
        });
    }
    kept.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(kept)
}

/// The bytes of the regular files under `dir` (what removing it frees); unreadable parts
/// count nothing.
fn tree_bytes(dir: &FsPath) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    total
}

/// Removes the kept directory `path` of the live data directory `live` (see the module doc
/// for what it refuses). A directory already gone is not an error: a prune re-sent finds it
/// gone. Returns false when there was nothing to remove.
pub async fn drop_kept_data_dir(live: &FsPath, path: &FsPath) -> Result<bool> {
    let (live, path) = (live.to_path_buf(), path.to_path_buf());
    tokio::task::spawn_blocking(move || drop_blocking(&live, &path))
        .await
        .context("the kept data directory's removal task")?
}

fn drop_blocking(live: &FsPath, path: &FsPath) -> Result<bool> {
    let Some((kind, tag)) = kept_dir_name(live, path) else {
        bail!(
            "{} is not a directory a restore of {} kept (DIR.pre_<tag>, DIR.restore_<tag>): \
             refused",
            path.display(),
            live.display()
        );
    };
    let probe = SwapDirs::new(live, &tag);
    if probe.marker.exists() {
        bail!(
            "a data directory swap's marker {} is there: the agent finishes or takes back that \
             swap when it starts, from these directories; nothing removed",
            probe.marker.display()
        );
    }
    if !live.join("PG_VERSION").is_file() {
        bail!(
            "the live data directory {} is not a data directory right now (no PG_VERSION): a \
             kept directory may be the only copy; nothing removed",
            live.display()
        );
    }
    if !path.exists() {
        return Ok(false);
    }
    if path.join("postmaster.pid").exists() {
        bail!(
            "{} has a postmaster.pid: a server may run from it; stop that server (or remove \
             a stale postmaster.pid) and prune again",
            path.display()
        );
    }
    std::fs::remove_dir_all(path).with_context(|| {
        format!(
            "remove {} (a prune again removes what is left)",
            path.display()
        )
    })?;
    if kind == KeptKind::DataDirPrepared {
        // What a prepare recorded beside the directory it recovered.
        let mut record = path.as_os_str().to_owned();
        record.push(".rollcall.json");
        let _ = std::fs::remove_file(PathBuf::from(record));
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn kept_directories_are_named_beside_the_live_one_with_a_run_tag() {
        let live = FsPath::new("/srv/pg/data");
        let named = |p: &str| kept_dir_name(live, FsPath::new(p));
        assert_eq!(
            named("/srv/pg/data.pre_r0123abcd"),
            Some((KeptKind::DataDirPre, "r0123abcd".into()))
        );
        assert_eq!(
            named("/srv/pg/data.restore_r0123abcd"),
            Some((KeptKind::DataDirPrepared, "r0123abcd".into()))
        );
        assert_eq!(
            named("/srv/pg/.data.restore_r0123abcd.rollcall-partial"),
            Some((KeptKind::DataDirPrepared, "r0123abcd".into()))
        );
        for not in [
            "/srv/pg/data",
            "/srv/other/data.pre_r0123abcd",
            "/srv/pg/data.pre_r0123abcd/base",
            "/srv/pg/data.pre_nottag",
            "/srv/pg/data.restore_r0123abcd.rollcall.json",
            "/srv/pg/data2.pre_r0123abcd",
            "/srv/pg/data.rollcall-swap",
        ] {
            assert_eq!(named(not), None, "{not}");
        }
    }

    fn data_dir(path: &FsPath) {
        std::fs::create_dir_all(path.join("base")).unwrap();
        std::fs::write(path.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(path.join("base/1"), vec![0u8; 1000]).unwrap();
    }

    #[tokio::test]
    async fn kept_directories_list_with_sizes_and_go_only_when_nothing_may_need_them() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("data");
        data_dir(&live);
        let pre = tmp.path().join("data.pre_r00000001");
        data_dir(&pre);
        let prepared = tmp.path().join("data.restore_r00000002");
        data_dir(&prepared);
        std::fs::write(
            tmp.path().join("data.restore_r00000002.rollcall.json"),
            "{}",
        )
        .unwrap();
        std::fs::create_dir(tmp.path().join("data.pre_other")).unwrap();

        let listed = list_kept_data_dirs(&live).await.unwrap();
        let shown: Vec<(&str, KeptKind, u64)> = listed
            .iter()
            .map(|k| (k.tag.as_str(), k.kind, k.bytes))
            .collect();
        assert_eq!(
            shown,
            [
                ("r00000001", KeptKind::DataDirPre, 1003),
                ("r00000002", KeptKind::DataDirPrepared, 1003)
            ]
        );

        // Never the live directory, nor anything that is not a kept name.
        let err = drop_kept_data_dir(&live, &live).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("is not a directory a restore"),
            "{err:#}"
        );
        // A swap under way: refused.
        let marker = tmp.path().join("data.rollcall-swap");
        std::fs::write(&marker, "{}").unwrap();
        let err = drop_kept_data_dir(&live, &pre).await.unwrap_err();
        assert!(format!("{err:#}").contains("swap's marker"), "{err:#}");
        std::fs::remove_file(&marker).unwrap();
        // A server may run from it: refused.
        std::fs::write(pre.join("postmaster.pid"), "123").unwrap();
        let err = drop_kept_data_dir(&live, &pre).await.unwrap_err();
        assert!(format!("{err:#}").contains("postmaster.pid"), "{err:#}");
        std::fs::remove_file(pre.join("postmaster.pid")).unwrap();
        // The live directory missing (a swap between its renames): refused.
        std::fs::rename(&live, tmp.path().join("aside")).unwrap();
        let err = drop_kept_data_dir(&live, &pre).await.unwrap_err();
        assert!(format!("{err:#}").contains("no PG_VERSION"), "{err:#}");
        std::fs::rename(tmp.path().join("aside"), &live).unwrap();

        assert!(drop_kept_data_dir(&live, &pre).await.unwrap());
        assert!(!pre.exists());
        assert!(
            !drop_kept_data_dir(&live, &pre).await.unwrap(),
            "already gone"
        );
        assert!(drop_kept_data_dir(&live, &prepared).await.unwrap());
        assert!(
            !tmp.path()
                .join("data.restore_r00000002.rollcall.json")
                .exists(),
            "the prepare's record goes with it"
        );
        assert!(live.join("base/1").exists(), "the live directory untouched");
        assert!(list_kept_data_dirs(&live).await.unwrap().is_empty());
    }
}
