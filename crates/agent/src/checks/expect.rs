//! What an HTTP check expects of an answer: its status (a code, a class such as `"2xx"`, or a
//! list of them), comparisons on JSON pointers (`[[check.expect_json]]`), and comparisons on a
//! value from Prometheus text (`[[check.expect_metric]]`). Parsed once when the agent starts
//! (a problem comes back as the key, what is wrong and the fix) and evaluated without I/O; a
//! failure says what was found and what was expected, with secret values withheld.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// `[[check.expect_json]]`: `pointer = "/db/connections"`, `op = ">="`, `value = 1`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonExpect {
    /// An RFC 6901 JSON pointer: "" is the whole body, "/a/0/b" a path (`~1` is `/`, `~0` is `~`).
    pub pointer: String,
    pub op: String,
    pub value: Option<toml::Value>,
}

/// `[[check.expect_metric]]`: `name = "cowork_sessions"`, `labels = { status = "open" }`,
/// `op = ">="`, `value = 1`. The value is the sum of every sample of that name whose labels
/// include these.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricExpect {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub op: String,
    pub value: Option<toml::Value>,
}

/// A config problem: the key under the check (`status`, `expect_json[0].op`), what is wrong,
/// and the fix.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

fn problem(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

const OPS: &str = "==, !=, >=, <=, >, <, exists, absent, matches";

/// The statuses a check accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRule(Vec<StatusItem>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusItem {
    Code(u16),
    /// 2 for "2xx".
    Class(u16),
}

impl Default for StatusRule {
    /// 200, as before status ranges existed.
    fn default() -> Self {
        StatusRule(vec![StatusItem::Code(200)])
    }
}

impl StatusRule {
    /// `status = 200`, `status = "2xx"` or `status = [200, 204, "3xx"]`; unset is 200.
    pub fn parse(value: Option<&toml::Value>) -> Result<StatusRule, Problem> {
        let Some(value) = value else {
            return Ok(StatusRule::default());
        };
        let bad = || {
            problem(
                "status",
                format!("{value} is not a status"),
                "use a code (status = 200), a class (status = \"2xx\") or a list of them \
                 (status = [200, 204])",
            )
        };
        let item = |v: &toml::Value| -> Result<StatusItem, Problem> {
            match v {
                toml::Value::Integer(n) if (100..=599).contains(n) => {
                    Ok(StatusItem::Code(*n as u16))
                }
                toml::Value::String(s) => {
                    let b = s.as_bytes();
                    if b.len() == 3
                        && (b'1'..=b'5').contains(&b[0])
                        && b[1..].eq_ignore_ascii_case(b"xx")
                    {
                        Ok(StatusItem::Class(u16::from(b[0] - b'0')))
                    } else {
                        Err(bad())
                    }
                }
                _ => Err(bad()),
            }
        };
        let items = match value {
            toml::Value::Array(items) if !items.is_empty() => {
                items.iter().map(item).collect::<Result<Vec<_>, _>>()?
            }
            toml::Value::Array(_) => return Err(bad()),
            one => vec![item(one)?],
        };
        Ok(StatusRule(items))
    }

    pub fn accepts(&self, status: u16) -> bool {
        self.0.iter().any(|item| match item {
            StatusItem::Code(c) => *c == status,
            StatusItem::Class(c) => status / 100 == *c,
        })
    }
}

impl fmt::Display for StatusRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(if i + 1 == self.0.len() { " or " } else { ", " })?;
            }
            match item {
                StatusItem::Code(c) => write!(f, "{c}")?,
                StatusItem::Class(c) => write!(f, "{c}xx")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
    Exists,
    Absent,
    Matches,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s.trim() {
            "==" => Op::Eq,
            "!=" => Op::Ne,
            ">=" => Op::Ge,
            "<=" => Op::Le,
            ">" => Op::Gt,
            "<" => Op::Lt,
            "exists" => Op::Exists,
            "absent" => Op::Absent,
            "matches" => Op::Matches,
            _ => return None,
        })
    }

    fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Ge => ">=",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Lt => "<",
            Op::Exists => "exists",
            Op::Absent => "absent",
            Op::Matches => "matches",
        }
    }

    fn ordering(self) -> bool {
        matches!(self, Op::Ge | Op::Le | Op::Gt | Op::Lt)
    }
}

