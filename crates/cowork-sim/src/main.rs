//! The `cowork-sim` binary; the command line lives in the library (`cowork_sim::cli`).

fn main() -> std::process::ExitCode {
    cowork_sim::cli::main_with_args(std::env::args_os())
}
