//! Redaction: the one pass that takes credentials out of text and JSON before it leaves a
//! process — reports, logs, captured command output, trace attributes (DESIGN.md, safety
//! invariant 6).
//!
//! [`redact`] removes bearer and API tokens (known prefixes, `Authorization` headers,
//! `token=`/`password=`-style pairs in text, JSON, TOML and query strings, `--password VALUE`
//! flags on command lines), passwords in URLs, the query strings of signed URLs, PEM private
//! keys, cookie and webhook secrets, email addresses, the user names in local home-directory
//! paths (`/home/alice/...` → `/home/[REDACTED]/...`), and long high-entropy strings that
//! follow a secret-ish word. [`redact_json`]
//! does the same to every string of a JSON document and blanks values whose key names a
//! secret. Everything it removes becomes [`MARKER`] (URL passwords become `***`, email local
//! parts `***@domain`), so the text around it stays readable.
//!
//! The rules prefer a false positive on a word near `password:` over a leaked credential; ids,
//! digests under keys like `sha256`, and URLs without secrets pass through untouched (and
//! unallocated: nothing to remove means `Cow::Borrowed`). Redacting twice changes nothing.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Captures, Regex};
use serde_json::Value;

/// What a removed secret is replaced with.
pub const MARKER: &str = "[REDACTED]";

/// What replaces the password of a URL (`postgres://app:***@db/app`): the mask of
/// `repository::redact_url`, so a password it masked is left as it is here.
const URL_PASSWORD_MASK: &str = repository::URL_PASSWORD_MASK;

/// Returns `text` with every secret it recognises removed.
pub fn redact(text: &str) -> Cow<'_, str> {
    // Order matters: whole blocks and URLs first (their insides would confuse the pair rules),
    // then headers and tokens, then generic pairs, then the heuristics.
    const PASSES: [Pass; 11] = [
        pem_blocks,
        urls,
        authorization_headers,
        cookie_headers,
        bearer_tokens,
        known_tokens,
        key_values,
        cli_flags,
        after_secret_words,
        emails,
        home_paths,
    ];
    let mut text = Cow::Borrowed(text);
    for pass in PASSES {
        text = apply(text, pass);
    }
    text
}

/// Redacts every string of `value` in place (as [`redact`]) and replaces the value of any key
/// that names a secret (`token`, `password`, `secret`, `api_key`, `authorization`, `cookie`,
/// `private_key`, `plaintext`, `credential`, ...) with [`MARKER`]. Keys that name a
/// *reference* to a secret (`token_env`, `password_file`, `secret_refs`, `kms_key`, a
/// secret's `name` or `version`) keep their values.
pub fn redact_json(value: &mut Value) {
    walk_with(value, false, &|s| redact(s));
}

/// Redacts the strings of `value` with `text`, blanking those under secret keys.
fn walk_with(value: &mut Value, secret: bool, text: &dyn Fn(&str) -> Cow<'_, str>) {
    match value {
        Value::String(s) => {
            if secret {
                if !s.is_empty() && s != MARKER {
                    *s = MARKER.to_owned();
                }
            } else if let Cow::Owned(redacted) = text(s) {
                *s = redacted;
            }
        }
        // A number under a secret key can be a PIN or a numeric password.
        Value::Number(_) if secret => *value = Value::String(MARKER.to_owned()),
        Value::Number(_) | Value::Bool(_) | Value::Null => {}
        Value::Array(items) => {
            for item in items {
                walk_with(item, secret, text);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let inner = match key_class(key) {
                    KeyClass::Secret => true,
                    KeyClass::Reference => false,
                    KeyClass::Plain => secret,
                };
                walk_with(item, inner, text);
            }
        }
    }
}

/// How a key (`password`, `token_env`, `sha256`) relates to secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyClass {
    /// Its value is a secret.
    Secret,
    /// Its value points at or describes a secret without being one (`token_env`,
    /// `password_file`, `secret_refs`, `name`, `kms_key`).
    Reference,
    Plain,
}

/// Words that make a key secret.
const SECRET_WORDS: &[&str] = &[
    "token",
    "tokens",
    "secret",
    "secrets",
    "password",
    "passwords",
    "passwd",
    "pwd",
    "passphrase",
    "apikey",
    "apikeys",
    "authorization",
    "cookie",
    "cookies",
    "plaintext",
    "credential",
    "credentials",
    "signature",
    "sig",
    "privatekey",
    "jwt",
    "bearer",
];

/// Adjacent word pairs that make a key secret (`api_key`, `AccountKey`, `x-api-key`).
const SECRET_PAIRS: &[(&str, &str)] = &[
    ("api", "key"),
    ("private", "key"),
    ("access", "key"),
    ("account", "key"),
    ("signing", "key"),
    ("encryption", "key"),
    ("master", "key"),
];

/// Endings of a run-together key that make it secret (`authtoken`, `dbpassword`).
const SECRET_SUFFIXES: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "privatekey",
    "accesskey",
];

/// A key whose last word is one of these names a reference to a secret, or a fact about one,
/// not the secret itself: `token_env`, `password_file`, `secret_refs`, `token_sha256`.
const REFERENCE_WORDS: &[&str] = &[
    "env",
    "var",
    "file",
    "path",
    "ref",
    "refs",
    "reference",
    "references",
    "name",
    "names",
    "id",
    "ids",
    "version",
    "versions",
    "manager",
    "sha256",
    "hash",
    "digest",
    "prefix",
    "kind",
    "type",
    "count",
    "counts",
    "at",
    "expires",
    "expiry",
    "ttl",
];

