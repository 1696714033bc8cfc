//! systemd's service notification protocol (`sd_notify(3)`), for a unit of
//! `Type=notify` with `WatchdogSec=` (`deploy/imagentx-sandbox.service`):
//! datagrams of `KEY=VALUE` lines to the socket named by `NOTIFY_SOCKET` (a
//! path, or an abstract name written `@name`). Without that variable every
//! call does nothing, so the server runs the same outside systemd.
//!
//! The protocol is a dozen lines over a Unix datagram socket; the crates
//! that wrap it (`sd-notify`, `libsystemd`) add nothing we need.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, when the service manager asked for them.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for, or `None` (no service manager,
    /// or a socket name that cannot be used: logged).
    pub fn from_env() -> Option<Self> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let name = name.to_string_lossy().into_owned();
        let made = (|| -> std::io::Result<Self> {
            let target = match name.strip_prefix('@') {
                Some(abstract_name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&name)?,
            };
            Ok(Self { socket: UnixDatagram::unbound()?, target })
        })();
        match made {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::warn!(socket = %name, error = %e, "NOTIFY_SOCKET cannot be used; not notifying the service manager");
                None
            }
        }
    }

    /// Sends `state` (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`,
    /// newline-separated). A failure is logged, never fatal.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.target) {
            tracing::warn!(error = %e, "notifying the service manager failed");
        }
    }

    /// The watchdog interval the service manager expects pings within
    /// (`WATCHDOG_USEC`, for this process per `WATCHDOG_PID`).
    pub fn watchdog() -> Option<Duration> {
        if let Some(pid) = std::env::var_os("WATCHDOG_PID")
            && pid.to_string_lossy().parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec))
    }
}

/// Pings the watchdog at half its interval for as long as the async runtime
/// runs this task: a runtime wedged (its workers blocked) stops the pings,
/// and the service manager restarts the service.
pub async fn watchdog(notifier: std::sync::Arc<Notifier>, interval: Duration) {
    let mut every = tokio::time::interval(interval / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        notifier.send("WATCHDOG=1");
    }
}
