//! systemd's notification protocol against a real `NOTIFY_SOCKET` datagram
//! socket opened here (no systemd needed): `READY=1` once the server
//! listens, `WATCHDOG=1` pings while its runtime runs tasks, none while the
//! runtime is wedged, `STOPPING=1` at shutdown. One test in this binary: it
//! sets the process's environment.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imagentx_sandbox::policy::Policy;

/// Every datagram the socket receives, with when it came.
type Heard = Arc<Mutex<Vec<(Instant, String)>>>;

fn listen(socket: UnixDatagram) -> Heard {
    let heard: Heard = Arc::default();
    let sink = Arc::clone(&heard);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().unwrap().push((Instant::now(), text));
        }
    });
    heard
}

fn count(heard: &Heard, what: &str, from: Instant, to: Instant) -> usize {
    heard.lock().unwrap().iter().filter(|(at, text)| *at >= from && *at < to && text.contains(what)).count()
}

/// The runtime is this test's only thread (a current-thread runtime): a task
/// that blocks it wedges the server as a deadlock would.
#[tokio::test(flavor = "current_thread")]
async fn ready_once_listening_watchdog_while_alive_and_silent_when_wedged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let heard = listen(UnixDatagram::bind(&path).unwrap());
    // SAFETY: the only test of this binary, before the server (or anything
    // else that reads the environment) starts.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "200000");
    }
    let before = Instant::now();
    let srv = server::TestServer::start_with(Policy::default(), |s| s.builtin_tools = false).await;
    // READY came, and by then the port answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&heard, "READY=1", before, Instant::now() + Duration::from_secs(1)) == 0 {
        assert!(Instant::now() < deadline, "no READY=1: {:?}", heard.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = heard.lock().unwrap().iter().find(|(_, t)| t.contains("READY=1")).cloned().unwrap();
    assert!(ready.1.contains(&format!("MAINPID={}", std::process::id())), "{}", ready.1);
    assert!(std::net::TcpStream::connect(srv.addr).is_ok());
    srv.assert_healthy().await;

    // Alive: pings every 100 ms (half the interval).
    let alive = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pings = count(&heard, "WATCHDOG=1", alive, Instant::now());
    assert!((4..=9).contains(&pings), "{pings} pings in 700 ms");

    // Wedged: a task blocks the runtime's only thread for 1.2 s; no pings.
    let wedged = Instant::now();
    tokio::spawn(async { std::thread::sleep(Duration::from_millis(1200)) });
    tokio::task::yield_now().await;
    let unwedged = Instant::now();
    assert!(unwedged - wedged >= Duration::from_millis(1100), "the runtime was not wedged");
    let during = count(&heard, "WATCHDOG=1", wedged + Duration::from_millis(150), unwedged);
    assert_eq!(during, 0, "pings while the runtime was wedged");
    // Unwedged: they resume.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(count(&heard, "WATCHDOG=1", unwedged, Instant::now()) >= 2);

    srv.stop().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count(&heard, "STOPPING=1", before, Instant::now()), 1, "{:?}", heard.lock().unwrap());
}
