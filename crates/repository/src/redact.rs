//! URLs fit for messages and logs: Rollcall's one `redact_url`, for repository, object store
//! and database URLs alike (the agents, the coordinator's state store and the CLI call it).

/// What a URL's password and each query value become. `api::redact` masks URL passwords with
/// the same text and leaves a masked one alone.
pub const URL_PASSWORD_MASK: &str = "***";

/// `url` fit for messages and logs:
///
/// * a password becomes `***` (`postgres://app:***@db/app`); the user name stays;
/// * each query parameter keeps its name and loses its value (`?sslmode=***&sig=***`): a SAS
///   token or signature never shows, and a reader still sees which parameters were given. A
///   parameter without `=` is masked whole, since it may be a bare token; so is a fragment;
/// * a local path (`/srv/backups`, `./backups`, `../backups`) is shown as given: it carries no
///   credentials and names what the operator wrote;
/// * anything else that does not parse shows only its shape, `<unparseable URL>`: it might be
///   anything, a secret included.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Refused only for URLs that cannot carry a password, and this one has one.
                let _ = parsed.set_password(Some(URL_PASSWORD_MASK));
            }
            if let Some(query) = parsed.query() {
                let masked = mask_query(query);
                parsed.set_query(Some(&masked));
            }
            if parsed.fragment().is_some() {
                parsed.set_fragment(Some(URL_PASSWORD_MASK));
            }
            parsed.to_string()
        }
        Err(_) if url.starts_with('/') || url.starts_with("./") || url.starts_with("../") => {
            url.to_owned()
        }
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// `a=1&b&c=3` → `a=***&***&c=***`.
fn mask_query(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) => format!("{name}={URL_PASSWORD_MASK}"),
            None => URL_PASSWORD_MASK.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_user_names_kept() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(
            redact_url("redis://:p4ss@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        // An '@' in the password is still the password's.
        assert_eq!(
            redact_url("postgres://app:p@ss@db/app"),
            "postgres://app:***@db/app"
        );
        assert_eq!(
            redact_url("postgres://rollcall@db/state"),
            "postgres://rollcall@db/state"
        );
        // Redacting twice changes nothing.
        assert_eq!(
            redact_url("postgres://app:***@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
    }

    #[test]
    fn query_values_are_masked_and_names_kept() {
        assert_eq!(
            redact_url("postgres://rollcall:s3cret@db:5432/state?sslmode=require"),
            "postgres://rollcall:***@db:5432/state?sslmode=***"
        );
        assert_eq!(
            redact_url("az://container/prefix?sv=2022-11-02&se=2026-11-26&sp=r&sig=AbC%2Bd%3D"),
            "az://container/prefix?sv=***&se=***&sp=***&sig=***"
        );
        assert_eq!(
            redact_url("postgresql://app@h/db?password=pw&application_name=x"),
            "postgresql://app@h/db?password=***&application_name=***"
        );
        // A bare parameter may be a token; empty ones are dropped.
        assert_eq!(
            redact_url("https://h/p?tok3n&&a=1"),
            "https://h/p?***&a=***"
        );
        assert_eq!(
            redact_url("https://h/cb#access_token=abc"),
            "https://h/cb#***"
        );
    }

    #[test]
    fn local_paths_show_and_other_input_shows_only_its_shape() {
        assert_eq!(
            redact_url("sqlite:///var/lib/rollcall/state.db"),
            "sqlite:///var/lib/rollcall/state.db"
        );
        // An '@' in the path is not userinfo.
        assert_eq!(redact_url("sqlite:///tmp/a@b.db"), "sqlite:///tmp/a@b.db");
        assert_eq!(redact_url("sqlite:state.db"), "sqlite:state.db");
        assert_eq!(
            redact_url("file:///srv/backups/cowork"),
            "file:///srv/backups/cowork"
        );
        assert_eq!(redact_url("/srv/backups"), "/srv/backups");
        assert_eq!(redact_url("./backups"), "./backups");
        assert_eq!(redact_url("../backups"), "../backups");
        assert_eq!(redact_url("not a url hunter2"), "<unparseable URL>");
        assert_eq!(redact_url("postgres://u:hunter2@[bad"), "<unparseable URL>");
    }
}
