//! The operator's output on standard output. `println!` panics when the reader has gone away
//! (`rollcall runs | head -1`); here a closed pipe ends the command quietly, as it ends other
//! command-line tools, and any other write error is reported as an error, not a panic.

use std::io::Write;

/// Writes `args` (and a newline when `newline`) to standard output; see the module docs.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) {
    if let Err(e) = put(args, newline) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // The reader has all it wanted.
            std::process::exit(0);
        }
        eprintln!("error: write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Like [`write`], for a command that must run to its end whoever reads it (`rollcall demo`
/// stops the processes it started when it ends): a write error only drops the text.
pub fn write_or_drop(args: std::fmt::Arguments<'_>, newline: bool) {
    let _ = put(args, newline);
}

fn put(args: std::fmt::Arguments<'_>, newline: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    if newline {
        out.write_all(b"\n")?;
    }
    out.flush()
}
