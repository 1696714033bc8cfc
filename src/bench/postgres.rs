//! A throwaway PostgreSQL server, for the benchmarks and the tests that need
//! one: Debian's own binaries, a cluster made in a temporary directory and
//! run as the `postgres` user (the server refuses root), on a loopback port.
//! A watchdog stops it and removes its directory when this process ends,
//! however it ends; dropping the [`Server`] does it at once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running server.
pub struct Server {
    /// The address it listens on.
    host: String,
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    server: Child,
    watchdog: Child,
    databases: AtomicU32,
}

/// The newest installed server's `bin` directory, if there is one.
pub fn binaries() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn as_postgres(bin: &Path, program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(program));
    c
}

impl Server {
    /// Makes a cluster and starts it; answers once it takes logins.
    ///
    /// # Errors
    ///
    /// No server installed, not root, or it would not start (its log says why).
    pub async fn start() -> anyhow::Result<Server> {
        Self::start_on("127.0.0.1").await
    }

    /// [`Server::start`], listening on `host` (an address of this host's),
    /// and taking logins from any address without a password: for tests
    /// whose nodes reach it from network namespaces of their own.
    ///
    /// # Errors
    ///
    /// As [`Server::start`].
    pub async fn start_on(host: &str) -> anyhow::Result<Server> {
        let Some(bin) = binaries() else { bail!("PostgreSQL is not installed (apt-get install postgresql)") };
        if !nix::unistd::Uid::effective().is_root() {
            bail!("running PostgreSQL as its own user needs root");
        }
        let postgres = nix::unistd::User::from_name("postgres")?.context("no `postgres` user")?;
        let dir = tempfile::Builder::new().prefix("imagentx-pg-").tempdir()?.keep();
        let owned =
            |path: &Path| std::os::unix::fs::chown(path, Some(postgres.uid.as_raw()), Some(postgres.gid.as_raw()));
        owned(&dir)?;
        let made = as_postgres(&bin, "initdb")
            .args(["--no-sync", "--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C", "-D"])
            .arg(dir.join("data"))
            .output()?;
        if !made.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&made.stderr));
        }
        if host != "127.0.0.1" {
            use std::io::Write as _;
            let mut hba = std::fs::OpenOptions::new().append(true).open(dir.join("data/pg_hba.conf"))?;
            writeln!(hba, "host all all 0.0.0.0/0 trust")?;
        }
        let port = std::net::TcpListener::bind((host, 0))?.local_addr()?.port();
        std::fs::File::create(dir.join("server.log"))?;
        owned(&dir.join("server.log"))?;
        let server = run(&bin, &dir, host, port)?;
        // When this process is gone, however it went: stop it, remove its files.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                "while kill -0 \"$1\" 2>/dev/null; do sleep 0.5; done; \
                 runuser -u postgres -- \"$2/pg_ctl\" stop -D \"$3/data\" -m immediate >/dev/null 2>&1; rm -rf \"$3\"",
            )
            .args(["watchdog", &std::process::id().to_string()])
            .arg(&bin)
            .arg(&dir)
            .stdin(Stdio::null())
            .spawn()?;
        let server = Server { host: host.to_owned(), port, bin, dir, server, watchdog, databases: AtomicU32::new(0) };
        server.taking_logins().await?;
        Ok(server)
    }

    /// Waits until the server takes logins (30 s at most).
    async fn taking_logins(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                    bail!("PostgreSQL did not start ({e}): {log}");
                }
            }
        }
    }

    /// Stops the server as an operator's restart does (a fast shutdown:
    /// sessions are ended, what is committed stays), waits `down`, and starts
    /// it again on the same port; answers once it takes logins.
    ///
    /// # Errors
    ///
    /// It would not stop or start again.
    pub async fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        let stopped = as_postgres(&self.bin, "pg_ctl")
            .args(["stop", "-m", "fast", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .output()?;
        if !stopped.status.success() {
            bail!("pg_ctl stop: {}", String::from_utf8_lossy(&stopped.stderr));
        }
        self.server.wait()?;
        tokio::time::sleep(down).await;
        self.server = run(&self.bin, &self.dir, &self.host, self.port)?;
        self.taking_logins().await
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{}:{}/{database}", self.host, self.port)
    }

    /// The URL of a new, empty database.
    ///
    /// # Errors
    ///
    /// The server refused to make it.
    pub async fn database(&self) -> anyhow::Result<String> {
        let name = format!("d{}_{}", std::process::id(), self.databases.fetch_add(1, Ordering::Relaxed));
        let (client, connection) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        drop(client);
        let _ = connection.await;
        Ok(self.url(&name))
    }
}

/// Starts the server of the cluster in `dir` on `host`:`port`, its log
/// appended to `dir/server.log`.
/// With pg_stat_statements (Debian's server package has it) loaded, so that
/// the bench can read what each statement cost.
fn run(bin: &Path, dir: &Path, host: &str, port: u16) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().append(true).open(dir.join("server.log"))?;
    let mut server = as_postgres(bin, "postgres");
    server
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-c", &format!("listen_addresses={host}"), "-c", "max_connections=300"])
        .args(["-c", "unix_socket_directories="]);
    if bin.parent().is_some_and(|v| v.join("lib/pg_stat_statements.so").exists()) {
        server.args(["-c", "shared_preload_libraries=pg_stat_statements"]);
    }
    Ok(server.stdout(log.try_clone()?).stderr(log).spawn()?)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.server.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
