//! Quantities written for people: byte sizes in binary units and clock offsets, one way for
//! every report and listing.

/// The binary units a size is written in; anything past TiB stays in TiB.
const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// `n` bytes for people: whole bytes below 1 KiB (`512 B`), else the largest binary unit that
/// keeps the figure at 1 or more, with one decimal (`12.0 MiB`). Callers that must show the
/// exact count add it themselves.
pub fn bytes(n: u64) -> String {
    // f64 is exact up to 2^53 bytes (8 PiB), and one decimal is all that is shown.
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An agent clock further than this (milliseconds) from the coordinator's is warned about, in
/// the coordinator's log and by `rollcall agents`. Commands do not depend on it (they carry
/// durations), but logs, traces, reports and point stamps of several machines only line up when
/// the clocks agree.
pub const CLOCK_OFFSET_WARN_MS: i64 = 5_000;

/// A clock's offset from the coordinator's in words, rounded up to the second:
/// `10m ahead of`, `1m 30s behind`, `0s ahead of`.
pub fn clock_offset(offset_ms: i64) -> String {
    let secs = offset_ms.unsigned_abs().div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut parts = Vec::new();
    if h > 0 {
        parts.push(format!("{h}h"));
    }
    if m > 0 {
        parts.push(format!("{m}m"));
    }
    if s > 0 || parts.is_empty() {
        parts.push(format!("{s}s"));
    }
    let side = if offset_ms >= 0 { "ahead of" } else { "behind" };
    format!("{} {side}", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_offsets_read_as_ahead_or_behind() {
        assert_eq!(clock_offset(600_000), "10m ahead of");
        assert_eq!(clock_offset(-90_000), "1m 30s behind");
        assert_eq!(clock_offset(-1_500), "2s behind");
        assert_eq!(clock_offset(0), "0s ahead of");
        assert_eq!(clock_offset(3_600_000 + 1), "1h 1s ahead of");
    }

    #[test]
    fn sizes_walk_the_binary_units() {
        for (n, shown) in [
            (0, "0 B"),
            (1, "1 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (12_582_912, "12.0 MiB"),
            (3 * 1024 * 1024 * 1024, "3.0 GiB"),
            (1 << 40, "1.0 TiB"),
            // Past the last unit the figure grows instead.
            (1 << 50, "1024.0 TiB"),
            (u64::MAX, "16777216.0 TiB"),
        ] {
            assert_eq!(bytes(n), shown, "{n} bytes");
        }
    }

    #[test]
    fn one_decimal_rounds_to_nearest() {
        // 1.25 KiB rounds to even, 1.96 KiB up; a size just under the next unit reads as 1024.0
        // of the smaller one rather than jumping a unit.
        assert_eq!(bytes(1280), "1.2 KiB");
        assert_eq!(bytes(2007), "2.0 KiB");
        assert_eq!(bytes(1024 * 1024 - 1), "1024.0 KiB");
    }
}
