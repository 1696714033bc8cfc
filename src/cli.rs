//! The `imagentx-sandbox` command line (DESIGN.md, "Command line").
//!
//! `run` prints one `ExecutionReport` as JSON and exits 0 when its status is
//! `ok`, 1 for any other status, 2 for a usage error.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::data_dir::DataDir;
use crate::engine::{Engine, EngineConfig};
use crate::policy::{Policy, PolicyFile, UserId};
use crate::report::Status;
use crate::runner::{Sandbox, ToolCall};

#[derive(Debug, Parser)]
#[command(name = "imagentx-sandbox", version, about = "Runs AI agents' tool calls in a sandbox")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one tool: input JSON on stdin, an ExecutionReport on stdout.
    Run(RunArgs),
    /// Print what a tool says about itself: name, version, description, input schema.
    Describe(DescribeArgs),
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
    /// The tool (.wasm component or module, or .wat text).
    pub tool: PathBuf,
    /// Arguments passed to the tool.
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// The tool (.wasm component or module, or .wat text).
    pub tool: PathBuf,
    #[arg(long, default_value = "./sandbox-data")]
    pub data_dir: PathBuf,
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Describe(args) => describe(args).await,
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

fn load_policy(config: Option<&Path>) -> Result<Policy, UsageError> {
    let Some(path) = config else { return Ok(Policy::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
    Ok(PolicyFile::parse(&text)?.apply(Policy::default())?)
}

fn sandbox(policy: Policy, data_dir: &Path) -> Result<Sandbox, UsageError> {
    let data_dir = DataDir::open(data_dir)?;
    let max_memory = policy.tiers.values().map(|t| t.memory_bytes).max().unwrap_or(1 << 30);
    let mut config = EngineConfig::new(data_dir.cache_dir(), max_memory);
    // One call per process: a small pool starts faster.
    config.max_instances = 4;
    let engine = Engine::new(&config)?;
    Ok(Sandbox { policy, engine, data_dir })
}

fn tool_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "tool".into())
}

async fn run(args: RunArgs) -> Result<ExitCode, UsageError> {
    if args.native {
        return Err(UsageError("--native: the native jailer is not built yet (issue 4)".into()));
    }
    let policy = load_policy(args.config.as_deref())?;
    let user = UserId::new(&args.user)?;
    let timeout = args.timeout_ms.map(Duration::from_millis);
    policy.resolve(&args.tier, timeout)?;
    let bytes = std::fs::read(&args.tool).map_err(|e| UsageError(format!("reading {}: {e}", args.tool.display())))?;
    let mut input = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin().take(policy.input_bytes as u64 + 1).read_to_end(&mut input)?;
    }
    let sandbox = sandbox(policy, &args.data_dir)?;
    let name = tool_name(&args.tool);
    let call = ToolCall { user, tier: args.tier, input, args: args.args, timeout };
    let report = match sandbox.load(&bytes, &name).await {
        Ok(tool) => sandbox.run(Ok(&tool), &call).await,
        Err(e) => sandbox.run(Err((&name, &e)), &call).await,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(if report.status == Status::Ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn describe(args: DescribeArgs) -> Result<ExitCode, UsageError> {
    let bytes = std::fs::read(&args.tool).map_err(|e| UsageError(format!("reading {}: {e}", args.tool.display())))?;
    let sandbox = sandbox(Policy::default(), &args.data_dir)?;
    match sandbox.load(&bytes, &tool_name(&args.tool)).await {
        Ok(tool) => {
            println!("{}", serde_json::to_string_pretty(tool.info())?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: invalid tool {}: {e}", args.tool.display());
            Ok(ExitCode::from(1))
        }
    }
}
