//! How `rollcall run watch` (and `drill --watch`) shows a run: one line per phase event, and
//! on a terminal a progress bar per long command (bytes and objects of a backup, snapshot or
//! restore) drawn from the agents' `command.progress` events. Off a terminal the bars become
//! a line at each change of stage, so logs stay short.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// A bar's look: phase and agent, the bar, bytes, rate, objects and stage.
const TEMPLATE: &str =
    "{prefix:<28} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}  {msg}";
/// When the total is not known yet (a backup): a spinner instead of the bar.
const SPINNER: &str = "{prefix:<28} {spinner} {bytes:>10} {bytes_per_sec:>12}  {msg}";

pub struct View {
    multi: MultiProgress,
    /// Per command: its phase and its bar.
    bars: HashMap<String, (String, ProgressBar)>,
    /// Off a terminal: the last stage printed per command.
    stages: HashMap<String, String>,
    terminal: bool,
}

impl View {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> View {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let target = if terminal {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        View {
            multi: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
            stages: HashMap::new(),
            terminal,
        }
    }

    /// Shows one event of the run.
    pub fn event(&mut self, at: &str, kind: &str, payload: &Value) {
        if kind == "command.progress" {
            self.progress(at, payload);
            return;
        }
        if kind == "phase.finished" {
            self.finish_phase(payload.get("phase").and_then(Value::as_str).unwrap_or(""));
        }
        self.line(format!("{at} {}", describe(kind, payload)));
    }

    /// Clears every bar still drawn (the run ended or blocked).
    pub fn finish(&mut self) {
        for (_, (_, bar)) in self.bars.drain() {
            bar.abandon();
        }
    }

    fn line(&self, text: String) {
        if self.terminal {
            // Printed above the bars, so they stay at the bottom.
            let _ = self.multi.println(text);
        } else {
            outln!("{text}");
        }
    }

    fn progress(&mut self, at: &str, payload: &Value) {
        let Some(p) = Progress::from(payload) else {
            return;
        };
        if !self.terminal {
            let last = self.stages.insert(p.command.clone(), p.stage.clone());
            if last.as_deref() != Some(p.stage.as_str()) {
                self.line(format!("{at} {}", p.describe()));
            }
            return;
        }
        let (_, bar) = self.bars.entry(p.command.clone()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(p.bytes_total));
            let template = if p.bytes_total > 0 { TEMPLATE } else { SPINNER };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(format!("{} {}", p.phase, p.agent));
            bar.enable_steady_tick(Duration::from_millis(250));
            (p.phase.clone(), bar)
        });
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(p.counts());
        if p.stage == "done" {
            bar.finish();
        }
    }

    fn finish_phase(&mut self, phase: &str) {
        self.bars.retain(|_, (of, bar)| {
            if of != phase {
                return true;
            }
            if !bar.is_finished() {
                bar.abandon();
            }
            false
        });
    }
}

/// One `command.progress` event.
struct Progress {
    command: String,
    agent: String,
    phase: String,
    stage: String,
    /// What the objects counts count: `objects`, or `archives` (a Postgres dump's).
    unit: String,
    objects_done: u64,
    objects_total: u64,
    objects_copied: u64,
    bytes_done: u64,
    bytes_total: u64,
}

impl Progress {
    fn from(payload: &Value) -> Option<Progress> {
        let s = |k: &str| payload.get(k).and_then(Value::as_str).map(str::to_owned);
        let p = payload.get("progress")?;
        let n = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(Progress {
            command: s("command_id")?,
            agent: s("agent").unwrap_or_default(),
            phase: s("phase").unwrap_or_default(),
            stage: p
                .get("stage")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            unit: p
                .get("unit")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                .unwrap_or("objects")
                .to_owned(),
            objects_done: n("objects_done"),
            objects_total: n("objects_total"),
            objects_copied: n("objects_copied"),
            bytes_done: n("bytes_done"),
            bytes_total: n("bytes_total"),
        })
    }

    /// The counts and the stage; only the stage when there is nothing to count (a swap).
    fn counts(&self) -> String {
        match (self.objects_total, self.unit.as_str()) {
            (0, _) if self.objects_done == 0 => self.stage.clone(),
            (_, "objects") => format!(
                "{}/{} objects ({} copied), {}",
                self.objects_done, self.objects_total, self.objects_copied, self.stage
            ),
            (_, unit) => format!(
                "{}/{} {unit}, {}",
                self.objects_done, self.objects_total, self.stage
            ),
        }
    }

    fn describe(&self) -> String {
        let head = format!("phase {} agent {}", self.phase, self.agent);
        if self.bytes_total == 0 && self.bytes_done == 0 {
            return format!("{head}: {}", self.counts());
        }
        format!(
            "{head}: {} of {} bytes, {}",
            self.bytes_done,
            self.bytes_total,
            self.counts()
        )
    }
}

