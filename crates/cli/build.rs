//! Link-time settings for the `rollcall` binary.

fn main() {
    // Pack the executable's relative relocations (DT_RELR, glibc >= 2.36): the binary stays
    // position-independent, but the loader no longer reads ~1.4 MB of relocation records at
    // start-up, which an idle agent would otherwise keep resident.
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|env| env == "gnu");
    if linux_gnu {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
