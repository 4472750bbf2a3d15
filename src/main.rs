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

/// The async runtime, with `worker_threads` workers; 0 means one per available core (as the
/// CPU affinity and cgroup quota allow).
///
/// What matters here is the order in which ready tasks (connections) are polled, since under
/// overload that order is each request's wait. tokio's multi-thread scheduler keeps up to
/// 256 ready tasks in a worker's local queue and moves the newest half to the shared queue
/// when it is full, as it is with 1,000 busy connections per worker. No setting serves both
/// queues in turn: looking at the shared queue first on every poll (an interval of 1, our
/// setting until session 14) left the 128 oldest local tasks unpolled for as long as the
/// shared queue never emptied, seconds under load; tokio's default interval leaves the
/// shared queue's tasks waiting tens of thousands of polls. So:
/// - with one worker, the current-thread scheduler, whose queue is one unbounded FIFO:
///   every ready connection is polled once per round, as nginx's event loop does;
/// - with several, the multi-thread scheduler looking at the shared queue every other poll,
///   which bounds a task's wait at about twice the number of ready tasks.
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    };
    let mut builder = if workers == 1 { tokio::runtime::Builder::new_current_thread() } else { multi_thread(workers) };
    builder.enable_all().build().context("cannot start the async runtime")
}

fn multi_thread(workers: usize) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).global_queue_interval(2);
    builder
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// More ready tasks than a multi-thread worker's local queue holds (256), as with 1,000
    /// busy keep-alive connections.
    const TASKS: u64 = 1_000;
    /// How many times each task is polled, on average, before a run ends.
    const ROUNDS: u64 = 100;

    /// How a task that is always ready gets back in the run queue after each poll.
    #[derive(Clone, Copy)]
    enum Wake {
        /// Woken by the I/O driver, as a connection is: it drains its socket, then writes a
        /// byte that makes the socket readable again.
        Io,
        /// Yields, as tokio's cooperative budget makes a busy task do: woken when the worker
        /// next looks for I/O, not by the driver.
        Yield,
    }

    /// Runs `TASKS` always-ready tasks on `runtime` and returns the longest any of them sat
    /// through the polls of others between two of its own: what a request held in the run
    /// queue waits, counted in polls rather than time. A fair order makes it about `TASKS`.
    fn longest_wait(runtime: &tokio::runtime::Runtime, wake: Wake) -> u64 {
        let polls = Arc::new(AtomicU64::new(0));
        let longest = Arc::new(AtomicU64::new(0));
        runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..TASKS {
                let (polls, longest) = (Arc::clone(&polls), Arc::clone(&longest));
                let (mut tx, rx) = tokio::net::UnixStream::pair().expect("socket pair");
                tasks.spawn(async move {
                    let mut last = polls.load(Ordering::Relaxed);
                    let mut buf = [0u8; 64];
                    loop {
                        match wake {
                            Wake::Io => {
                                tokio::io::AsyncWriteExt::write_all(&mut tx, b"x").await.expect("write");
                                rx.readable().await.expect("readable");
                                while rx.try_read(&mut buf).is_ok_and(|n| n > 0) {}
                            }
                            Wake::Yield => tokio::task::yield_now().await,
                        }
                        let now = polls.fetch_add(1, Ordering::Relaxed);
                        longest.fetch_max(now - last, Ordering::Relaxed);
                        last = now;
                        if now >= TASKS * ROUNDS {
                            return;
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
        longest.load(Ordering::Relaxed)
    }

    /// Asserts that no task waited `limit` polls of others or more, however it was woken.
    fn assert_waits_under(runtime: &tokio::runtime::Runtime, limit: u64) {
        for (wake, what) in [(Wake::Io, "connection woken by I/O"), (Wake::Yield, "task that yielded")] {
            let longest = longest_wait(runtime, wake);
            assert!(
                longest < limit,
                "a ready {what} waited {longest} polls of others for its turn, with {TASKS} ready"
            );
        }
    }

    /// One worker polls the ready tasks round by round: none waits much more than one round.
    #[test]
    fn one_worker_polls_every_ready_task_once_a_round() {
        assert_waits_under(&super::runtime(1).expect("runtime"), TASKS + TASKS / 2);
    }

    /// Several workers share out their queues by stealing, which a test on a busy 2-core
    /// machine cannot time; one worker of the same scheduler shows the order it keeps.
    #[test]
    fn the_multi_thread_scheduler_polls_every_ready_task_in_turn() {
        assert_waits_under(&super::multi_thread(1).enable_all().build().expect("runtime"), 3 * TASKS);
    }
}
