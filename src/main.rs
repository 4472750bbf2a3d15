//! The `switchyard` binary: command line, logging, runtime and exit codes. Everything else
//! lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Reverse proxy and traffic-shifting sidecar for agent containers")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Json, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(short, long, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Validate a config: exit 0 with a summary, or 1 with every error.
    Check {
        #[arg(short, long, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Talk to a running switchyard over its admin socket.
    Ctl {
        /// The admin socket; default: the config's `admin.socket` with -c, else run/switchyard.sock.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Read the socket path from this config.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
        /// The verb and its words: status [ROUTE] | set-weights ROUTE BACKEND=PCT... |
        /// rollback ROUTE [REASON] | promote ROUTE | pause ROUTE | resume ROUTE | reload |
        /// events [N] | drain TARGET [--deadline DUR] [--wait] | undrain TARGET |
        /// mirror-report ROUTE
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Show the whole job on this machine: example agents, the proxy, traffic.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => {
            init_logging(cli.log_format, "info");
            report(run(&config))
        }
        Command::Ctl { socket, config, json, words } => ctl(socket, config, json, &words),
        Command::Demo => {
            init_logging(LogFormat::Text, "warn");
            report(demo())
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each said once: switchyard's own messages already name the
/// error they come from ("cannot listen on …: Address in use"), which `{:#}` would repeat.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match switchyard::config::load(path) {
        Ok(checked) => {
            for w in &checked.warnings {
                eprintln!("{}:{w} (warning)", path.display());
            }
            println!("{}: ok: {}", path.display(), checked.config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{}: {} error{}",
                path.display(),
                errors.errors.len(),
                if errors.errors.len() == 1 { "" } else { "s" }
            );
            ExitCode::FAILURE
        }
    }
}

fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    // Fairness between connections. A worker keeps the tasks it wakes in a local queue of
    // 256; when more are ready at once (1,000 busy keep-alive clients), half of the queue
    // overflows to the shared queue, which by default is looked at only every few dozen
    // polls, while the tasks left local are woken and polled again and again. Looking at
    // the shared queue first, on every poll, serves the overflow in its turn: at 1,000
    // connections the p99 fell from about 275 ms to 75–145 ms (`benches/load.sh`), with
    // no change at 50 connections, where the queue never overflows.
    builder.global_queue_interval(1);
    builder.enable_all().build().context("cannot start the async runtime")
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let checked = switchyard::config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in &checked.warnings {
        tracing::warn!(warning = %w, "config");
    }
    let config = checked.config;
    runtime(config.runtime.worker_threads)?.block_on(async move {
        let running = switchyard::app::start(config, Some(path.to_path_buf())).await?;
        wait_for_signal().await?;
        tokio::select! {
            () = running.shutdown() => Ok(()),
            second = wait_for_signal() => {
                second?;
                anyhow::bail!("second signal during shutdown: exiting at once, requests in flight are cut")
            }
        }
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

fn ctl(socket: Option<PathBuf>, config: Option<PathBuf>, json: bool, words: &[String]) -> ExitCode {
    // `ctl status --json` as well as `ctl --json status`: a last word "--json" is the flag
    // (earlier ones may be part of a rollback's free-text reason).
    let (json, words) = match words.split_last() {
        Some((last, rest)) if last == "--json" => (true, rest),
        _ => (json, words),
    };
    if words.is_empty() {
        eprintln!("switchyard ctl: give a verb, e.g. status");
        return ExitCode::FAILURE;
    }
    let socket = match (socket, config) {
        (Some(socket), _) => socket,
        // Leniently: ctl is most needed when the config on disk was just refused.
        (None, Some(config)) => match socket_from(&config) {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("switchyard ctl: {}: {e}", config.display());
                return ExitCode::FAILURE;
            }
        },
        (None, None) => PathBuf::from("run/switchyard.sock"),
    };
    let answer = match runtime(1).and_then(|rt| Ok(rt.block_on(switchyard::admin::ctl::request(&socket, words))?)) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("switchyard ctl: {}", describe(&e));
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{answer}");
    } else {
        print!("{}", switchyard::admin::ctl::render(&words[0], &answer));
    }
    if switchyard::admin::is_ok(&answer) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `admin.socket` from a config file, read without validating the rest.
fn socket_from(config: &std::path::Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(config)?;
    let table: toml::Table = toml::from_str(&text)?;
    let socket =
        table.get("admin").and_then(|a| a.get("socket")).and_then(|s| s.as_str()).unwrap_or("run/switchyard.sock");
    Ok(PathBuf::from(socket))
}

fn demo() -> anyhow::Result<()> {
    Ok(runtime(0)?.block_on(switchyard::demo::run(&mut std::io::stdout()))?)
}