/// Whether a key (JSON field, span attribute, header) names a secret value (`token`,
/// `password`, `api_key`, ...) rather than a reference to one (`token_env`, `kms_key`).
pub fn is_secret_key(key: &str) -> bool {
    key_class(key) == KeyClass::Secret
}

fn key_class(key: &str) -> KeyClass {
    let words = key_words(key);
    let Some(last) = words.last() else {
        return KeyClass::Plain;
    };
    // A KMS key is a reference to key material held elsewhere.
    if REFERENCE_WORDS.contains(&last.as_str()) || words.iter().any(|w| w == "kms") {
        return KeyClass::Reference;
    }
    let joined = words.concat();
    let secret = words.iter().any(|w| SECRET_WORDS.contains(&w.as_str()))
        || words.windows(2).any(|pair| {
            // `api_keys` as well as `api_key`.
            let second = pair[1].strip_suffix('s').unwrap_or(&pair[1]);
            SECRET_PAIRS.contains(&(pair[0].as_str(), second))
        })
        || SECRET_SUFFIXES.iter().any(|s| joined.ends_with(s));
    if secret {
        KeyClass::Secret
    } else {
        KeyClass::Plain
    }
}

/// `X-Amz-Signature` → `x amz signature`, `accessToken` → `access token`, `APIKey` → `apikey`.
fn key_words(key: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut previous_lower = false;
    for c in key.chars() {
        if !c.is_ascii_alphanumeric() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            previous_lower = false;
            continue;
        }
        if c.is_ascii_uppercase() && previous_lower && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        word.push(c.to_ascii_lowercase());
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

type Pass = fn(&str) -> Cow<'_, str>;

/// Runs one pass over text that may already be owned, keeping it borrowed when nothing changes.
fn apply(text: Cow<'_, str>, pass: Pass) -> Cow<'_, str> {
    match text {
        Cow::Borrowed(s) => pass(s),
        Cow::Owned(s) => {
            let changed = match pass(&s) {
                Cow::Owned(changed) => Some(changed),
                Cow::Borrowed(_) => None,
            };
            Cow::Owned(changed.unwrap_or(s))
        }
    }
}

/// Replaces the matches of `re` for which `f` returns a replacement; `f` also gets the whole
/// text, for rules that look at what comes before a match. No replacement: no allocation.
fn replace<'t>(
    re: &Regex,
    text: &'t str,
    f: impl Fn(&str, &Captures<'_>) -> Option<String>,
) -> Cow<'t, str> {
    let mut out = String::new();
    let mut last = 0;
    let mut changed = false;
    for caps in re.captures_iter(text) {
        let Some(whole) = caps.get(0) else { continue };
        if let Some(replacement) = f(text, &caps) {
            out.push_str(&text[last..whole.start()]);
            out.push_str(&replacement);
            last = whole.end();
            changed = true;
        }
    }
    if !changed {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("redaction patterns are valid regular expressions")
}

fn group<'c>(caps: &'c Captures<'_>, name: &str) -> &'c str {
    caps.name(name).map_or("", |m| m.as_str())
}

// ---- PEM private keys -------------------------------------------------------------------

/// A private key block, also when cut off before its END line (truncated output).
static PEM: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\z)",
    )
});

fn pem_blocks(text: &str) -> Cow<'_, str> {
    if !text.contains("PRIVATE KEY") {
        return Cow::Borrowed(text);
    }
    replace(&PEM, text, |_, _| Some(MARKER.to_owned()))
}

// ---- URLs: passwords and signed query strings --------------------------------------------

static URL: LazyLock<Regex> =
    LazyLock::new(|| regex(r#"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s"'<>`\\]+"#));

/// Query parameters that make a URL a signed (capability) URL: whoever has the URL has the
/// access, so the whole query string goes.
const SIGNATURE_PARAMS: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "x-oss-signature",
    "signature",
    "sig",
    "se",
    "sp",
    "googleaccessid",
    "ossaccesskeyid",
];

fn urls(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    replace(&URL, text, |_, caps| {
        let whole = caps.get(0).map_or("", |m| m.as_str());
        // Sentence punctuation after a URL is not part of it.
        let url = whole.trim_end_matches(['.', ',', ';', ':', '!', '?', ')', ']', '}']);
        let tail = &whole[url.len()..];
        clean_url(url).map(|clean| format!("{clean}{tail}"))
    })
}

/// The URL without its password and, when signed, without its query; `None` when it holds
/// neither.
fn clean_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(authority_end);
    let mut changed = false;
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, password)) if !password.is_empty() && password != URL_PASSWORD_MASK => {
                changed = true;
                format!("{user}:{URL_PASSWORD_MASK}@{host}")
            }
            _ => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let after = match after.split_once('?') {
        Some((path, query)) if is_signed(query) => {
            changed = true;
            format!("{path}?{MARKER}")
        }
        _ => after.to_owned(),
    };
    changed.then(|| format!("{scheme}://{authority}{after}"))
}

fn is_signed(query: &str) -> bool {
    query
        .split(['&', ';', '#'])
        .filter_map(|pair| pair.split_once('=').map(|(name, _)| name))
        .any(|name| SIGNATURE_PARAMS.contains(&name.to_ascii_lowercase().as_str()))
}

