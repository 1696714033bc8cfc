use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use imagentx_sandbox::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server says what it does; one-shot commands only warn.
    let default = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Logs go to stderr so that stdout carries only the report.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    imagentx_sandbox::cli::main(cli)
}
