//! The `imagentx-sandbox` command line (DESIGN.md, "Command line").
//!
//! `run` prints one `ExecutionReport` as JSON and exits 0 when its status is
//! `ok`, 1 for any other status, 2 for a usage error.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::ServerSettings;
use crate::data_dir::DataDir;
use crate::engine::{Engine, EngineConfig};
use crate::jail::{Jail, JailConfig};
use crate::policy::{Policy, PolicyFile, UserId};
use crate::report::Status;
use crate::runner::{NativeTool, Sandbox, ToolCall};
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(name = "imagentx-sandbox", version, about = "Runs AI agents' tool calls in a sandbox")]
pub struct Cli {
    /// Log format on stderr: `text` or `json` (one object per line).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one tool: input JSON on stdin, an ExecutionReport on stdout.
    Run(RunArgs),
    /// Print what a tool says about itself: name, version, description, input schema.
    Describe(DescribeArgs),
    /// Serve the HTTP tool-execution API (and MCP at /mcp).
    Serve(ServeArgs),
    /// Serve MCP over stdin/stdout to one local client (Claude Desktop, an
    /// IDE, an agent framework) as one user: the registered tools, the
    /// built-in interpreters and `--tool` files. Logs go to stderr.
    Mcp(McpArgs),
    /// Manage users and their API keys.
    #[command(subcommand)]
    User(UserCommand),
    /// Check the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Back up a data directory into one file, while `serve` runs on it
    /// (`backup --to FILE`), or check a backup without restoring it
    /// (`backup verify FILE`).
    Backup(BackupArgs),
    /// Restore a backup into an empty data directory.
    Restore(RestoreArgs),
    /// Measure the sandbox beside its peers and write a report (see BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub check: Option<BackupCommand>,
    /// The file to write (a gzip-compressed tar), written under a temporary
    /// name and renamed when complete.
    #[arg(long)]
    pub to: Option<PathBuf>,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Check a backup: every member against its manifest, and its audit chain.
    Verify { file: PathBuf },
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup file.
    pub file: PathBuf,
    /// The data directory to restore into: empty or missing.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Write into a directory that is not empty (files the backup holds replace theirs).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML file: `[server]` settings, tiers, limits, env.
    #[arg(long, env = "IMAGENTX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "IMAGENTX_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Where the database, modules, artifacts and users' files live (default ./sandbox-data).
    #[arg(long, env = "IMAGENTX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the other nodes sharing a PostgreSQL store reach this one
    /// (`host:port`; default: --listen, or `<hostname>:<port>` on 0.0.0.0).
    #[arg(long, env = "IMAGENTX_ADVERTISE")]
    pub advertise: Option<String>,
}