/// An operator with what it compares against.
#[derive(Debug, Clone)]
struct Comparison {
    op: Op,
    want: Want,
}

#[derive(Debug, Clone)]
enum Want {
    Nothing,
    Json(Value),
    Number(f64),
    Regex(regex::Regex),
}

impl Comparison {
    /// `key` is where `op` and `value` sit (`expect_json[0]`); `metric`: the compared value is
    /// a sample's number, so only numeric comparisons make sense.
    fn parse(
        key: &str,
        op: &str,
        value: Option<&toml::Value>,
        metric: bool,
    ) -> Result<Comparison, Problem> {
        let Some(parsed) = Op::parse(op) else {
            return Err(problem(
                format!("{key}.op"),
                format!("{op:?} is not an operator"),
                format!("use one of {OPS}"),
            ));
        };
        let value_key = format!("{key}.value");
        let want = match (parsed, value) {
            (Op::Exists | Op::Absent, None) => Want::Nothing,
            (Op::Exists | Op::Absent, Some(_)) => {
                return Err(problem(
                    value_key,
                    format!("op = {op:?} takes no value"),
                    "remove the value",
                ));
            }
            (_, None) => {
                return Err(problem(
                    value_key,
                    format!("op = {op:?} needs a value"),
                    "add value = ... (what to compare with)",
                ));
            }
            (Op::Matches, Some(_)) if metric => {
                return Err(problem(
                    format!("{key}.op"),
                    "a metric's value is a number; it cannot match a regex",
                    "use ==, !=, >=, <=, >, <, exists or absent",
                ));
            }
            (Op::Matches, Some(toml::Value::String(pattern))) => {
                let regex = regex::Regex::new(pattern).map_err(|e| {
                    let first = e.to_string();
                    let first = first.lines().last().unwrap_or("invalid").trim().to_owned();
                    problem(
                        value_key.clone(),
                        format!("{pattern:?} is not a regular expression ({first})"),
                        "fix the pattern (Rust regex syntax; escape literal . ( [ with \\\\)",
                    )
                })?;
                Want::Regex(regex)
            }
            (Op::Matches, Some(other)) => {
                return Err(problem(
                    value_key,
                    format!("op = \"matches\" needs a string pattern, not {other}"),
                    "quote the pattern, e.g. value = \"^ok$\"",
                ));
            }
            (_, Some(v)) if parsed.ordering() || metric => match number(v) {
                Some(n) => Want::Number(n),
                None => {
                    return Err(problem(
                        value_key,
                        format!("op = {op:?} compares numbers, and {v} is not one"),
                        "write a number without quotes, e.g. value = 1",
                    ));
                }
            },
            (_, Some(v)) => Want::Json(toml_to_json(v)),
        };
        Ok(Comparison { op: parsed, want })
    }

    /// "expected >= 1", "expected matches \"^ok\"", "expected it to exist".
    fn expected(&self) -> String {
        match (&self.want, self.op) {
            (_, Op::Exists) => "expected it to exist".into(),
            (_, Op::Absent) => "expected it to be absent".into(),
            (Want::Json(v), op) => format!("expected {} {}", op.symbol(), shown(v, false)),
            (Want::Number(n), op) => format!("expected {} {}", op.symbol(), number_text(*n)),
            (Want::Regex(r), op) => format!("expected {} {:?}", op.symbol(), r.as_str()),
            (Want::Nothing, op) => format!("expected {}", op.symbol()),
        }
    }

