//! Errors rendered for people: one line, each cause once, server bodies condensed.
//!
//! object_store's errors repeat their sources in their own text, and S3 and Azure answer with
//! multi-line XML bodies; `{:#}` of such a chain prints the same body four times over several
//! lines. `one_line` prints what an operator needs: each distinct cause once, an XML error
//! body as its `Code: Message`.

use std::error::Error;

/// Several problems found at once (every mistake in a plan file, say): shown one per line,
/// never run together, by [`one_line`] too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl Error for Problems {}

/// The error and its causes on one line, outermost first, a cause skipped when the text so
/// far already says it. A [`Problems`] cause is the exception: each of its problems gets a
/// line of its own, indented under the rest.
pub fn one_line(error: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        if let Some(Problems(list)) = cause.downcast_ref::<Problems>() {
            for problem in list {
                text.push_str("\n  ");
                text.push_str(&condense(problem));
            }
            next = cause.source();
            continue;
        }
        let part = condense(&cause.to_string());
        if !part.is_empty() && !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        next = cause.source();
    }
    if let Some(hint) = metadata_hint(&text) {
        text.push_str(hint);
    }
    text
}

/// Object store clients without credentials in the environment fall back to the cloud's
/// instance metadata service; off that cloud the request fails with nothing that says why.
fn metadata_hint(text: &str) -> Option<&'static str> {
    if text.contains("169.254.169.254/latest/") {
        Some(
            " (no AWS credentials in the environment, so the EC2 instance metadata service was \
             asked: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance \
             role applies)",
        )
    } else if text.contains("/computeMetadata/") {
        Some(
            " (no Google credentials in the environment, so the GCE metadata server was asked: \
             set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or run where a \
             service account applies)",
        )
    } else {
        None
    }
}

/// One line of `text`: XML error bodies become `Code: first line of Message`, and runs of
/// whitespace (newlines included) become one space.
pub fn condense(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<?xml") {
        out.push_str(&rest[..start]);
        let body = &rest[start..];
        let Some(end) = body.find("</Error>") else {
            // Not an error body we understand: keep it, flattened.
            out.push_str(body);
            rest = "";
            break;
        };
        let body_end = end + "</Error>".len();
        out.push_str(&xml_error(&body[..body_end]));
        rest = &body[body_end..];
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn xml_error(body: &str) -> String {
    let tag = |name: &str| -> Option<&str> {
        let open = format!("<{name}>");
        let from = body.find(&open)? + open.len();
        let to = body[from..].find(&format!("</{name}>"))? + from;
        Some(body[from..to].trim())
    };
    let code = tag("Code").unwrap_or("error");
    // Azure appends request id and time on lines of their own: the first line says it.
    match tag("Message").and_then(|m| m.lines().next()) {
        Some(message) if !message.trim().is_empty() => format!("{code}: {}", message.trim()),
        _ => code.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(String, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    const AZURE_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n\
        <Error>\n  <Code>ContainerNotFound</Code>\n  <Message>The specified container does not \
        exist.\nRequestId:67389b95\nTime:2026-11-26T13:59:45.601Z</Message>\n</Error>";

    #[test]
    fn problems_get_a_line_each_under_their_context() {
        let error = anyhow::Error::new(Problems(vec![
            "plan.toml:3: phase a: no gate;  set gate = \"all\"".into(),
            "plan.toml:9: phase b: no timeout; set timeout = \"10m\"".into(),
        ]))
        .context("rollcall.toml: [environments.prod] plan");
        assert_eq!(
            one_line(&*error),
            "rollcall.toml: [environments.prod] plan\n  plan.toml:3: phase a: no gate; set gate = \
             \"all\"\n  plan.toml:9: phase b: no timeout; set timeout = \"10m\""
        );
    }

    #[test]
    fn a_repeating_chain_with_an_xml_body_is_one_short_line() {
        let inner = format!("Server returned non-2xx status code: 404 Not Found: {AZURE_BODY}");
        let middle = format!("Error performing GET http://h/c in 4ms - {inner}");
        let outer =
            format!("Generic MicrosoftAzure error: Error performing list request: {middle}");
        let error = Layer(
            "repository az://c/x is unreachable".into(),
            Some(Box::new(Layer(
                outer,
                Some(Box::new(Layer(middle, Some(Box::new(Layer(inner, None)))))),
            ))),
        );
        let line = one_line(&error);
        assert_eq!(
            line,
            "repository az://c/x is unreachable: Generic MicrosoftAzure error: Error performing \
             list request: Error performing GET http://h/c in 4ms - Server returned non-2xx \
             status code: 404 Not Found: ContainerNotFound: The specified container does not \
             exist."
        );
    }

    #[test]
    fn plain_chains_keep_every_distinct_cause() {
        let error = Layer(
            "open /etc/x".into(),
            Some(Box::new(Layer("permission denied".into(), None))),
        );
        assert_eq!(one_line(&error), "open /etc/x: permission denied");
        assert_eq!(condense("a\n  b\tc"), "a b c");
        assert_eq!(
            condense("x <?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error> y"),
            "x NoSuchKey y"
        );
        assert_eq!(condense("<?xml unterminated"), "<?xml unterminated");
    }

    #[test]
    fn a_metadata_service_fallback_says_which_credentials_are_missing() {
        let aws = Layer(
            "list the live store s3://bucket: Error performing PUT \
             http://169.254.169.254/latest/api/token: 403 Forbidden"
                .into(),
            None,
        );
        assert!(one_line(&aws).ends_with(
            "(no AWS credentials in the environment, so the EC2 instance metadata service was \
             asked: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance \
             role applies)"
        ));
        let gcs = Layer(
            "Error performing GET http://169.254.169.254/computeMetadata/v1/instance/token".into(),
            None,
        );
        assert!(one_line(&gcs).contains("set GOOGLE_APPLICATION_CREDENTIALS"));
        let other = Layer("connection refused".into(), None);
        assert_eq!(one_line(&other), "connection refused");
    }
}
