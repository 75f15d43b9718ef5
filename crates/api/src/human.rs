//! Quantities written for people: byte sizes in binary units, one way for every report and
//! listing.

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

#[cfg(test)]
mod tests {
    use super::*;

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
