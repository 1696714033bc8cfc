//! A real PostgreSQL server for the tests that need one
//! (`imagentx_sandbox::bench::postgres`): started at the first call, one
//! fresh database per test, stopped by its watchdog when the test process
//! ends.
//!
//! Without PostgreSQL installed (or without root to run it) the tests that
//! need it are skipped, unless `IMAGENTX_REQUIRE_POSTGRES=1` (CI sets it),
//! which makes that a failure.

use imagentx_sandbox::bench::postgres::Server;
use tokio::sync::OnceCell;

static SERVER: OnceCell<Option<Server>> = OnceCell::const_new();

/// The URL of a new, empty database for one test; `None` when PostgreSQL is
/// not available here (and not required).
pub async fn database() -> Option<String> {
    let server = SERVER
        .get_or_init(|| async {
            match Server::start().await {
                Ok(server) => Some(server),
                Err(e) => {
                    let required = std::env::var("IMAGENTX_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
                    assert!(!required, "IMAGENTX_REQUIRE_POSTGRES=1 but: {e:#}");
                    eprintln!("skipped: {e:#}");
                    None
                }
            }
        })
        .await
        .as_ref()?;
    Some(server.database().await.unwrap())
}
