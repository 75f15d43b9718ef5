//! Progress of long commands, sent up the stream while they run. Best effort and throttled:
//! at most one message per [`INTERVAL`] per command, plus every change of stage, so a restore
//! of a million objects costs the stream a few messages a second, not a million.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::model::Progress;
use repository::{PgProgress, PgProgressFn, TransferPhase, TransferProgress};

/// The shortest gap between two progress messages of one command (stage changes excepted).
pub const INTERVAL: Duration = Duration::from_millis(500);

/// Where a command's progress goes; cheap to clone and to call.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

struct Inner {
    send: Box<dyn Fn(Progress) + Send + Sync>,
    last: Mutex<Option<(Instant, String)>>,
}

impl Reporter {
    pub fn new(send: impl Fn(Progress) + Send + Sync + 'static) -> Reporter {
        Reporter {
            inner: Arc::new(Inner {
                send: Box::new(send),
                last: Mutex::new(None),
            }),
        }
    }

    /// A reporter that drops everything (commands run without a stream, tests).
    pub fn none() -> Reporter {
        Reporter::new(|_| {})
    }

    /// Sends `progress` unless one of the same stage went out less than [`INTERVAL`] ago.
    pub fn report(&self, progress: Progress) {
        {
            let mut last = self.inner.last.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some((at, stage)) = last.as_ref()
                && *stage == progress.stage
                && now.duration_since(*at) < INTERVAL
            {
                return;
            }
            *last = Some((now, progress.stage.clone()));
        }
        (self.inner.send)(progress);
    }

    /// A callback for the repository's object transfers (snapshots, restores).
    pub fn transfers(&self) -> repository::ProgressFn {
        let reporter = self.clone();
        Arc::new(move |t: &TransferProgress| reporter.report(from_transfer(t)))
    }

    /// A callback for Postgres backups and restores: the counts are of the dump's archives.
    pub fn postgres(&self) -> PgProgressFn {
        let reporter = self.clone();
        PgProgressFn(Arc::new(move |p: &PgProgress| {
            reporter.report(Progress {
                stage: p.stage.to_owned(),
                objects_done: p.archives_done,
                objects_total: p.archives_total,
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
                objects_copied: p.archives_done,
                bytes_copied: p.bytes_done,
                unit: "archives".to_owned(),
            });
        }))
    }
}

fn from_transfer(t: &TransferProgress) -> Progress {
    let stage = match t.phase {
        TransferPhase::Listing => "listing",
        TransferPhase::Copying => "copying",
        TransferPhase::WritingManifest => "writing-manifest",
        TransferPhase::Done => "done",
    };
    Progress {
        stage: stage.to_owned(),
        objects_done: t.objects_done,
        objects_total: t.objects_total,
        bytes_done: t.bytes_done,
        bytes_total: t.bytes_total,
        objects_copied: t.objects_copied,
        bytes_copied: t.bytes_copied,
        unit: "objects".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(stage: &str, done: u64) -> Progress {
        Progress {
            stage: stage.into(),
            objects_done: done,
            ..Progress::default()
        }
    }

    #[test]
    fn throttles_within_a_stage_but_passes_every_stage_change() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let reporter = Reporter::new(move |p| sink.lock().expect("sink").push(p));
        reporter.report(at("listing", 0));
        reporter.report(at("copying", 1));
        for done in 2..100 {
            reporter.report(at("copying", done));
        }
        reporter.report(at("done", 100));
        let seen = seen.lock().expect("sink");
        let stages: Vec<(&str, u64)> = seen
            .iter()
            .map(|p| (p.stage.as_str(), p.objects_done))
            .collect();
        assert_eq!(stages, [("listing", 0), ("copying", 1), ("done", 100)]);
    }

    #[test]
    fn transfer_progress_maps_to_stage_names() {
        let t = TransferProgress {
            phase: TransferPhase::WritingManifest,
            objects_total: 3,
            bytes_total: 30,
            objects_done: 3,
            bytes_done: 30,
            objects_copied: 1,
            bytes_copied: 10,
        };
        let p = from_transfer(&t);
        assert_eq!(p.stage, "writing-manifest");
        assert_eq!((p.objects_copied, p.bytes_copied), (1, 10));
    }
}
