//! Which keys a snapshot manifest may hold: keys that every backend (a directory, S3, GCS,
//! Azure) stores under exactly that name, so a restore writes each object where the snapshot
//! found it and nowhere else. Preflight refuses a manifest holding any other key before
//! anything is frozen; the restore refuses it again before it writes.

use std::fmt;

use object_store::path::Path;

/// Why a manifest key cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadKey {
    Empty,
    /// Starts with `/`: a directory store would write it outside the restore's root.
    Absolute,
    /// Ends with `/`: a directory, not an object, on a file system.
    TrailingSlash,
    /// `a//b`: an empty segment, which object_store and file systems collapse.
    EmptySegment,
    /// A `.` or `..` segment: a directory store resolves it to another key.
    DotSegment(String),
    /// A control character (C0, DEL or C1): not storable on every backend, and invisible in
    /// messages.
    Control(char),
    /// Any other key that object_store would not keep as written.
    NotRoundTrip(String),
}

impl fmt::Display for BadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadKey::Empty => write!(f, "is empty"),
            BadKey::Absolute => write!(f, "is absolute (starts with /)"),
            BadKey::TrailingSlash => write!(f, "ends with /"),
            BadKey::EmptySegment => write!(f, "has an empty segment (//)"),
            BadKey::DotSegment(segment) => write!(f, "has a {segment:?} segment"),
            BadKey::Control(c) => write!(f, "holds the control character U+{:04X}", *c as u32),
            BadKey::NotRoundTrip(reason) => write!(f, "is not an object key ({reason})"),
        }
    }
}

impl std::error::Error for BadKey {}

/// Checks one manifest key (relative to the restore's prefix). The first problem found is
/// returned; a key passes only if `object_store` parses it back to the very same string.
pub fn check_object_key(key: &str) -> Result<(), BadKey> {
    if key.is_empty() {
        return Err(BadKey::Empty);
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(BadKey::Control(c));
    }
    if key.starts_with('/') {
        return Err(BadKey::Absolute);
    }
    if key.ends_with('/') {
        return Err(BadKey::TrailingSlash);
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err(BadKey::EmptySegment),
            "." | ".." => return Err(BadKey::DotSegment(segment.to_owned())),
            _ => {}
        }
    }
    match Path::parse(key) {
        Ok(path) if path.as_ref() == key => Ok(()),
        Ok(path) => Err(BadKey::NotRoundTrip(format!(
            "it reads back as {:?}",
            path.as_ref()
        ))),
        Err(e) => Err(BadKey::NotRoundTrip(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_every_backend_restores_as_written() {
        use BadKey::*;
        let dot = |s: &str| DotSegment(s.to_owned());
        for (key, want) in [
            ("uploads/a.png", Ok(())),
            ("a", Ok(())),
            ("dir/sub/file.tar.gz", Ok(())),
            ("spaces are fine/and ünïcödé", Ok(())),
            ("report#1", Ok(())),
            ("...", Ok(())),
            (".hidden/..x/x..", Ok(())),
            ("%2E%2E/escaped", Ok(())),
            ("", Err(Empty)),
            ("/", Err(Absolute)),
            ("/etc/passwd", Err(Absolute)),
            ("//a", Err(Absolute)),
            ("a/", Err(TrailingSlash)),
            ("a/b/", Err(TrailingSlash)),
            ("a//b", Err(EmptySegment)),
            (".", Err(dot("."))),
            ("..", Err(dot(".."))),
            ("a/./b", Err(dot("."))),
            ("a/../../etc/passwd", Err(dot(".."))),
            ("../a", Err(dot(".."))),
            ("a/..", Err(dot(".."))),
            ("a\nb", Err(Control('\n'))),
            ("tab\there", Err(Control('\t'))),
            ("nul\0", Err(Control('\0'))),
            ("del\u{7f}", Err(Control('\u{7f}'))),
            ("c1\u{85}next-line", Err(Control('\u{85}'))),
        ] {
            assert_eq!(check_object_key(key), want, "{key:?}");
        }
    }

    #[test]
    fn problems_read_as_phrases_naming_the_culprit() {
        assert_eq!(
            check_object_key("a\u{1b}b")
                .expect_err("escape")
                .to_string(),
            "holds the control character U+001B"
        );
        assert_eq!(
            check_object_key("x/../y").expect_err("dots").to_string(),
            "has a \"..\" segment"
        );
    }
}