// ---- Authorization and cookie headers ----------------------------------------------------

/// `Authorization: <scheme> <credentials>` to the end of the line (or of the JSON string the
/// line sits in).
static AUTH_HEADER: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r#"(?i)\b(?P<key>(?:proxy-)?authorization[ \t]*[:=][ \t]*)(?P<value>(?:bearer|basic|token|digest|negotiate|ntlm|aws4-hmac-sha256|sharedkey|apikey|signature)\b[^"\\\r\n]*)"#,
    )
});

/// `Cookie: a=b; c=d` and `Set-Cookie: id=...; Path=/`; a value without `=` is no cookie.
static COOKIE_HEADER: LazyLock<Regex> = LazyLock::new(|| {
    regex(r#"(?i)\b(?P<key>(?:set-)?cookie[ \t]*:[ \t]*)(?P<value>[^"\\\r\n=]+=[^"\\\r\n]*)"#)
});

fn authorization_headers(text: &str) -> Cow<'_, str> {
    replace(&AUTH_HEADER, text, header_value)
}

fn cookie_headers(text: &str) -> Cow<'_, str> {
    replace(&COOKIE_HEADER, text, header_value)
}

fn header_value(_: &str, caps: &Captures<'_>) -> Option<String> {
    let value = group(caps, "value");
    (!value.trim_start().starts_with(MARKER)).then(|| format!("{}{MARKER}", group(caps, "key")))
}

// ---- Bearer tokens -----------------------------------------------------------------------

static BEARER: LazyLock<Regex> =
    LazyLock::new(|| regex(r"(?i)\b(?P<word>bearer[ \t]+)(?P<token>[A-Za-z0-9._~+/=-]+)"));

/// Words that follow "bearer" in prose, not a credential.
const BEARER_PROSE: &[&str] = &[
    "token",
    "tokens",
    "auth",
    "authentication",
    "authorization",
    "scheme",
    "header",
    "credential",
    "credentials",
    "is",
    "was",
    "of",
    "the",
    "a",
    "an",
    "and",
    "or",
    "from",
    "with",
    "for",
    "in",
    "to",
    "not",
    "missing",
    "required",
    "only",
    "string",
    "value",
];

fn bearer_tokens(text: &str) -> Cow<'_, str> {
    replace(&BEARER, text, |_, caps| {
        let token = group(caps, "token");
        (!BEARER_PROSE.contains(&token.to_ascii_lowercase().as_str()))
            .then(|| format!("{}{MARKER}", group(caps, "word")))
    })
}

// ---- Tokens recognisable by their prefix -------------------------------------------------

static KNOWN_TOKEN: LazyLock<Regex> = LazyLock::new(|| {
    regex(concat!(
        r"\b(?:",
        r"cws_[A-Za-z0-9_]+", // cowork-sim tokens
        r"|gh[pousr]_[A-Za-z0-9]{6,}|github_pat_[A-Za-z0-9_]{10,}", // GitHub
        r"|xox[a-z]-[A-Za-z0-9-]+", // Slack
        r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}", // AWS key ids
        r"|whsec_[A-Za-z0-9+/=_-]+", // webhook signing secrets
        r"|[sr]k_(?:live|test)_[A-Za-z0-9]{6,}", // Stripe
        r"|sk-[A-Za-z0-9_-]{20,}", // OpenAI-style keys
        r"|glpat-[A-Za-z0-9_-]{10,}", // GitLab
        r"|npm_[A-Za-z0-9]{20,}", // npm
        r"|AIza[0-9A-Za-z_-]{30,}", // Google API keys
        r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*", // JWTs
        r")",
    ))
});

fn known_tokens(text: &str) -> Cow<'_, str> {
    replace(&KNOWN_TOKEN, text, |_, _| Some(MARKER.to_owned()))
}

// ---- key=value, key: value, "key": "value" ----------------------------------------------

/// A key that mentions a secret word, a separator, and a value: quoted (also JSON-escaped
/// quotes inside a JSON log line) or bare up to a delimiter. Whether the key really names a
/// secret is decided by [`key_class`]. A bare value starting with `[`, `{` or `*` is a
/// structure or already masked; one ends before `]` or `}` (the structure it sits in).
static KEY_VALUE: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r#"(?i)(?P<key>\\?["']?[A-Za-z0-9_.-]*(?:token|secret|passw|pwd|passphrase|api[_-]?key|private[_-]?key|credential|authorization|cookie|plaintext|signature|sig|access[_-]?key|account[_-]?key|auth|jwt)[A-Za-z0-9_.-]*\\?["']?)(?P<sep>[ \t]*[:=][ \t]*)(?P<value>\\"(?:[^"\\]|\\[^"])*\\"|"(?:[^"\\]|\\.)*"|'[^']*'|[^\s&;,"'<>\[{*\]}][^\s&;,"'<>\]}]*)"#,
    )
});

fn key_values(text: &str) -> Cow<'_, str> {
    key_values_with(text, false)
}

