//! `orchestrator`: one binary, many shapes.
//!
//! - `orchestrator up` runs every service and the gateway in one process.
//! - `orchestrator serve <service>` runs one of them.
//! - `orchestrator staging-check` runs the staging checks and prints the verdict.
//! - `orchestrator health <service>` asks a service on this host whether it serves (the
//!   container healthcheck of deploy/compose.yaml).
//! - `orchestrator item ...` creates, lists, shows, approves, retries and cancels work items.
//! - `orchestrator budget ...` sets and shows the spending ceilings at run time.
//! - `orchestrator demo` runs one work item through every stage on a throw-away stack.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use orchestrator::Node;
use orchestrator_kit::{Config, ServiceName, shutdown, telemetry};

#[derive(Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Runs work items through a chain of LLM coding agents, from a tracker to production."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the six services and the gateway in one process, each on its own address.
    Up,
    /// Runs one service: stage-engine, launcher, reaper, merge-gate, post-deploy, usage-ledger or gateway.
    Serve {
        /// The service to run.
        service: String,
    },
    /// Runs the staging checks against the configured stack; prints the verdict, exits 0 or 1.
    StagingCheck {
        /// Fails on sandbox-infra failures (C9a, C9b) too, instead of waiving them.
        #[arg(long)]
        strict: bool,
        /// Writes `staging_status:` frontmatter to this file.
        #[arg(long, value_name = "PATH")]
        artifact: Option<PathBuf>,
    },
    /// Asks the service listening on this host (its ORCH_<SERVICE>_ADDR, on loopback when
    /// that is 0.0.0.0) whether it serves: gRPC health for its full name, GET /healthz for
    /// the gateway. Exit 0 serving, 1 not: a container healthcheck.
    Health {
        /// stage-engine, launcher, reaper, merge-gate, post-deploy, usage-ledger or gateway.
        service: String,
    },
    /// The quality gate as the agent's Stop hook: exit 0 pass, 2 block (what is missing on
    /// stderr), 1 own error. Reads the CLI's hook input on stdin.
    QgHook {
        /// The work item, e.g. ORCH-65.
        #[arg(long)]
        work_item: String,
        /// The stage the agent works.
        #[arg(long)]
        stage: String,
        /// The checkout (default: the hook input's cwd).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Blocks allowed per run, counted in --state-file.
        #[arg(long, default_value_t = 3)]
        max_blocks: u32,
        /// Where the blocks of this run are counted (outside the checkout).
        #[arg(long)]
        state_file: Option<std::path::PathBuf>,
    },
    /// Work items on a running stack: create, list, show, approve, retry and cancel.
    Item {
        #[command(subcommand)]
        command: orchestrator::item::ItemCommand,
    },
    /// The spending ceilings on a running stack: set (raise, lower, lift, clear) and show.
    Budget {
        #[command(subcommand)]
        command: orchestrator::budget::BudgetCommand,
    },
    /// Runs one work item through every stage to done on a throw-away stack (a temp dir,
    /// SQLite, a sample repository, the scripted agent), printing a live timeline. Needs
    /// nothing configured and reads neither ./.env nor ORCH_* for its stack.
    Demo(orchestrator::demo::DemoArgs),
}

/// How long in-flight work may take to finish after SIGTERM before the process exits anyway.
const DRAIN_LIMIT: Duration = Duration::from_millis(1_500);

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::QgHook {
        work_item,
        stage,
        dir,
        max_blocks,
        state_file,
    } = cli.command
    {
        return qg_hook(stage_engine::hook::HookRequest {
            work_item,
            stage,
            dir,
            max_blocks,
            state_file,
        });
    }
    if let Command::Health { service } = &cli.command {
        return health(service);
    }
    if let Command::Item { command } = cli.command {
        return item(command);
    }
    if let Command::Budget { command } = cli.command {
        return budget(command);
    }
    if let Command::Demo(args) = cli.command {
        return demo(args);
    }
    let parts: Vec<ServiceName> = match &cli.command {
        Command::Up => ServiceName::ALL.to_vec(),
        // Answered above, before any configuration is read.
        Command::QgHook { .. }
        | Command::Health { .. }
        | Command::Item { .. }
        | Command::Budget { .. }
        | Command::Demo(_) => {
            return ExitCode::FAILURE;
        }
        Command::Serve { service } => match service.parse() {
            Ok(s) => vec![s],
            Err(e) => return fail(e),
        },
        Command::StagingCheck { strict, artifact } => {
            return orchestrator_staging::cli::main(
                *strict,
                artifact.clone(),
                orchestrator::node::migrator,
            );
        }
    };
    let config = match Config::from_process() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    telemetry::init(config.log_format, &config.log_filter);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let code = runtime.block_on(run(config, parts));
    // Loops that ignore the shutdown token must not hold the process open.
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}