/// One line for a run event.
pub fn describe(kind: &str, p: &Value) -> String {
    let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    match kind {
        "phase.started" => format!(
            "phase {} started ({}, attempt {})",
            s("phase"),
            s("action"),
            p["attempt"]
        ),
        "phase.finished" => {
            let secs = p.get("duration_ms").and_then(|v| v.as_i64()).unwrap_or(0) as f64 / 1000.0;
            format!(
                "phase {} {} in {secs:.1}s: {}",
                s("phase"),
                s("state"),
                s("detail")
            )
        }
        "command.progress" => match Progress::from(p) {
            Some(progress) => progress.describe(),
            None => format!("progress {p}"),
        },
        "run.blocked" => format!("run blocked: {}", s("reason")),
        "approval.waiting" => format!(
            "waiting for {} approval(s) from operators other than {} (`rollcall run approve RUN`), \
             for at most {}",
            p["approvals"],
            p.get("started_by")
                .and_then(|v| v.as_str())
                .unwrap_or("the one who started it"),
            humantime::format_duration(std::time::Duration::from_millis(
                p.get("timeout_ms").and_then(|v| v.as_u64()).unwrap_or(0)
            ))
        ),
        "run.approved" => format!("approved by {} ({})", s("by"), s("role")),
        "run.rejected" => {
            let reason = s("reason");
            if reason.is_empty() {
                format!("rejected by {} ({})", s("by"), s("role"))
            } else {
                format!("rejected by {} ({}): {reason}", s("by"), s("role"))
            }
        }
        "report" => "report written".to_owned(),
        other => format!(
            "{other} {}",
            if p.is_null() || p == &serde_json::json!({}) {
                String::new()
            } else {
                p.to_string()
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_events_read_as_lines() {
        let waiting = serde_json::json!({
            "approvals": 1, "started_by": "ada", "timeout_ms": 3_600_000
        });
        assert_eq!(
            describe("approval.waiting", &waiting),
            "waiting for 1 approval(s) from operators other than ada (`rollcall run approve \
             RUN`), for at most 1h"
        );
        let rejected = serde_json::json!({ "by": "bob", "role": "admin", "approve": false, "reason": "not now" });
        assert_eq!(
            describe("run.rejected", &rejected),
            "rejected by bob (admin): not now"
        );
    }
    use serde_json::json;

    fn progress(stage: &str, done: u64) -> Value {
        json!({
            "agent": "objects-1",
            "command_id": "r-1/restore-objects/objects-1/a1/s0/r0",
            "phase": "restore-objects",
            "progress": {
                "stage": stage, "objects_done": done, "objects_total": 10, "objects_copied": done,
                "bytes_done": done * 100, "bytes_total": 1000,
            },
        })
    }

    #[test]
    fn progress_events_read_as_a_line() {
        assert_eq!(
            describe("command.progress", &progress("copying", 4)),
            "phase restore-objects agent objects-1: 400 of 1000 bytes, 4/10 objects (4 copied), \
             copying"
        );
        assert!(describe("command.progress", &json!({})).starts_with("progress "));
        // A Postgres restore counts its dump's archives; its swap has nothing to count.
        let mut pg = progress("data", 1);
        pg["phase"] = json!("restore-postgres");
        pg["progress"]["unit"] = json!("archives");
        pg["progress"]["objects_total"] = json!(3);
        assert_eq!(
            describe("command.progress", &pg),
            "phase restore-postgres agent objects-1: 100 of 1000 bytes, 1/3 archives, data"
        );
        pg["progress"] = json!({"stage": "swapping", "unit": "archives"});
        assert_eq!(
            describe("command.progress", &pg),
            "phase restore-postgres agent objects-1: swapping"
        );
    }

    #[test]
    fn off_a_terminal_each_stage_is_shown_once() {
        let mut view = View {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            bars: HashMap::new(),
            stages: HashMap::new(),
            terminal: false,
        };
        for (stage, done) in [("listing", 0), ("copying", 1), ("copying", 5), ("done", 10)] {
            view.event("t", "command.progress", &progress(stage, done));
        }
        let id = "r-1/restore-objects/objects-1/a1/s0/r0";
        assert_eq!(view.stages[id], "done");
        assert!(view.bars.is_empty());
    }

    #[test]
    fn bars_follow_progress_and_end_with_their_phase() {
        let mut view = View {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            bars: HashMap::new(),
            stages: HashMap::new(),
            terminal: true,
        };
        view.event("t", "command.progress", &progress("copying", 4));
        let id = "r-1/restore-objects/objects-1/a1/s0/r0";
        assert_eq!(view.bars[id].1.position(), 400);
        assert_eq!(view.bars[id].1.length(), Some(1000));
        // A phase whose name ends the same way keeps its bar when this one finishes.
        let mut other = progress("copying", 1);
        other["phase"] = json!("pre-restore-objects");
        other["command_id"] = json!("r-1/pre-restore-objects/objects-1/a1/s0/r0");
        view.event("t", "command.progress", &other);
        view.event(
            "t",
            "phase.finished",
            &json!({ "phase": "restore-objects", "state": "passed" }),
        );
        let left: Vec<&str> = view.bars.keys().map(String::as_str).collect();
        assert_eq!(left, ["r-1/pre-restore-objects/objects-1/a1/s0/r0"]);
    }
}
