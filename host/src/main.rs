//! The `switchyard` binary: parses the command line and hands it to the library.

use std::process::ExitCode;

use clap::Parser;
use switchyard_host::cli::{self, Cli};
use switchyard_host::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = telemetry::init(cli.log_format, cli.telemetry().export().as_ref());
    let code = match cli::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