/// [`key_values`]; with `in_reference`, a pair keyed only by `secret`/`secrets` is a secret
/// manager's address (`secret:prod/cookie`, `secret=gateway/token`), not a value.
fn key_values_with(text: &str, in_reference: bool) -> Cow<'_, str> {
    replace(&KEY_VALUE, text, |text, caps| {
        let raw_key = group(caps, "key");
        let sep = group(caps, "sep");
        let value = group(caps, "value");
        let key = raw_key.trim_matches(['"', '\'', '\\']);
        let start = caps.name("key").map_or(0, |m| m.start());
        // `arn:aws:secretsmanager:...:secret:name` is a colon path (ARN, URN), not a pair.
        let colon_path = sep == ":" && text[..start].ends_with(':');
        let address = in_reference
            && key_words(key)
                .iter()
                .all(|w| w == "secret" || w == "secrets");
        if key_class(key) != KeyClass::Secret || colon_path || address {
            // Not a secret key, but its value may still hold a pair (`x:password=...`).
            return match key_values_with(value, in_reference) {
                Cow::Owned(inner) => Some(format!("{raw_key}{sep}{inner}")),
                Cow::Borrowed(_) => None,
            };
        }
        let (quote_open, inner, quote_close) = split_quotes(value);
        let unchanged = inner.is_empty()
            || inner == MARKER
            || inner == URL_PASSWORD_MASK
            || matches!(inner, "true" | "false" | "null" | "None");
        (!unchanged).then(|| format!("{raw_key}{sep}{quote_open}{MARKER}{quote_close}"))
    })
}

/// `"x"` → (`"`, `x`, `"`); `\"x\"` → (`\"`, `x`, `\"`); `x` → (``, `x`, ``).
fn split_quotes(value: &str) -> (&str, &str, &str) {
    for quote in ["\\\"", "\"", "'"] {
        if value.len() >= 2 * quote.len() && value.starts_with(quote) && value.ends_with(quote) {
            return (quote, &value[quote.len()..value.len() - quote.len()], quote);
        }
    }
    ("", value, "")
}

// ---- --password VALUE on command lines ------------------------------------------------

/// A command-line flag naming a secret, then its value after a space (`--password=...` is a
/// pair, handled above).
static CLI_FLAG: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r#"(?i)(?P<flag>(?:^|[\s'"])--?[A-Za-z0-9_-]*(?:token|secret|passw|pwd|passphrase|api[_-]?key|credential|auth)[A-Za-z0-9_-]*)(?P<sep>[ \t]+)(?P<value>"[^"]*"|'[^']*'|[^\s'"\[*-][^\s'"]*)"#,
    )
});

fn cli_flags(text: &str) -> Cow<'_, str> {
    if !text.contains('-') {
        return Cow::Borrowed(text);
    }
    replace(&CLI_FLAG, text, |_, caps| {
        let flag = group(caps, "flag");
        let value = group(caps, "value");
        let name = flag.trim_start_matches(|c: char| c.is_whitespace() || "'\"-".contains(c));
        let prose = BEARER_PROSE.contains(&value.to_ascii_lowercase().as_str());
        (key_class(name) == KeyClass::Secret && !prose && value != MARKER)
            .then(|| format!("{flag}{}{MARKER}", group(caps, "sep")))
    })
}

// ---- Long high-entropy strings after a secret word ---------------------------------------

/// A secret word, at most two short words, then a long token-like string: "the webhook
/// secret is 9f86d0...", "api key: Zm9vYmFy...".
static AFTER_SECRET_WORD: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r#"(?i)\b(?:token|secret|password|passphrase|passwd|api[ _-]?key|private[ _-]?key|access[ _-]?key|signing[ _-]?key|credential)s?\b(?P<gap>(?:[ \t:=>"'(,]+[A-Za-z0-9._-]{1,24}){0,2}?)(?P<sep>[ \t:=>"'(,]+)(?P<value>[A-Za-z0-9+/_-]{32,}={0,2})"#,
    )
});

/// Words between the secret word and the string that say the string is a digest or an id.
const NOT_A_SECRET: &[&str] = &[
    "sha256", "sha1", "sha512", "md5", "digest", "hash", "checksum", "id", "sum",
];

fn after_secret_words(text: &str) -> Cow<'_, str> {
    replace(&AFTER_SECRET_WORD, text, |_, caps| {
        let gap = group(caps, "gap");
        let value = group(caps, "value");
        let digest_or_id = key_words(gap)
            .iter()
            .any(|w| NOT_A_SECRET.contains(&w.as_str()));
        if digest_or_id || !high_entropy(value) {
            return None;
        }
        let whole = caps.get(0).map_or("", |m| m.as_str());
        let keep = &whole[..whole.len() - value.len()];
        Some(format!("{keep}{MARKER}"))
    })
}

/// Mixed letters and digits with at least 3 bits of entropy per character; a path (several
/// slashes, or a leading one) is not a key.
fn high_entropy(s: &str) -> bool {
    let letters = s.bytes().any(|b| b.is_ascii_alphabetic());
    let digits = s.bytes().any(|b| b.is_ascii_digit());
    let slashes = s.bytes().filter(|&b| b == b'/').count();
    if !letters || !digits || s.starts_with('/') || slashes > 3 {
        return false;
    }
    let mut freq = [0u32; 256];
    for b in s.bytes() {
        freq[b as usize] += 1;
    }
    let n = s.len() as f64;
    let bits: f64 = freq
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    bits >= 3.0
}

// ---- Email addresses ---------------------------------------------------------------------

