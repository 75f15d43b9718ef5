//! Rollcall's backup repository: recovery points on any `object_store` URL.
//!
//! A recovery point pairs a Postgres dump (with table counts taken in the dump's own
//! snapshot), an object-store snapshot (a manifest over content-addressed blobs) and the
//! environment's secret references. The data plane is here; the agents and the break-glass
//! CLI call it.
//!
//! ```text
//! let repo = Repository::open("s3://backups/cowork", RepositoryOptions::default()).await?;
//! let id = PointId::new("private-beta", Utc::now())?;
//! let pg = backup_postgres(&repo, &PgBackupOptions::new(id.clone(), db_url)).await?;
//! let objects = snapshot_objects(&repo, live_store, &SnapshotOptions::new(live_url), None).await?;
//! let point = repo.write_point(NewPoint { id, postgres: Some(pg), objects: Some(objects), secrets }).await?;
//! repo.verify_point(&point.id, false).await?;
//! ```

mod body;
mod cipher;
mod kept;
mod layout;
mod lock;
mod object_key;
mod objects_at;
mod pipe;
mod point;
mod postgres;
mod prune;
mod redact;
mod repo;
mod restore;
mod scratch;
mod sealed;
mod secrets;
mod sequence;
mod snapshot;
mod store;
mod undo;
mod verify;
mod versions;
mod wal;

pub use cipher::{
    CONFIG_KEY, EncryptionConfig, KEY_COMMAND_ENV, KEY_ENV, KEY_FILE_ENV, KEY_VARS, KeyVars,
    NEW_KEY_COMMAND_ENV, NEW_KEY_ENV, NEW_KEY_FILE_ENV, NEW_KEY_VARS, RepositoryConfig,
    RepositoryKey,
};
pub use kept::KeptQuarantine;
pub use layout::{PointId, QUARANTINE_ROOT, SnapshotId, is_run_tag, run_tag, validate_environment};
pub use object_key::{BadKey, check_object_key};
pub use objects_at::{
    BroughtBack, SnapshotRestoreReport, UncertaintyWindow, VersionsRestoreOptions,
    VersionsRestoreReport, restore_snapshot_to_time, restore_versions_to_time, snapshot_at,
};
pub use point::{CLOCK_TOLERANCE, DamagedPoint, NewPoint, Point, PointListing};
pub use postgres::backup::{PgBackupOptions, backup_postgres};
pub use postgres::catalog::{
    count_rows, count_specs, missing_tables, table_columns, tables_owned_by_others, user_tables,
};
pub use postgres::copy::{Copied, CopyOptions, copy_into_swap};
pub use postgres::fetch::fetch_dump;
pub use postgres::freeze::{DatabaseFreeze, FreezeChange};
pub use postgres::kept::{
    KeptDatabase, KeptKind, drop_kept_database, kept_name, list_kept_databases,
};
pub use postgres::physical::{
    BaseBackup, BaseBackupOptions, DataDirSwap, Interrupted, PitrOptions, PitrReport,
    RecoveryWindow, ServerTools, SwapMarker, Swapped, base_backup, base_backup_for_time,
    drop_kept_data_dir, finish_interrupted_swap, kept_dir_name, list_base_backups,
    list_kept_data_dirs, recovery_window, restore_to_time, start_options, swap_data_dir,
    verify_base_backups,
};
pub use postgres::restore::{
    PgRestoreOptions, PgRestoreReport, default_restore_jobs, restore_postgres,
};
pub use postgres::swap::{
    Committed, DatabaseSwap, Prepared, Reopened, Session, SwapNames, SwapState, Undone,
    commit_swap, commit_swap_marked, prepare_swap, reopen_interrupted_swaps, undo_swap,
};
pub use postgres::{
    Compression, CountSelection, CountSpec, DumpContent, DumpFile, PgBackupPart, PgProgress,
    PgProgressFn, ServerIdentity, TableColumns,
};
pub use prune::{KeepReason, KeptPoint, PruneOptions, PruneReport};
pub use redact::{URL_PASSWORD_MASK, redact_url};
pub use repo::{RepoError, Repository, RepositoryOptions};
pub use restore::{
    RestoreObjectsOptions, RestoreObjectsReport, Shard, restore_objects, restore_point_objects,
};
pub use scratch::BlobScratch;
pub use secrets::{SecretRef, SecretRefSource, load_secret_refs};
pub use snapshot::{
    Manifest, ManifestEntry, ObjectSnapshotPart, PreviousSnapshot, ProgressFn, SnapshotOptions,
    TransferPhase, TransferProgress, snapshot_objects,
};
pub use store::{HttpStatus, RetryPolicy, S3Options, is_transient, local_dir, store_from_url};
pub use undo::{
    Before, RESTORE_RECORD_VERSION, RecordedKey, RestoreRecord, UndoObjectsOptions,
    UndoObjectsReport, read_records, records_prefix, undo_objects,
};
pub use verify::{RestoreTarget, SnapshotCheck, VerifyOptions, VerifyReport};
pub use versions::{ObjectVersion, VersionedBucket, Versioning};
pub use wal::{Pushed, WalError, WalRecord, WalReport, wal_fetch, wal_list, wal_push, wal_verify};
