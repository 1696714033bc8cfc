//! The built-in interpreter tools, built once per test binary by
//! `scripts/build-interpreters` (CPython by componentize-py, SpiderMonkey by
//! componentize-js), and a runner of agents' code through the real engine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use imagentx_sandbox::engine::Tool;
use imagentx_sandbox::report::{ExecutionReport, Status};
use imagentx_sandbox::runner::Sandbox;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug)]
pub enum Lang {
    Python,
    JavaScript,
}

impl Lang {
    pub fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::JavaScript => "javascript",
        }
    }
}

/// Where `scripts/build-interpreters` puts the components; built once per
/// test binary (and only rebuilt by the script when a source changed).
pub fn built_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
            let out =
                Command::new(repo.join("scripts/build-interpreters")).output().expect("running build-interpreters");
            assert!(out.status.success(), "build-interpreters failed:\n{}", String::from_utf8_lossy(&out.stderr));
            repo.join("target/interpreters")
        })
        .clone()
}

/// The tool, compiled once per test binary (the first caller compiles or
/// reads the shared artifact cache; the others wait).
pub async fn tool(sandbox: &Sandbox, lang: Lang) -> &'static Tool {
    static PYTHON: tokio::sync::OnceCell<Tool> = tokio::sync::OnceCell::const_new();
    static JAVASCRIPT: tokio::sync::OnceCell<Tool> = tokio::sync::OnceCell::const_new();
    let cell = match lang {
        Lang::Python => &PYTHON,
        Lang::JavaScript => &JAVASCRIPT,
    };
    cell.get_or_init(|| async {
        let bytes = std::fs::read(built_dir().join(format!("{}.wasm", lang.name()))).expect("a built interpreter");
        sandbox.load(&bytes, lang.name()).await.expect("loading an interpreter")
    })
    .await
}

pub async fn run_code(
    sandbox: &Sandbox,
    lang: Lang,
    user: &str,
    tier: &str,
    code: &str,
    args: Value,
) -> ExecutionReport {
    let tool = tool(sandbox, lang).await;
    let call = super::with_timeout(super::call(user, tier, json!({"code": code, "args": args})), 5_000);
    super::run(sandbox, tool, &call).await
}

pub fn error(report: &ExecutionReport) -> &str {
    report.error.as_deref().unwrap_or_default()
}

pub fn assert_ok(r: &ExecutionReport, what: &str) {
    assert_eq!(r.status, Status::Ok, "{what}: {}", error(r));
}