static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| regex(r"\b[A-Za-z0-9._%+-]+@(?P<domain>(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})\b"));

fn emails(text: &str) -> Cow<'_, str> {
    if !text.contains('@') {
        return Cow::Borrowed(text);
    }
    replace(&EMAIL, text, |text, caps| {
        let start = caps.get(0).map_or(0, |m| m.start());
        // `postgres://rollcall@db.internal/state`: a user name in a URL, not an address.
        if text[..start].ends_with("//") {
            return None;
        }
        Some(format!("***@{}", group(caps, "domain")))
    })
}

// ---- Secret references -------------------------------------------------------------------

/// What a secret reference that holds a local path reads as in a report.
pub const LOCAL_PATH_WITHHELD: &str = "[local path withheld]";

/// A secret *reference* (its name, manager, reference, version or KMS key) made fit for a
/// report. References are names, not secrets: `cookie-secret`, `secret:prod/cookie` or an ARN
/// print as they are, where [`redact`] would take a `secret:`/`secret=` pair for a credential.
/// A local filesystem path anywhere in it ([`holds_local_path`]) withholds the whole reference
/// ([`LOCAL_PATH_WITHHELD`]): the runbook forbids local paths in reports. Credentials that
/// should never have been there still go: private keys, URL passwords and signed queries,
/// authorization headers, bearer and known-prefix tokens, `password=`/`token=` pairs, long
/// random strings after a secret word, email addresses.
pub fn redact_reference(text: &str) -> Cow<'_, str> {
    if holds_local_path(text) {
        return Cow::Owned(LOCAL_PATH_WITHHELD.to_owned());
    }
    const PASSES: [Pass; 8] = [
        pem_blocks,
        urls,
        authorization_headers,
        bearer_tokens,
        known_tokens,
        reference_key_values,
        after_secret_words,
        emails,
    ];
    let mut text = Cow::Borrowed(text);
    for pass in PASSES {
        text = apply(text, pass);
    }
    text
}

fn reference_key_values(text: &str) -> Cow<'_, str> {
    key_values_with(text, true)
}

/// [`redact_json`] for a document of secret references (the report's `secret_refs`): every
/// string passes [`redact_reference`], and a value under a key that names a secret
/// (`password`, `token`, ...) is still blanked.
pub fn redact_reference_json(value: &mut Value) {
    walk_with(value, false, &|s| redact_reference(s));
}

/// Directories and forms that only name a place on some machine's disk: `file:` URLs, home
/// directories, the usual system roots, `~/`, `./`, `../` and Windows drives. A path in a
/// secret manager's own namespace (`secret/data/prod/cookie`, `projects/p/secrets/s`, an SSM
/// parameter `/prod/app/cookie`) is not one.
pub fn holds_local_path(text: &str) -> bool {
    const ROOTS: &[&str] = &[
        "/home/",
        "/Users/",
        "/root/",
        "/etc/",
        "/var/",
        "/tmp/",
        "/opt/",
        "/srv/",
        "/run/",
        "/usr/",
        "/mnt/",
        "/media/",
        "/private/",
        "/Volumes/",
        "/proc/",
        "/dev/",
        "~/",
        "./",
        "../",
    ];
    if text.to_ascii_lowercase().contains("file:") {
        return true;
    }
    text.split(|c: char| c.is_whitespace() || "=;,:'\"()[]".contains(c))
        .chain(std::iter::once(text))
        .any(|part| {
            let bytes = part.as_bytes();
            let drive = bytes.len() >= 3
                && bytes[0].is_ascii_alphabetic()
                && bytes[1] == b':'
                && bytes[2] == b'\\';
            drive || ROOTS.iter().any(|root| part.starts_with(root))
        })
        || text.contains(":\\Users\\")
}

// ---- Local host paths ---------------------------------------------------------------------

/// A home directory in a local path: `/home/NAME/`, `/Users/NAME/`, `C:\Users\NAME\`. The user
/// name goes; the rest of the path stays readable.
static HOME_PATH: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?m)(?P<pre>(?:^|[\s'\x22(=:]|file://)(?:/home/|/Users/|[A-Za-z]:\\Users\\))(?P<user>[^/\\\s'\x22)]+)",
    )
});

