//! The durable projection of a session: a view folded from its events, stored with the
//! sequence it is current to. Pure functions here; the worker stores the result.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Event kinds the service appends.
pub mod kind {
    pub const USER_PROMPT: &str = "user.prompt";
    pub const ASSISTANT_MESSAGE: &str = "assistant.message";
    pub const TOOL_RESULT: &str = "tool.result";
    pub const ARTIFACT_CREATED: &str = "artifact.created";
    pub const CHECKPOINT_SAVED: &str = "checkpoint.saved";
}

/// How many recent artifact keys the view keeps.
const RECENT_ARTIFACTS: usize = 10;
/// How much of the last message the view keeps.
const MESSAGE_PREVIEW_CHARS: usize = 200;

/// What the session list and detail pages read instead of replaying events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionView {
    pub title: String,
    pub event_count: i64,
    pub prompts: i64,
    pub assistant_messages: i64,
    pub tool_results: i64,
    pub last_message: Option<String>,
    pub artifact_count: i64,
    pub recent_artifacts: Vec<String>,
    pub checkpoint_version: i64,
    pub checkpoint_key: Option<String>,
}

impl SessionView {
    pub fn new(title: &str) -> SessionView {
        SessionView {
            title: title.to_owned(),
            ..SessionView::default()
        }
    }

    /// Folds one event into the view. Unknown kinds only count; a projection never fails on
    /// an event it does not understand (a newer worker may have written it).
    pub fn apply(&mut self, kind: &str, payload: &Value) {
        self.event_count += 1;
        let text = || {
            payload
                .get("text")
                .and_then(Value::as_str)
                .map(|t| t.chars().take(MESSAGE_PREVIEW_CHARS).collect::<String>())
        };
        match kind {
            kind::USER_PROMPT => self.prompts += 1,
            kind::ASSISTANT_MESSAGE => {
                self.assistant_messages += 1;
                self.last_message = text();
            }
            kind::TOOL_RESULT => self.tool_results += 1,
            kind::ARTIFACT_CREATED => {
                self.artifact_count += 1;
                if let Some(key) = payload.get("object_key").and_then(Value::as_str) {
                    self.recent_artifacts.push(key.to_owned());
                    if self.recent_artifacts.len() > RECENT_ARTIFACTS {
                        self.recent_artifacts.remove(0);
                    }
                }
            }
            kind::CHECKPOINT_SAVED => {
                if let Some(version) = payload.get("version").and_then(Value::as_i64) {
                    self.checkpoint_version = version;
                }
                self.checkpoint_key = payload
                    .get("object_key")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
            _ => {}
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn folds_events_in_order() {
        let mut view = SessionView::new("t");
        view.apply(kind::USER_PROMPT, &json!({"text": "hi"}));
        view.apply(kind::ASSISTANT_MESSAGE, &json!({"text": "hello"}));
        for i in 0..12 {
            view.apply(
                kind::ARTIFACT_CREATED,
                &json!({"object_key": format!("k{i}")}),
            );
        }
        view.apply(
            kind::CHECKPOINT_SAVED,
            &json!({"version": 3, "object_key": "c"}),
        );
        view.apply("something.new", &json!({}));
        assert_eq!(view.event_count, 16);
        assert_eq!(view.prompts, 1);
        assert_eq!(view.last_message.as_deref(), Some("hello"));
        assert_eq!(view.artifact_count, 12);
        assert_eq!(
            view.recent_artifacts.first().map(String::as_str),
            Some("k2")
        );
        assert_eq!(view.checkpoint_version, 3);
        let back: SessionView = serde_json::from_value(view.to_json()).expect("round trip");
        assert_eq!(back, view);
    }
}