    /// Whether `actual` (None: absent) passes.
    fn passes(&self, actual: Option<&Value>) -> bool {
        let Some(actual) = actual else {
            return self.op == Op::Absent;
        };
        match (&self.want, self.op) {
            (_, Op::Exists) => true,
            (_, Op::Absent) => false,
            (Want::Json(want), Op::Eq) => json_equal(actual, want),
            (Want::Json(want), Op::Ne) => !json_equal(actual, want),
            (Want::Number(want), op) => actual
                .as_f64()
                .is_some_and(|got| compare_numbers(op, got, *want)),
            (Want::Regex(r), _) => match actual {
                Value::String(s) => r.is_match(s),
                other => r.is_match(&other.to_string()),
            },
            _ => false,
        }
    }
}

fn compare_numbers(op: Op, got: f64, want: f64) -> bool {
    match op {
        Op::Eq => got == want,
        Op::Ne => got != want,
        Op::Ge => got >= want,
        Op::Le => got <= want,
        Op::Gt => got > want,
        Op::Lt => got < want,
        _ => false,
    }
}

/// A JSON-pointer expectation, or one of the older `expect = { "a.b" = value }` table (whose
/// dotted path becomes a pointer; it keeps its own spelling in messages).
#[derive(Debug, Clone)]
pub struct JsonRule {
    pointer: String,
    label: String,
    cmp: Comparison,
}

impl JsonRule {
    pub fn parse(index: usize, e: &JsonExpect) -> Result<JsonRule, Problem> {
        let key = format!("expect_json[{index}]");
        check_pointer(&e.pointer).map_err(|why| {
            problem(
                format!("{key}.pointer"),
                format!("{:?} is not a JSON pointer ({why})", e.pointer),
                "write it as \"/field/0/inner\" (\"\" for the whole body; ~1 for / and ~0 for ~ \
                 inside a name)",
            )
        })?;
        Ok(JsonRule {
            pointer: e.pointer.clone(),
            label: e.pointer.clone(),
            cmp: Comparison::parse(&key, &e.op, e.value.as_ref(), false)?,
        })
    }

    /// `expect = { "database.ok" = true }`: equality on a dotted path.
    pub fn dotted(path: &str, want: &toml::Value) -> JsonRule {
        let pointer = path
            .split('.')
            .map(|segment| format!("/{}", segment.replace('~', "~0").replace('/', "~1")))
            .collect();
        JsonRule {
            pointer,
            label: path.to_owned(),
            cmp: Comparison {
                op: Op::Eq,
                want: Want::Json(toml_to_json(want)),
            },
        }
    }

    /// None when the body passes, else what was found and what was expected.
    pub fn check(&self, body: &Value) -> Option<String> {
        let actual = body.pointer(&self.pointer);
        if self.cmp.passes(actual) {
            return None;
        }
        let secret = self
            .pointer
            .rsplit('/')
            .next()
            .is_some_and(api::redact::is_secret_key);
        let found = match actual {
            None => "absent".to_owned(),
            Some(v) => shown(v, secret),
        };
        Some(format!(
            "{} is {found}, {}",
            self.label,
            self.cmp.expected()
        ))
    }
}

/// Why `pointer` is not an RFC 6901 pointer, if it is not.
fn check_pointer(pointer: &str) -> Result<(), &'static str> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err("it must be empty or start with /");
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err("~ must be followed by 0 or 1");
        }
    }
    Ok(())
}

/// An expectation on a value from Prometheus text.
#[derive(Debug, Clone)]
pub struct MetricRule {
    name: String,
    labels: BTreeMap<String, String>,
    cmp: Comparison,
}