/// Where a command finds the service's state.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    #[arg(long, env = "IMAGENTX_DATA_DIR", default_value = "./sandbox-data")]
    pub data_dir: PathBuf,
    /// The config file the server uses (to know its tiers).
    #[arg(long, env = "IMAGENTX_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user and print their first API key (shown only this once).
    Add {
        name: String,
        #[arg(long, default_value = "standard")]
        tier: String,
        /// May register and retire tools and read the audit trail.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List users.
    List {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Move a user to another tier.
    SetTier {
        name: String,
        tier: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Revoke every API key of a user.
    Revoke {
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Make another API key for a user.
    Key {
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Suspend a user: their keys answer 403 `suspended` until it runs out
    /// (or `user unsuspend`). A running server sees it at their next request.
    Suspend {
        name: String,
        /// How long (`90s`, `15m`, `2h`, `7d`; at most 30 days).
        #[arg(long = "for", default_value = "1h", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value = "suspended by an operator")]
        reason: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Lift a user's suspension and throttle (an admin's or a behaviour rule's).
    Unsuspend {
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the audit trail's hash chain; exit 1 if it is broken.
    Verify {
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The user the call runs for; their directory is the tool's /data.
    #[arg(long, default_value = "local")]
    pub user: String,
    /// The tier whose limits apply.
    #[arg(long, default_value = "standard")]
    pub tier: String,
    /// Where users' directories, scratch space and the artifact cache live.
    #[arg(long, default_value = "./sandbox-data")]
    pub data_dir: PathBuf,
    /// Wall-clock budget of the call (default from the policy: 10000).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// A TOML file overriding the built-in tiers and limits.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run a native program in the Linux jailer instead of a WASM tool.
    #[arg(long)]
    pub native: bool,
    /// The tool (.wasm component or module, or .wat text), or a built-in
    /// tool's name (`python`, `javascript`); none with --native.
    #[arg(required_unless_present = "native")]
    pub tool: Option<PathBuf>,
    /// Arguments passed to the tool; with --native, the program and its arguments.
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct McpArgs {
    /// The user the calls run for; their directory is the tools' /data.
    #[arg(long, default_value = "local")]
    pub user: String,
    /// The tier whose limits apply.
    #[arg(long, default_value = "standard")]
    pub tier: String,
    /// Where the database, modules, artifacts and users' files live.
    #[arg(long, env = "IMAGENTX_DATA_DIR", default_value = "./sandbox-data")]
    pub data_dir: PathBuf,
    /// TOML file: `[server]` settings, tiers, limits, env (as for `serve`).
    #[arg(long, env = "IMAGENTX_CONFIG")]
    pub config: Option<PathBuf>,
    /// A tool to offer besides the registered ones (.wasm component or
    /// module); repeatable. Offered for this process only, not registered.
    #[arg(long = "tool")]
    pub tools: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// The tool (.wasm component or module, or .wat text).
    pub tool: PathBuf,
    #[arg(long, default_value = "./sandbox-data")]
    pub data_dir: PathBuf,
}

/// Prints a line on stdout. A reader that went away (`| head`) is not an
/// error worth a panic: the report is still recorded and the exit code
/// still says how the call ended.
fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{text}")
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing to stdout: {e}");
    }
}

/// A mistake on the command line: exit code 2.
struct UsageError(String);

impl<E: std::fmt::Display> From<E> for UsageError {
    fn from(e: E) -> Self {
        UsageError(e.to_string())
    }
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    // The harness makes its own runtimes (one suite needs a current-thread one).
    let command = match cli.command {
        Command::Bench(args) => return crate::bench::main(args),
        other => other,
    };
    // Users' volumes are mounted in a namespace of the server's own, so that
    // they go away with it however it ends. Before the runtime's threads: the
    // namespace is the calling thread's alone until then.
    if matches!(command, Command::Serve(_) | Command::Mcp(_) | Command::Backup(_)) && nix::unistd::geteuid().is_root() {
        match crate::volume::private_mounts() {
            Err(e) => {
                tracing::warn!(error = %e, "no mount namespace of its own: users' volumes are mounted in the host's")
            }
            // A backup keeps no copy of the volumes' mounts it may have inherited.
            Ok(()) => {
                if let Command::Backup(args) = &command {
                    crate::backup::detach_inherited_mounts(&args.state.data_dir);
                }
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Bench(_) => Ok(ExitCode::SUCCESS),
            Command::Run(args) => run(args).await,
            Command::Describe(args) => describe(args).await,
            Command::Serve(args) => serve(args).await,
            Command::Mcp(args) => mcp(args).await,
            Command::User(command) => user(command).await,
            Command::Audit(AuditCommand::Verify { state }) => audit_verify(&state).await,
            Command::Backup(args) => backup(args),
            Command::Restore(args) => restore(&args),
        }
    });
    match result {
        Ok(code) => code,
        Err(UsageError(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// The policy and the jail's settings from a config file (defaults without one).
fn load_config(config: Option<&Path>) -> Result<(Policy, JailConfig), UsageError> {
    let Some(path) = config else { return Ok((Policy::default(), JailConfig::default())) };
    let text = std::fs::read_to_string(path).map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
    let mut file = PolicyFile::parse(&text)?;
    let jail = jail_config(&mut file, path)?;
    Ok((file.apply(Policy::default())?, jail))
}

fn jail_config(file: &mut PolicyFile, path: &Path) -> Result<JailConfig, UsageError> {
    toml::Value::Table(file.take_jail()).try_into().map_err(|e| UsageError(format!("{}: [jail]: {e}", path.display())))
}

fn sandbox(policy: Policy, data_dir: &Path) -> Result<Sandbox, UsageError> {
    let data_dir = DataDir::open(data_dir)?;
    let max_memory = policy.tiers.values().map(|t| t.memory_bytes).max().unwrap_or(1 << 30);
    let mut config = EngineConfig::new(data_dir.cache_dir(), max_memory);
    // One call per process: a small pool starts faster, and mapping the cached
    // artifact saves copying it (tens of MB for the interpreters).
    config.max_instances = 4;
    config.map_artifacts = true;
    let engine = Engine::new(&config)?;
    Ok(Sandbox { policy, engine, data_dir })
}

fn tool_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "tool".into())
}

/// `python` and `javascript`, when no such file exists, are the built-in
/// tools' components (`scripts/build-interpreters`).
fn builtin_or_path(path: &Path) -> Result<PathBuf, UsageError> {
    let builtin =
        path.to_str().and_then(|name| crate::interpreters::component(&crate::interpreters::default_dir(), name));
    match builtin {
        Some(built) if !path.exists() => {
            if built.exists() {
                Ok(built)
            } else {
                Err(UsageError(format!(
                    "the built-in tool {} is not built ({} is missing): run scripts/build-interpreters, \
                     or point {} at the directory holding it",
                    path.display(),
                    built.display(),
                    crate::interpreters::DIR_VAR
                )))
            }
        }
        _ => Ok(path.to_owned()),
    }
}

async fn run(args: RunArgs) -> Result<ExitCode, UsageError> {
    let (policy, jail_config) = load_config(args.config.as_deref())?;
    let user = UserId::new(&args.user)?;
    let timeout = args.timeout_ms.map(Duration::from_millis);
    policy.resolve(&args.tier, timeout)?;
    let tool = match (&args.tool, args.native) {
        (Some(path), false) => Some(path),
        (None, true) if !args.args.is_empty() => None,
        (None, _) => return Err(UsageError("--native needs a program: run --native -- PROGRAM [ARGS...]".into())),
        (Some(path), true) => {
            return Err(UsageError(format!(
                "--native runs the program after `--`, not {}: run --native -- PROGRAM [ARGS...]",
                path.display()
            )));
        }
    };
    let tool = tool.map(|path| builtin_or_path(path)).transpose()?;
    if let Some(path) = &tool {
        // Said now, before the input is read: a missing file is a usage error.
        std::fs::metadata(path).map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
    }
    let mut input = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin().take(policy.input_bytes as u64 + 1).read_to_end(&mut input)?;
    }
    // No users' volumes: one call per process would mount one per call. A
    // native run's /data is checked against the quota before the run only.
    let sandbox = sandbox(policy, &args.data_dir)?;
    let report = match tool {
        Some(path) => {
            let name = tool_name(&path);
            let call = ToolCall { user, tier: args.tier, input, args: args.args, timeout };
            let loaded = sandbox
                .load_file(&path, &name)
                .await
                .map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
            match loaded {
                Ok(tool) => sandbox.run(Ok(&tool), &call).await,
                Err(e) => sandbox.run(Err((&name, &e)), &call).await,
            }
        }
        None => {
            // A host that cannot run the jail (not root, no cgroups) gets a
            // report saying so, like any run that could not happen.
            let jail = Jail::new(jail_config).map(Arc::new).map_err(|e| e.to_string());
            let name = args.args.first().map(|p| tool_name(Path::new(p))).unwrap_or_default();
            let tool = NativeTool { name, argv: args.args, env: BTreeMap::new(), layout: None, warm: None };
            let call = ToolCall { user, tier: args.tier, input, args: Vec::new(), timeout };
            sandbox.run_native(jail.as_ref().map_err(String::as_str), &tool, &call).await
        }
    };
    say(serde_json::to_string_pretty(&report)?);
    Ok(if report.status == Status::Ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn describe(args: DescribeArgs) -> Result<ExitCode, UsageError> {
    let bytes = std::fs::read(&args.tool).map_err(|e| UsageError(format!("reading {}: {e}", args.tool.display())))?;
    let sandbox = sandbox(Policy::default(), &args.data_dir)?;
    match sandbox.load(&bytes, &tool_name(&args.tool)).await {
        Ok(tool) => {
            say(serde_json::to_string_pretty(tool.info())?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: invalid tool {}: {e}", args.tool.display());
            Ok(ExitCode::from(1))
        }
    }
}

/// The policy and the `[server]` and `[jail]` settings of a config file.
fn server_config(config: Option<&Path>) -> Result<(Policy, ServerSettings), UsageError> {
    let mut settings = ServerSettings::default();
    let mut jail = JailConfig::default();
    let policy = match config {
        None => Policy::default(),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
            let mut file = PolicyFile::parse(&text)?;
            settings = toml::Value::Table(file.take_server())
                .try_into()
                .map_err(|e| UsageError(format!("{}: [server]: {e}", path.display())))?;
            jail = jail_config(&mut file, path)?;
            settings.retention = toml::Value::Table(file.take_retention())
                .try_into()
                .map_err(|e| UsageError(format!("{}: [retention]: {e}", path.display())))?;
            settings.backup = toml::Value::Table(file.take_backup())
                .try_into()
                .map_err(|e| UsageError(format!("{}: [backup]: {e}", path.display())))?;
            settings.behaviour = toml::Value::Table(file.take_behaviour())
                .try_into()
                .map_err(|e| UsageError(format!("{}: [behaviour]: {e}", path.display())))?;
            settings.response = toml::Value::Table(file.take_response())
                .try_into()
                .map_err(|e| UsageError(format!("{}: [response]: {e}", path.display())))?;
            settings.store = toml::Value::Table(file.take_store())
                .try_into()
                .map_err(|e| UsageError(format!("{}: [store]: {e}", path.display())))?;
            settings.behaviour.check().map_err(|e| UsageError(format!("{}: [behaviour]: {e}", path.display())))?;
            settings.response.check().map_err(|e| UsageError(format!("{}: [response]: {e}", path.display())))?;
            crate::api::client::TrustedProxies::parse(&settings.trusted_proxies)
                .map_err(|e| UsageError(format!("{}: [server]: {e}", path.display())))?;
            settings.config_path = Some(path.to_owned());
            file.apply(Policy::default())?
        }
    };
    settings.jail = jail;
    settings.store.from_env().map_err(|e| UsageError(e.to_string()))?;
    Ok((policy, settings))
}

async fn serve(args: ServeArgs) -> Result<ExitCode, UsageError> {
    let (policy, mut settings) = server_config(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        settings.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        settings.data_dir = dir;
    }
    if let Some(address) = args.advertise {
        settings.advertise = Some(address);
    }
    match crate::api::serve(policy, settings).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(error = %e, "the server could not run");
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

async fn mcp(args: McpArgs) -> Result<ExitCode, UsageError> {
    let (policy, mut settings) = server_config(args.config.as_deref())?;
    settings.data_dir = args.data_dir;
    let user = UserId::new(&args.user)?;
    policy.resolve(&args.tier, None)?;
    let tools: Vec<(String, Vec<u8>)> = args
        .tools
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
            Ok((tool_name(path), bytes))
        })
        .collect::<Result<_, UsageError>>()?;
    let state = crate::api::AppState::open(policy, settings).await?;
    for (name, bytes) in tools {
        let tool = state.sandbox.load(&bytes, &name).await.map_err(|e| UsageError(format!("tool {name}: {e}")))?;
        state.registry.insert_local(tool);
    }
    let caller = crate::store::Caller { user, tier: args.tier, admin: false, throttle: None, network: None };
    match crate::api::mcp::serve_stdio(state, caller).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: MCP over stdio: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

async fn open_store(state: &StateArgs) -> Result<(Store, Policy), UsageError> {
    let (policy, settings) = server_config(state.config.as_deref())?;
    std::fs::create_dir_all(&state.data_dir)
        .map_err(|e| UsageError(format!("creating {}: {e}", state.data_dir.display())))?;
    let store = Store::open_configured(&settings.store, &state.data_dir).await?;
    Ok((store, policy))
}

/// Who the audit trail says made a change from the command line.
const CLI_ACTOR: &str = "cli";

async fn user(command: UserCommand) -> Result<ExitCode, UsageError> {
    match command {
        UserCommand::Add { name, tier, admin, state } => {
            let (store, policy) = open_store(&state).await?;
            policy.tier(&tier)?;
            let key = store.add_user(UserId::new(&name)?, tier.clone(), admin, CLI_ACTOR.into()).await?;
            eprintln!(
                "added user `{}` (tier {tier}{}); their API key, shown only now:",
                key.user,
                if admin { ", admin" } else { "" }
            );
            say(&key.key);
        }
        UserCommand::List { state } => {
            let (store, _) = open_store(&state).await?;
            say(format!("{:<24} {:<10} {:<6} {:<5} {:<27} restricted", "user", "tier", "admin", "keys", "created"));
            for u in store.list_users().await? {
                let mut restricted = Vec::new();
                if let Some(until) = &u.suspended_until {
                    restricted.push(format!("suspended until {until}"));
                }
                if let Some(until) = &u.throttled_until {
                    restricted.push(format!("throttled until {until}"));
                }
                let restricted = if restricted.is_empty() { "-".to_owned() } else { restricted.join(", ") };
                say(format!(
                    "{:<24} {:<10} {:<6} {:<5} {:<27} {restricted}",
                    u.id, u.tier, u.admin, u.active_keys, u.created_at
                ));
            }
        }
        UserCommand::SetTier { name, tier, state } => {
            let (store, policy) = open_store(&state).await?;
            policy.tier(&tier)?;
            store.set_tier(UserId::new(&name)?, tier.clone(), CLI_ACTOR.into()).await?;
            eprintln!("user `{name}` is now in tier {tier}");
        }
        UserCommand::Revoke { name, state } => {
            let (store, _) = open_store(&state).await?;
            let n = store.revoke_keys(UserId::new(&name)?, CLI_ACTOR.into()).await?;
            eprintln!("revoked {n} key(s) of user `{name}`");
        }
        UserCommand::Suspend { name, duration, reason, state } => {
            if duration.is_zero() || duration.as_secs() > 30 * 86_400 {
                return Err(UsageError("--for must be between 1 second and 30 days".to_owned()));
            }
            let (store, _) = open_store(&state).await?;
            let until = crate::store::unix_now() + duration.as_secs().max(1) as i64;
            let held = store
                .restrict(UserId::new(&name)?, crate::store::Restriction::Suspend, until, reason, CLI_ACTOR.into())
                .await?;
            let kept = if held.kept_longer { " (a longer suspension already held, and stays)" } else { "" };
            eprintln!(
                "user `{name}` is suspended until {}{kept}: {}",
                crate::store::unix_rfc3339(held.until),
                held.reason
            );
        }
        UserCommand::Unsuspend { name, state } => {
            let (store, _) = open_store(&state).await?;
            let lifted = store.lift_restrictions(UserId::new(&name)?, CLI_ACTOR.into()).await?;
            if lifted.is_empty() {
                eprintln!("user `{name}` was neither suspended nor throttled");
            } else {
                eprintln!("lifted from user `{name}`: {}", lifted.join(", "));
            }
        }
        UserCommand::Key { name, state } => {
            let (store, _) = open_store(&state).await?;
            let key = store.issue_key(UserId::new(&name)?, CLI_ACTOR.into()).await?;
            eprintln!("new API key for user `{}`, shown only now:", key.user);
            say(&key.key);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn backup(args: BackupArgs) -> Result<ExitCode, UsageError> {
    let settings = server_config(args.state.config.as_deref())?.1;
    if let (None, Some(url)) = (&args.check, &settings.store.url) {
        return Err(UsageError(format!(
            "the store is PostgreSQL ({}): back it up with pg_dump or your provider's snapshots; `backup` copies a \
             SQLite store with its data directory",
            crate::store::redacted(url)
        )));
    }
    if let (None, Some(shared)) = (&args.check, &settings.shared_dir) {
        return Err(UsageError(format!(
            "users' directories are in shared_dir ({}): back that filesystem up with its own tools; `backup` copies \
             a data directory that holds them",
            shared.display()
        )));
    }
    let (file, outcome) = match (args.check, args.to) {
        (Some(BackupCommand::Verify { file }), _) => {
            let outcome = crate::backup::verify(&file);
            (file, outcome)
        }
        (None, Some(to)) => {
            let outcome = crate::backup::create(&args.state.data_dir, args.state.config.as_deref(), &to);
            (to, outcome)
        }
        (None, None) => {
            return Err(UsageError("say where the backup goes (--to FILE), or `backup verify FILE`".into()));
        }
    };
    backup_answer(&file, outcome)
}

fn restore(args: &RestoreArgs) -> Result<ExitCode, UsageError> {
    backup_answer(&args.file, crate::backup::restore(&args.file, &args.data_dir, args.force))
}

/// The manifest's summary on stdout, or the error on stderr (exit 1).
fn backup_answer(
    file: &Path,
    outcome: Result<crate::backup::Manifest, crate::backup::BackupError>,
) -> Result<ExitCode, UsageError> {
    match outcome {
        Ok(manifest) => {
            let bytes: u64 = manifest.members.iter().map(|m| m.bytes).sum();
            say(serde_json::json!({
                "file": file,
                "created_at": manifest.created_at,
                "made_by": manifest.made_by,
                "users": manifest.users,
                "tools": manifest.tools,
                "executions": manifest.executions,
                "audit_records": manifest.audit_records,
                "audit_head": manifest.audit_head,
                "members": manifest.members.len(),
                "bytes": bytes,
            }));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            Ok(ExitCode::from(1))
        }
    }
}

async fn audit_verify(state: &StateArgs) -> Result<ExitCode, UsageError> {
    let path = state.data_dir.join("sandbox.db");
    let (_, settings) = server_config(state.config.as_deref())?;
    if settings.store.url.is_none() && !path.exists() {
        return Err(UsageError(format!("no database at {}", path.display())));
    }
    let (store, _) = open_store(state).await?;
    let archive = ServerSettings { data_dir: state.data_dir.clone(), ..settings }.archive_dir();
    // A running server's archiver waits meanwhile: no record is seen moving.
    let _lock = crate::audit::lock_archive(&archive, false)
        .map_err(|e| UsageError(format!("locking {}: {e}", archive.display())))?;
    let verification = store.verify_audit(&archive).await?;
    say(serde_json::to_string_pretty(&verification)?);
    Ok(if verification.first_broken.is_none() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
