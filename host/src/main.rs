//! The `waft` binary: parse the command line, hand it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    waft::cli::run(waft::cli::Cli::parse())
}