impl MetricRule {
    pub fn parse(index: usize, e: &MetricExpect) -> Result<MetricRule, Problem> {
        let key = format!("expect_metric[{index}]");
        let valid_name = |s: &str, colon: bool| {
            let mut chars = s.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
        };
        if !valid_name(&e.name, true) {
            return Err(problem(
                format!("{key}.name"),
                format!("{:?} is not a metric name", e.name),
                "name the metric as /metrics prints it, e.g. name = \"cowork_sessions\"",
            ));
        }
        if let Some(label) = e.labels.keys().find(|l| !valid_name(l, false)) {
            return Err(problem(
                format!("{key}.labels"),
                format!("{label:?} is not a label name"),
                "use label names as /metrics prints them, e.g. labels = { status = \"open\" }",
            ));
        }
        Ok(MetricRule {
            name: e.name.clone(),
            labels: e.labels.clone(),
            cmp: Comparison::parse(&key, &e.op, e.value.as_ref(), true)?,
        })
    }

    /// None when the samples pass, else what was found and what was expected.
    pub fn check(&self, samples: &[Sample]) -> Option<String> {
        let matching: Vec<f64> = samples
            .iter()
            .filter(|s| {
                s.name == self.name
                    && self
                        .labels
                        .iter()
                        .all(|(k, v)| s.labels.get(k).is_some_and(|got| got == v))
            })
            .map(|s| s.value)
            .collect();
        let sum: f64 = matching.iter().sum();
        let passes = match (&self.cmp.want, self.cmp.op) {
            (_, Op::Absent) => matching.is_empty(),
            (_, Op::Exists) => !matching.is_empty(),
            (Want::Number(want), op) => !matching.is_empty() && compare_numbers(op, sum, *want),
            // `parse` gives a metric nothing else.
            _ => false,
        };
        if passes {
            return None;
        }
        let found = match matching.len() {
            0 => format!("absent (no such sample among {})", samples.len()),
            1 => number_text(sum),
            n => format!("{} (the sum of {n} samples)", number_text(sum)),
        };
        Some(format!("{self} is {found}, {}", self.cmp.expected()))
    }
}

impl fmt::Display for MetricRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        Ok(())
    }
}

/// One sample of Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a Prometheus text exposition (or OpenMetrics text): comments and lines
/// that do not read as a sample are skipped, so one odd line does not hide the rest.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_sample).collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // Skip separators up to a label name or the closing brace.
            while chars
                .next_if(|(_, c)| *c == ',' || c.is_whitespace())
                .is_some()
            {}
            let (start, c) = chars.next()?;
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let mut end = start + c.len_utf8();
            while let Some((i, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
                end = i + c.len_utf8();
            }
            let label = inner[start..end].to_owned();
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            chars.next().filter(|(_, c)| *c == '=')?;
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            chars.next().filter(|(_, c)| *c == '"')?;
            let mut value = String::new();
            loop {
                match chars.next()? {
                    (_, '"') => break,
                    (_, '\\') => match chars.next()? {
                        (_, 'n') => value.push('\n'),
                        (_, other) => value.push(other),
                    },
                    (_, c) => value.push(c),
                }
            }
            labels.insert(label, value);
        }
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn number(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Integer(n) => Some(*n as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    }
}

fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(n) => Value::from(*n),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// JSON equality with numbers compared by value (1 == 1.0).
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

