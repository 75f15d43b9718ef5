//! Waiting in tests without sleeping blindly: poll a condition until it holds, failing with
//! what was awaited once a deadline passes. The test harnesses of the workspace (`tests/`,
//! cowork-sim's) share this copy, since both already depend on this crate.

use std::time::{Duration, Instant};

/// How long to wait between two looks at the condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Some`, and returns that value.
///
/// # Panics
/// After `timeout`, naming `what`: this is for tests, where a timeout is the failure.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    poll(what, timeout, check, None::<fn() -> String>).await
}

/// Like [`eventually`], but a timeout's message ends with what `explain` reports then (the
/// state the test waited on, the logs of the processes involved), so a failure in CI says why.
///
/// # Panics
/// After `timeout`, naming `what` and what `explain` returned.
pub async fn eventually_explained<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    poll(what, timeout, check, Some(explain)).await
}

async fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
    explain: Option<impl FnOnce() -> String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            let why = explain.map(|e| format!("\n{}", e())).unwrap_or_default();
            panic!("timed out after {timeout:?} waiting for {what}{why}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_value_and_names_what_timed_out() {
        let mut looks = 0;
        let value = eventually("the third look", Duration::from_secs(5), async || {
            looks += 1;
            (looks == 3).then_some(looks)
        })
        .await;
        assert_eq!(value, 3);

        let waited = tokio::spawn(eventually_explained(
            "nothing",
            Duration::from_millis(10),
            async || None::<()>,
            || "the state then".to_owned(),
        ))
        .await
        .expect_err("times out");
        let message = waited.into_panic();
        let message = message
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(
            message.starts_with("timed out after 10ms waiting for nothing\nthe state then"),
            "{message}"
        );
    }
}
