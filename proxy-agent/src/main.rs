//! Entry point: parse the command line, set up logging, run the subcommand.
use std::io::IsTerminal;

use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
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

/// One malloc arena for the whole agent, and a fixed mmap threshold. glibc gives each
/// thread that allocates its own arena, and an arena never shrinks below the highest
/// chunk still in use: the watchers decode on the runtime's workers and the sync thread
/// builds on its own, so each arena peaked on its own and the agent's RSS was about
/// three times its live heap (109 against 38 MiB at 10 000 Services). The threshold
/// stays at 128 KiB rather than rising to the largest buffer freed (glibc's default),
/// so list pages' buffers go back to the kernel instead of into the heap. Called before
/// any thread starts.
fn tune_allocator() {
    #[allow(
        unsafe_code,
        reason = "mallopt takes two integers and has no memory-safety preconditions; \
                  glibc has no safe interface to these settings"
    )]
    // SAFETY: plain integer options, set before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Fills the `run` flags the command line (or the environment) left unset from
/// `--config`, naming what the file sets that the agent does not act on.
fn apply_config(cli: &mut Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let (Command::Run(args), Some(run)) = (&mut cli.command, matches.subcommand_matches("run"))
    else {
        return Ok(());
    };
    let Some(path) = args.config.clone() else {
        return Ok(());
    };
    let settings = proxy_agent::config::load(&path)?;
    settings.apply(args, |id| {
        run.value_source(id)
            .is_some_and(|source| source != ValueSource::DefaultValue)
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(&cli);
    apply_config(&mut cli, &matches)?;
    match cli.command {
        Command::Run(args) => {
            tune_allocator();
            run(*args)
        }
        Command::Render(args) => commands::render(&args),
        Command::Cleanup(args) => commands::cleanup(&args),
        Command::Trace(args) => commands::trace(&args),
        Command::Dump(args) => proxy_agent::debug::dump(&args),
        Command::Monitor(args) => proxy_agent::debug::monitor::run(&args),
    }
}

fn run(args: proxy_agent::cli::RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(commands::run(args))
}