/// A value for a check's detail: redacted (secret keys inside blanked, tokens in strings
/// removed; all of it when it sits under a secret key) and at most 120 characters.
fn shown(v: &Value, secret: bool) -> String {
    if secret {
        return api::redact::MARKER.to_owned();
    }
    let mut v = v.clone();
    api::redact::redact_json(&mut v);
    let text = v.to_string();
    if text.chars().count() <= 120 {
        return text;
    }
    let cut: String = text.chars().take(120).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn json_rule(pointer: &str, op: &str, value: Option<toml::Value>) -> Result<JsonRule, Problem> {
        JsonRule::parse(
            0,
            &JsonExpect {
                pointer: pointer.into(),
                op: op.into(),
                value,
            },
        )
    }

    fn int(n: i64) -> Option<toml::Value> {
        Some(toml::Value::Integer(n))
    }

    fn string(s: &str) -> Option<toml::Value> {
        Some(toml::Value::String(s.into()))
    }

    #[test]
    fn statuses_are_codes_classes_or_lists() {
        let parse = |text: &str| {
            let table: toml::Table = toml::from_str(text).unwrap();
            StatusRule::parse(table.get("status"))
        };
        let default = parse("").unwrap();
        assert!(default.accepts(200) && !default.accepts(204));
        let class = parse("status = \"2xx\"").unwrap();
        assert!(class.accepts(204) && class.accepts(299) && !class.accepts(301));
        assert_eq!(class.to_string(), "2xx");
        let list = parse("status = [200, 204, \"3XX\"]").unwrap();
        assert!(list.accepts(204) && list.accepts(302) && !list.accepts(201));
        assert_eq!(list.to_string(), "200, 204 or 3xx");
        for bad in [
            "status = 42",
            "status = \"2x\"",
            "status = []",
            "status = \"ok\"",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.key, "status", "{bad}");
            assert!(err.fix.contains("status = \"2xx\""), "{bad}: {err:?}");
        }
    }

    #[test]
    fn json_comparisons() {
        let body: Value = serde_json::json!({
            "db": { "connections": 3, "ok": true, "version": "15.4" },
            "queue/depth": 0,
            "items": [{ "id": "a" }],
            "token": "cws_desktop_0123456789abcdef0123456789abcdef01234567",
            "maybe": null,
        });
        let table: [(&str, &str, Option<toml::Value>, Option<&str>); 16] = [
            ("/db/connections", ">=", int(1), None),
            (
                "/db/connections",
                ">",
                int(3),
                Some("/db/connections is 3, expected > 3"),
            ),
            ("/db/connections", "<=", Some(toml::Value::Float(3.0)), None),
            (
                "/db/connections",
                "<",
                int(3),
                Some("/db/connections is 3, expected < 3"),
            ),
            ("/db/connections", "==", Some(toml::Value::Float(3.0)), None),
            ("/db/ok", "!=", Some(toml::Value::Boolean(false)), None),
            (
                "/db/ok",
                "==",
                Some(toml::Value::Boolean(false)),
                Some("/db/ok is true, expected == false"),
            ),
            ("/db/version", "matches", string(r"^15\."), None),
            (
                "/db/version",
                "matches",
                string("^16"),
                Some("/db/version is \"15.4\", expected matches \"^16\""),
            ),
            (
                "/db/version",
                ">=",
                int(15),
                Some("/db/version is \"15.4\", expected >= 15"),
            ),
            ("/queue~1depth", "==", int(0), None),
            ("/items/0/id", "exists", None, None),
            ("/maybe", "exists", None, None),
            ("/items/1", "absent", None, None),
            (
                "/missing",
                ">=",
                int(0),
                Some("/missing is absent, expected >= 0"),
            ),
            (
                "/token",
                "absent",
                None,
                Some("/token is [REDACTED], expected it to be absent"),
            ),
        ];
        for (pointer, op, value, failure) in table {
            let rule = json_rule(pointer, op, value).unwrap();
            assert_eq!(rule.check(&body).as_deref(), failure, "{pointer} {op}");
        }
        // The older `expect` table: dotted paths, equality.
        let old = JsonRule::dotted("db.ok", &toml::Value::Boolean(true));
        assert_eq!(old.check(&body), None);
        let old = JsonRule::dotted("db.connections", &toml::Value::Integer(4));
        assert_eq!(
            old.check(&body).as_deref(),
            Some("db.connections is 3, expected == 4")
        );
        // Secrets inside a compared value are withheld.
        let whole = json_rule("", "absent", None).unwrap();
        let detail = whole.check(&body).unwrap();
        assert!(!detail.contains("cws_desktop"), "{detail}");
    }

    #[test]
    fn bad_expectations_are_refused_with_the_key_and_the_fix() {
        let cases: [(&str, &str, Option<toml::Value>, &str, &str); 7] = [
            (
                "/a",
                "~=",
                int(1),
                "expect_json[0].op",
                "\"~=\" is not an operator",
            ),
            (
                "a/b",
                "==",
                int(1),
                "expect_json[0].pointer",
                "it must be empty or start with /",
            ),
            (
                "/a~2",
                "==",
                int(1),
                "expect_json[0].pointer",
                "~ must be followed by 0 or 1",
            ),
            (
                "/a",
                "matches",
                string("(unclosed"),
                "expect_json[0].value",
                "is not a regular expression",
            ),
            (
                "/a",
                ">=",
                string("one"),
                "expect_json[0].value",
                "compares numbers, and \"one\" is not one",
            ),
            (
                "/a",
                "exists",
                int(1),
                "expect_json[0].value",
                "takes no value",
            ),
            ("/a", "==", None, "expect_json[0].value", "needs a value"),
        ];
        for (pointer, op, value, key, says) in cases {
            let err = json_rule(pointer, op, value).unwrap_err();
            assert_eq!(err.key, key, "{pointer} {op}");
            assert!(err.problem.contains(says), "{err:?}");
            assert!(!err.fix.is_empty());
        }
        let metric = |name: &str, op: &str, value| {
            MetricRule::parse(
                2,
                &MetricExpect {
                    name: name.into(),
                    labels: BTreeMap::new(),
                    op: op.into(),
                    value,
                },
            )
        };
        assert_eq!(
            metric("a-b", ">=", int(1)).unwrap_err().key,
            "expect_metric[2].name"
        );
        assert_eq!(
            metric("up", "matches", string("1")).unwrap_err().key,
            "expect_metric[2].op"
        );
        let err = metric("up", "==", string("1")).unwrap_err();
        assert_eq!(err.key, "expect_metric[2].value");
        assert!(err.problem.contains("compares numbers"), "{err:?}");
    }

    #[test]
    fn prometheus_text_is_read_and_compared() {
        let text = "# HELP cowork_sessions Sessions by status.\n# TYPE cowork_sessions gauge\n\
            cowork_sessions{status=\"open\"} 2\ncowork_sessions{status=\"closed\",tenant=\"t\\\"1\"} 5\n\
            cowork_sessions{status=\"closed\",tenant=\"t2\"} 1e1 1700000000000\n\
            cowork_web_maintenance 0\nnot a sample line\nweird{unclosed=\"x 1\nhttp_duration_seconds_bucket{le=\"+Inf\"} +Inf\n";
        let samples = parse_exposition(text);
        assert_eq!(samples.len(), 5, "{samples:?}");
        assert_eq!(
            samples[1].labels.get("tenant").map(String::as_str),
            Some("t\"1")
        );
        assert_eq!(samples[4].value, f64::INFINITY);
        let rule = |name: &str, labels: &[(&str, &str)], op: &str, value| {
            MetricRule::parse(
                0,
                &MetricExpect {
                    name: name.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    op: op.into(),
                    value,
                },
            )
            .unwrap()
            .check(&samples)
        };
        assert_eq!(
            rule("cowork_sessions", &[("status", "open")], ">=", int(1)),
            None
        );
        assert_eq!(
            rule("cowork_sessions", &[("status", "open")], ">=", int(3)).as_deref(),
            Some("cowork_sessions{status=\"open\"} is 2, expected >= 3")
        );
        assert_eq!(
            rule("cowork_sessions", &[("status", "closed")], "==", int(16)).as_deref(),
            Some("cowork_sessions{status=\"closed\"} is 15 (the sum of 2 samples), expected == 16")
        );
        assert_eq!(rule("cowork_sessions", &[], "==", int(17)), None);
        assert_eq!(rule("cowork_web_maintenance", &[], "==", int(0)), None);
        assert_eq!(rule("cowork_gone", &[], "absent", None), None);
        assert_eq!(
            rule("cowork_gone", &[], ">=", int(0)).as_deref(),
            Some("cowork_gone is absent (no such sample among 5), expected >= 0")
        );
        assert_eq!(
            rule("cowork_web_maintenance", &[], "absent", None).as_deref(),
            Some("cowork_web_maintenance is 0, expected it to be absent")
        );
    }
}
