//! The `bluetick` binary: parses the command line and runs it (see `bluetick_cli`).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    bluetick_cli::init_logging();
    let cli = bluetick_cli::Cli::parse();
    match bluetick_cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", bluetick_cli::describe_error(&error));
            ExitCode::FAILURE
        }
    }
}