fn home_paths(text: &str) -> Cow<'_, str> {
    if !(text.contains("/home/") || text.contains("/Users/") || text.contains("\\Users\\")) {
        return Cow::Borrowed(text);
    }
    replace(&HOME_PATH, text, |_, caps| {
        let user = group(caps, "user");
        (user != MARKER).then(|| format!("{}{MARKER}", group(caps, "pre")))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    /// Asserts the secret is gone and the expected text is what remains.
    #[track_caller]
    fn redacts(input: &str, expected: &str) {
        let out = redact(input);
        assert_eq!(out, expected, "redacting {input:?}");
        assert_eq!(
            redact(&out),
            out,
            "redacting twice changes nothing: {input:?}"
        );
    }

    #[track_caller]
    fn untouched(input: &str) {
        let out = redact(input);
        assert!(
            matches!(out, Cow::Borrowed(_)),
            "{input:?} must pass unchanged, got {out:?}"
        );
    }

    #[test]
    fn bearer_tokens_and_authorization_headers() {
        redacts(
            "Authorization: Bearer cws_operator_0123456789abcdef",
            "Authorization: [REDACTED]",
        );
        redacts(
            "GET /api/diagnostics\nauthorization: Basic YWxpY2U6aHVudGVyMg==\nhost: web",
            "GET /api/diagnostics\nauthorization: [REDACTED]\nhost: web",
        );
        redacts(
            "sent bearer abc.DEF-123_xyz to web-1",
            "sent bearer [REDACTED] to web-1",
        );
        redacts(
            r#"{"message":"retry with Authorization: Bearer s3cr3t-t0ken","level":"WARN"}"#,
            r#"{"message":"retry with Authorization: [REDACTED]","level":"WARN"}"#,
        );
        redacts(
            r#"{"authorization": "Bearer s3cr3t-t0ken"}"#,
            r#"{"authorization": "[REDACTED]"}"#,
        );
        redacts(
            "Proxy-Authorization: Digest x=1",
            "Proxy-Authorization: [REDACTED]",
        );
        // Prose about bearer tokens stays readable.
        untouched("the operator bearer token is read from a secret reference");
        untouched("Bearer authentication failed: 401 Unauthorized");
        untouched("authorization failed: status 403");
    }

    #[test]
    fn tokens_with_known_prefixes() {
        redacts(
            "smoke used cws_worker_3f2a9c01deadbeef3f2a9c01deadbeef3f2a9c01 and failed",
            "smoke used [REDACTED] and failed",
        );
        redacts("cws_operator_0000", "[REDACTED]");
        redacts(
            "GITHUB=ghp_AbCdEf0123456789AbCdEf0123456789abcd",
            "GITHUB=[REDACTED]",
        );
        redacts(
            "slack xoxb-123456789012-abcdefABCDEF posted",
            "slack [REDACTED] posted",
        );
        redacts(
            "key AKIAIOSFODNN7EXAMPLE in us-east-1",
            "key [REDACTED] in us-east-1",
        );
        redacts(
            "webhook signing uses whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw now",
            "webhook signing uses [REDACTED] now",
        );
        redacts(
            "id token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl end",
            "id token [REDACTED] end",
        );
        redacts("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "[REDACTED]");
    }

    #[test]
    fn key_value_pairs_in_text_json_toml_and_queries() {
        redacts(
            "connect failed token=abc123 retry=3",
            "connect failed token=[REDACTED] retry=3",
        );
        redacts("API_KEY=xyz987 ./run", "API_KEY=[REDACTED] ./run");
        redacts(
            "GET /hook?api_key=k-1&page=2&secret=s3 HTTP/1.1",
            "GET /hook?api_key=[REDACTED]&page=2&secret=[REDACTED] HTTP/1.1",
        );
        redacts(
            r#"{"user":"app","password":"hunter2","port":5432}"#,
            r#"{"user":"app","password":"[REDACTED]","port":5432}"#,
        );
        redacts(
            "password = \"hunter2\"\nhost = \"db\"",
            "password = \"[REDACTED]\"\nhost = \"db\"",
        );
        redacts("db_password: hunter2", "db_password: [REDACTED]");
        redacts(
            r#"{"message":"config has \"client_secret\":\"abc def\" in it"}"#,
            r#"{"message":"config has \"client_secret\":\"[REDACTED]\" in it"}"#,
        );
        redacts(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=bXlrZXk=;EndpointSuffix=core",
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=[REDACTED];EndpointSuffix=core",
        );
        redacts("accessToken: 'tok-1'", "accessToken: '[REDACTED]'");
        redacts(
            "plaintext=the-byok-key passed",
            "plaintext=[REDACTED] passed",
        );
        // A pair hiding behind a harmless key is still found.
        redacts("design:password=x1", "design:password=[REDACTED]");
        // References to secrets, flags and digests are not secrets.
        untouched("token_env=COWORK_OPERATOR_TOKEN password_file=/etc/rollcall/db");
        untouched(
            r#"{"token_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}"#,
        );
        untouched(r#"{"token_valid": true, "password": null}"#);
        untouched(
            "reference = arn:aws:secretsmanager:us-east-1:123456789012:secret:cowork/cookie-AbCdEf",
        );
    }

    #[test]
    fn secret_flags_on_command_lines() {
        redacts(
            "exec: pg_dump --password hunter2 --dbname cowork",
            "exec: pg_dump --password [REDACTED] --dbname cowork",
        );
        redacts(
            "cowork-sim smoke --operator-token 'abc 123' --web-url http://web",
            "cowork-sim smoke --operator-token [REDACTED] --web-url http://web",
        );
        redacts("tool -api-key k1", "tool -api-key [REDACTED]");
        untouched("rollcall agent --token-env COWORK_OPERATOR_TOKEN --password-file /run/pw");
        untouched("pass it with --token to the smoke command");
        untouched("rollcall drill --env prod --point latest --dry-run");
    }

    #[test]
    fn passwords_in_urls() {
        redacts(
            "connect to postgres://app:hunter2@db:5432/cowork?sslmode=require failed",
            "connect to postgres://app:***@db:5432/cowork?sslmode=require failed",
        );
        redacts("redis://:p4ss@cache:6379/0", "redis://:***@cache:6379/0");
        redacts(
            "(see https://x-access-token:ghs_x@github.com/o/r.git).",
            "(see https://x-access-token:***@github.com/o/r.git).",
        );
        untouched("postgres://rollcall@db.internal/state");
        untouched("sqlite:///var/lib/rollcall/state.db");
        untouched("GET https://cowork.example.com/api/workspace?page=2&limit=50 -> 200");
        untouched("s3://cowork-backups/prod/points/20261125T093740Z-prod-399b4d21.json");
        untouched(&repository::redact_url(
            "postgres://app:hunter2@db:5432/cowork?sslmode=require",
        ));
    }

    #[test]
    fn signed_urls_lose_their_query() {
        redacts(
            "download https://b.s3.amazonaws.com/k.dump?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261125&X-Amz-Signature=fe5f80f77d5fa3beca038a248ff027 now",
            "download https://b.s3.amazonaws.com/k.dump?[REDACTED] now",
        );
        redacts(
            "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=abc123",
            "https://storage.googleapis.com/b/o?[REDACTED]",
        );
        redacts(
            "\"https://acct.blob.core.windows.net/c/blob?sv=2022-11-02&se=2026-11-26T00%3A00Z&sp=r&sig=AbC%2Bd%3D\"",
            "\"https://acct.blob.core.windows.net/c/blob?[REDACTED]\"",
        );
        redacts(
            "az://container/prefix?sp=racwdl&se=2026-01-01",
            "az://container/prefix?[REDACTED]",
        );
    }

    #[test]
    fn private_keys_and_cookies() {
        redacts(
            "key:\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\nok",
            "key:\n[REDACTED]\nok",
        );
        redacts(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA (truncated",
            "[REDACTED]",
        );
        redacts(
            r#"{"pem":"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n"}"#,
            r#"{"pem":"[REDACTED]\n"}"#,
        );
        // Certificates are public.
        untouched("-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----");
        redacts(
            "Set-Cookie: cowork_session=9f8e7d6c; Path=/; HttpOnly",
            "Set-Cookie: [REDACTED]",
        );
        redacts(
            "> Cookie: a=1; b=2\n< HTTP/1.1 200",
            "> Cookie: [REDACTED]\n< HTTP/1.1 200",
        );
        redacts(
            r#"{"cookie_secret":"c00k1e"}"#,
            r#"{"cookie_secret":"[REDACTED]"}"#,
        );
    }

    #[test]
    fn email_addresses_keep_only_their_domain() {
        redacts(
            "follow-up owner alice.smith+ops@example.com by Friday",
            "follow-up owner ***@example.com by Friday",
        );
        redacts("mailto:bob@corp.io", "mailto:***@corp.io");
        untouched("pg_dump@16 and node@v20.1.0 and @scope/pkg");
    }

    #[test]
    fn long_high_entropy_strings_after_secret_words() {
        redacts(
            "the webhook secret is 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b now",
            "the webhook secret is [REDACTED] now",
        );
        redacts(
            "API key: Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdo",
            "API key: [REDACTED]",
        );
        // Digests and ids near a secret word stay.
        untouched("token sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        untouched("secret file at /var/lib/rollcall/secrets/cookie-secret-reference.toml");
    }

    #[test]
    fn ordinary_text_ids_and_digests_pass_unchanged() {
        for text in [
            "",
            "restore-postgres passed in 4m 12s: 3 of 3 agents succeeded",
            "point 20261125T093740Z-prod-399b4d21 verified: dump 1048576 bytes, 412 objects",
            "snapshot 20261125T093000Z-3f2a9c01 restored into rollcall-quarantine/r1a2b3c4d",
            "sha256=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            r#"{"key":"postgres/20261125T093740Z-prod-399b4d21.dump","sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}"#,
            "channel_deliveries[status=pending]: 12 → 12",
            "secret references: cookie-secret (vault, version 3)",
            "Passwords and tokens never appear in reports.",
            "GET http://127.0.0.1:8080/readyz returned 200",
            "phase scale-to-zero: worker 2 → 0, scheduler 1 → 0",
        ] {
            untouched(text);
        }
    }

    #[test]
    fn key_classes() {
        for key in [
            "password",
            "DB_PASSWORD",
            "apiKey",
            "x-api-key",
            "X-Amz-Signature",
            "client_secret",
            "AccountKey",
            "id_token",
            "authtoken",
            "private_key",
            "plaintext",
            "credentials",
            "Cookie",
        ] {
            assert_eq!(key_class(key), KeyClass::Secret, "{key}");
        }
        for key in [
            "token_env",
            "password_file",
            "secret_refs",
            "token_sha256",
            "kms_key",
            "name",
            "sha256",
        ] {
            assert_eq!(key_class(key), KeyClass::Reference, "{key}");
        }
        for key in ["key", "sessions", "passed", "design", "signal", "url"] {
            assert_eq!(key_class(key), KeyClass::Plain, "{key}");
        }
    }

    #[test]
    fn json_values_under_secret_keys_are_blanked() {
        let mut doc = json!({
            "headers": { "Authorization": "Bearer abc", "accept": "application/json" },
            "db": { "password": 123456, "user": "app", "url": "postgres://app:pw@db/app" },
            "token": { "value": "tok", "id": "t-1" },
            "api_keys": ["k1", "k2"],
            "token_env": "COWORK_OPERATOR_TOKEN",
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "secrets": [{
                "name": "cookie-secret",
                "manager": "vault",
                "reference": "secret/data/cowork/cookie",
                "version": "3",
                "kms_key": "arn:aws:kms:us-east-1:123456789012:key/abcd",
                "value": "oops-plaintext",
            }],
            "message": "retry with cws_operator_0000 for alice@example.com",
            "ok": true,
            "empty_secret": "",
        });
        redact_json(&mut doc);
        assert_eq!(
            doc,
            json!({
                "headers": { "Authorization": "[REDACTED]", "accept": "application/json" },
                "db": { "password": "[REDACTED]", "user": "app", "url": "postgres://app:***@db/app" },
                "token": { "value": "[REDACTED]", "id": "t-1" },
                "api_keys": ["[REDACTED]", "[REDACTED]"],
                "token_env": "COWORK_OPERATOR_TOKEN",
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "secrets": [{
                    "name": "cookie-secret",
                    "manager": "vault",
                    "reference": "secret/data/cowork/cookie",
                    "version": "3",
                    "kms_key": "arn:aws:kms:us-east-1:123456789012:key/abcd",
                    "value": "[REDACTED]",
                }],
                "message": "retry with [REDACTED] for ***@example.com",
                "ok": true,
                "empty_secret": "",
            })
        );
        let once = doc.clone();
        redact_json(&mut doc);
        assert_eq!(doc, once, "redacting twice changes nothing");
    }

    #[test]
    fn user_names_in_home_paths() {
        redacts(
            "read /home/alice/.config/rollcall/token failed",
            "read /home/[REDACTED]/.config/rollcall/token failed",
        );
        redacts(
            "repository file:///Users/bob/backups",
            "repository file:///Users/[REDACTED]/backups",
        );
        redacts(
            r"open C:\Users\carol\rollcall.toml",
            r"open C:\Users\[REDACTED]\rollcall.toml",
        );
        untouched("state in /var/lib/rollcall/state.db and /tmp/x/home/y");
    }

    /// Every planted secret disappears from a mixed document, whatever form it takes.
    #[test]
    fn corpus_leaves_no_secret_behind() {
        let planted = [
            "hunter2",
            "cws_operator_9f8e7d6c5b4a",
            "s3cr3t-t0ken",
            "fe5f80f77d5fa3beca038a",
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
            "c00k1e-val",
            "whsec_MfKQ9r8GKYqrTwjUPD8I",
            "alice.smith",
            "AKIAIOSFODNN7EXAMPLE",
            "byok-plaintext-value",
            "/home/dave",
        ];
        let corpus = "\
            2026-11-25T10:00:00Z WARN connect postgres://app:hunter2@db/app failed\n\
            exec output: using token cws_operator_9f8e7d6c5b4a\n\
            curl -H 'Authorization: Bearer s3cr3t-t0ken' https://web/api\n\
            url https://b.s3.amazonaws.com/k?X-Amz-Signature=fe5f80f77d5fa3beca038a&X-Amz-Date=1\n\
            -----BEGIN RSA PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END RSA PRIVATE KEY-----\n\
            Set-Cookie: sid=c00k1e-val; Secure\n\
            webhook whsec_MfKQ9r8GKYqrTwjUPD8I\n\
            owner alice.smith@example.com\n\
            aws AKIAIOSFODNN7EXAMPLE\n\
            {\"plaintext\": \"byok-plaintext-value\"}\n\
            config /home/dave/rollcall/agent.toml\n";
        let out = redact(corpus);
        for secret in planted {
            assert!(!out.contains(secret), "{secret} leaked:\n{out}");
        }
        assert!(out.contains("2026-11-25T10:00:00Z WARN connect postgres://app:***@db/app failed"));
        assert_eq!(redact(&out), out);
    }

    #[test]
    fn secret_references_are_names_but_local_paths_are_withheld() {
        for reference in [
            "cookie-secret",
            "stripe-webhook-secret",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/cookie",
            "secret:prod/stripe-webhook",
            "secret=gateway/service-token",
            "secret/data/cowork/cookie",
            "projects/cowork/secrets/oidc-client-secret/versions/3",
            "/prod/app/cookie",
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd",
        ] {
            assert_eq!(redact_reference(reference), reference);
        }
        for local in [
            "/home/alice/secrets/x",
            "/etc/app/secret.key",
            "file:///var/lib/app/secrets/billing.enc",
            "sops:/var/lib/app/secrets.enc",
            "~/secrets/cookie",
            r"C:\Users\carol\secret.txt",
        ] {
            assert_eq!(redact_reference(local), LOCAL_PATH_WITHHELD, "{local}");
        }
        // A credential pasted where a reference belongs still goes.
        assert_eq!(
            redact_reference("vault://app:hunter2@vault.internal/v1/secret/cookie"),
            "vault://app:***@vault.internal/v1/secret/cookie"
        );
        assert_eq!(redact_reference("token=s3cr3t-t0ken"), "token=[REDACTED]");
        assert_eq!(
            redact_reference("password: hunter2"),
            "password: [REDACTED]"
        );
        assert_eq!(redact_reference("whsec_MfKQ9r8GKYqrTwjUPD8I"), MARKER);
        let mut doc = json!([{ "name": "cookie-secret", "reference": "secret:prod/cookie",
                               "password": "oops-plaintext", "path": "/etc/app/cookie" }]);
        redact_reference_json(&mut doc);
        assert_eq!(
            doc,
            json!([{ "name": "cookie-secret", "reference": "secret:prod/cookie",
                     "password": MARKER, "path": LOCAL_PATH_WITHHELD }])
        );
    }
}
