//! Cron expressions of backup schedules, parsed once for config validation and for the
//! scheduler. A leaf: it imports nothing of this crate, so `config` can check a schedule
//! without depending on the scheduler (which depends on the run engine, which reads config).

use std::str::FromStr;

use anyhow::{Context, Result};
use chrono::Utc;

/// A parsed backup schedule.
#[derive(Debug, Clone)]
pub struct BackupSchedule {
    expression: String,
    schedule: ::cron::Schedule,
}

impl BackupSchedule {
    /// Parses a 5-field cron expression ("0 3 * * *": daily at 03:00 UTC), or 6 fields with
    /// seconds first ("*/30 * * * * *": every 30 seconds).
    pub fn parse(expression: &str) -> Result<BackupSchedule> {
        let fields = expression.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {expression}"),
            6 => expression.to_owned(),
            _ => anyhow::bail!(
                "backup_schedule {expression:?} has {fields} fields; write 5: minute hour \
                 day-of-month month day-of-week, e.g. \"0 3 * * *\" (or 6, seconds first)"
            ),
        };
        let schedule = ::cron::Schedule::from_str(&full).with_context(|| {
            format!(
                "backup_schedule {expression:?} is not a cron expression (minute hour \
                 day-of-month month day-of-week, e.g. \"0 3 * * *\")"
            )
        })?;
        Ok(BackupSchedule {
            expression: expression.to_owned(),
            schedule,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The next time after now.
    pub fn next(&self) -> Option<chrono::DateTime<Utc>> {
        self.schedule.after(&Utc::now()).next()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn five_field_expressions_parse_and_others_say_what_to_write() {
        let s = BackupSchedule::parse("0 3 * * *").unwrap();
        let next = s.next().unwrap();
        assert_eq!(next.format("%H:%M:%S").to_string(), "03:00:00");
        let every = BackupSchedule::parse("*/20 * * * * *").unwrap();
        let next = every.next().unwrap();
        assert!(next - Utc::now() <= chrono::Duration::seconds(20), "{next}");
        assert_eq!(next.timestamp() % 20, 0);
        let err = BackupSchedule::parse("0 0 3 * * * 2030")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has 7 fields; write 5"), "{err}");
        let err = BackupSchedule::parse("61 3 * * *").unwrap_err().to_string();
        assert!(err.contains("is not a cron expression"), "{err}");
    }
}
