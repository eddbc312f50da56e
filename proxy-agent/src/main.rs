//! Entry point: parse the command line, set up logging, run the subcommand.
use std::io::IsTerminal;

use clap::Parser;
use proxy_agent::{
    cli::{Cli, Command, LogFormat},
    commands,
};
use tracing_subscriber::EnvFilter;

fn init_logging(cli: &Cli) {
    let default = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli);
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(commands::run(args)),
        Command::Render(args) => commands::render(&args),
        Command::Cleanup(args) => commands::cleanup(&args),
        Command::Trace(args) => commands::trace(&args),
        Command::Dump(args) => proxy_agent::debug::dump(&args),
        Command::Monitor(args) => proxy_agent::debug::monitor::run(&args),
    }
}