async fn run(config: Config, parts: Vec<ServiceName>) -> ExitCode {
    let token = match shutdown::on_signal() {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot install signal handlers: {e}")),
    };
    let node = match Node::start(config, &parts, token.clone()).await {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    for (part, addr) in &node.addrs {
        println!("{part:<13} listening on {addr}");
        tracing::info!(service = part.as_str(), %addr, "listening");
    }
    let backend = if node.config.database_url.is_some() {
        "postgres".to_owned()
    } else {
        format!("sqlite in {}", node.config.data_dir.display())
    };
    if parts.contains(&ServiceName::Launcher)
        && let Ok(launcher) = launcher::LauncherConfig::from_env(&node.config.env)
    {
        // Resolved where `up` was started: the first thing to check when prompts go missing.
        println!(
            "{:<13} prompts from {}",
            "agents",
            launcher.agents_dir.display()
        );
    }
    println!("ready ({} part(s), storage: {backend})", node.addrs.len());

    let waited = tokio::spawn(node.wait());
    token.cancelled().await;
    match tokio::time::timeout(DRAIN_LIMIT, waited).await {
        Ok(Ok(Ok(()))) => ExitCode::SUCCESS,
        Ok(Ok(Err(e))) => fail(e),
        Ok(Err(e)) => fail(format!("shutdown failed: {e}")),
        Err(_) => {
            tracing::warn!("in-flight work did not finish in time; exiting");
            ExitCode::SUCCESS
        }
    }
}

/// How long `health` waits for an answer: below compose's healthcheck timeout.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes one local service the way its orchestrator peers and staging-check do; prints
/// the outcome on one line.
fn health(service: &str) -> ExitCode {
    use orchestrator_staging::CheckOutcome;
    use orchestrator_staging::checks::{Check, GatewayGet, ServicesServing};

    let service: ServiceName = match service.parse() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let config = match Config::from_process() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let addr = config.listen[&service];
    if addr.port() == 0 {
        return fail(format!(
            "{}: port 0 is chosen at start-up; give the real port to probe it",
            service.addr_var()
        ));
    }
    let url = local_url(addr);
    let check: Box<dyn Check> = if service.grpc_name().is_some() {
        Box::new(ServicesServing {
            services: vec![(service, url)],
            timeout: HEALTH_TIMEOUT,
        })
    } else {
        Box::new(GatewayGet {
            id: "healthz",
            name: "gateway /healthz",
            url: format!("{url}/healthz"),
            json: true,
            http: reqwest::Client::new(),
            timeout: HEALTH_TIMEOUT,
        })
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(check.run()) {
        CheckOutcome::Pass(what) => {
            println!("{service}: {what}");
            ExitCode::SUCCESS
        }
        CheckOutcome::Fail(why) | CheckOutcome::Error(why) => fail(format!("{service}: {why}")),
    }
}

/// Where this host reaches a listen address: an unspecified IP (0.0.0.0, ::) on loopback.
fn local_url(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
}

/// Runs the Stop hook: no runtime, no configuration, no logs (stderr goes to the model).
fn qg_hook(req: stage_engine::hook::HookRequest) -> ExitCode {
    use std::io::Read;
    let mut stdin = String::new();
    // The CLI always sends its input; a missing one just means "use the given directory".
    let _ = std::io::stdin().take(1 << 20).read_to_string(&mut stdin);
    let answer = stage_engine::hook::run_hook(&req, &stdin);
    if !answer.stderr.is_empty() {
        eprintln!("{}", answer.stderr);
    }
    ExitCode::from(answer.code)
}

/// Runs an `item` command against the configured stack.
fn item(command: orchestrator::item::ItemCommand) -> ExitCode {
    client_command(|clients| async move {
        orchestrator::item::run(&clients, command)
            .await
            .map_err(|e| e.to_string())
    })
}

fn budget(command: orchestrator::budget::BudgetCommand) -> ExitCode {
    client_command(|clients| async move {
        orchestrator::budget::run(&clients, command)
            .await
            .map_err(|e| e.to_string())
    })
}

/// Runs a command of thin gRPC clients of the running stack; prints what it returns.
fn client_command<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(orchestrator_kit::clients::Clients) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let config = match Config::from_process() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    // The clients' channels need the runtime even to be built.
    let out = runtime.block_on(async {
        let clients =
            orchestrator_kit::clients::Clients::from_config(&config).map_err(|e| e.to_string())?;
        f(clients).await
    });
    match out {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Runs the demo: its own configuration, its logs only when asked for.
fn demo(args: orchestrator::demo::DemoArgs) -> ExitCode {
    let log = std::env::var("ORCH_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty());
    if args.verbose || log.is_some() {
        telemetry::init(
            orchestrator_kit::config::LogFormat::Text,
            log.as_deref().unwrap_or("info"),
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let keep = args.keep;
    let out = runtime.block_on(async {
        let stop =
            shutdown::on_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        orchestrator::demo::run(args, stop)
            .await
            .map_err(|e| e.to_string())
    });
    runtime.shutdown_timeout(Duration::from_millis(200));
    match out {
        Ok(()) => ExitCode::SUCCESS,
        // With --keep the error was said before the stack's banner.
        Err(_) if keep => ExitCode::FAILURE,
        Err(e) => fail(e),
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
