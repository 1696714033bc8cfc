//! A real PostgreSQL server for the tests that need one: Debian's own
//! binaries, a cluster made in a temporary directory at the first call and
//! run as the `postgres` user (the server refuses root), one fresh database
//! per test. A watchdog stops the server and removes its directory when this
//! test process ends, however it ends.
//!
//! Without PostgreSQL installed the tests that need it are skipped, unless
//! `IMAGENTX_REQUIRE_POSTGRES=1` (CI sets it), which makes that a failure.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

struct Server {
    port: u16,
    /// Held for the life of the process; the watchdog stops them after it.
    _processes: [std::process::Child; 2],
}

static SERVER: OnceLock<Option<Server>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The newest installed server's `bin` directory.
fn binaries() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start() -> Option<Server> {
    let required = std::env::var("IMAGENTX_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    let bin = match binaries() {
        Some(bin) if nix::unistd::Uid::effective().is_root() => bin,
        _ => {
            assert!(!required, "IMAGENTX_REQUIRE_POSTGRES=1 but no PostgreSQL server here (or not root to run it)");
            eprintln!("skipped: PostgreSQL is not installed (apt-get install postgresql) or this is not root");
            return None;
        }
    };
    let dir = tempfile::Builder::new().prefix("imagentx-pg-").tempdir().unwrap().keep();
    let postgres = nix::unistd::User::from_name("postgres").unwrap().expect("the postgres user");
    std::os::unix::fs::chown(&dir, Some(postgres.uid.as_raw()), Some(postgres.gid.as_raw())).unwrap();
    let data = dir.join("data");
    let as_postgres = |program: &str| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    };
    let made = as_postgres("initdb")
        .args(["--no-sync", "--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(made.status.success(), "initdb: {}", String::from_utf8_lossy(&made.stderr));
    let port = free_port();
    // fsync off: the tests check what the store does, not the disk.
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    std::os::unix::fs::chown(dir.join("server.log"), Some(postgres.uid.as_raw()), None).unwrap();
    let server = as_postgres("postgres")
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .args(["-c", "max_connections=300", "-c", "unix_socket_directories="])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // The watchdog: when this process is gone, stop the server, remove its files.
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(
            "while kill -0 \"$1\" 2>/dev/null; do sleep 0.5; done; \
             runuser -u postgres -- \"$2/pg_ctl\" stop -D \"$3/data\" -m immediate >/dev/null 2>&1; rm -rf \"$3\"",
        )
        .args(["watchdog", &std::process::id().to_string()])
        .arg(&bin)
        .arg(&dir)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Server { port, _processes: [server, watchdog] })
}

/// The URL of a new, empty database for one test; `None` when PostgreSQL is
/// not available here (and not required).
pub async fn database() -> Option<String> {
    let port = SERVER.get_or_init(start).as_ref()?.port;
    let name = format!("t{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::Relaxed));
    let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    // The server accepts its port before it accepts logins: try for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("connecting to PostgreSQL: {e}"),
        }
    };
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    Some(format!("postgres://postgres@127.0.0.1:{port}/{name}"))
}
