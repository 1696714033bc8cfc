//! Code sessions in a jail: a warm jail (`super::warm`) attached to its
//! user as for a call, whose program then runs one step after another in the
//! same interpreter, each with its own wall-clock and CPU budgets and output
//! caps, the session as a whole within the tier's memory (its cgroup).
//!
//! The program says it runs steps from the `session` word of its first
//! line (`rlimits::header`). A step is a frame on its stdin (the length in
//! decimal, a newline, the bytes); its answer a frame on its stdout. The
//! program keeps its stdout for the frames (what the step's code writes to
//! descriptor 1 goes to stderr), and stderr is read as the step's.
//!
//! The program's first answer says it is ready (confined, in `/data`): only
//! then is the session open. Before each step what the program wrote since
//! the last one is drained (not the step's).
//!
//! A step that runs out of time or CPU, an answer past the cap, a program
//! that ends (its memory limit, a crash), a session closed while a step
//! runs, or a program that uses more CPU between steps than a step may (a
//! thread or process left running) ends the session: its jail is killed and
//! removed, like a call's.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::cgroup::RunCgroup;
use super::{NativeOutcome, Timings, sys};
use crate::policy::Limits;
use crate::report::Status;

/// How often a running step's CPU time is read.
const CPU_POLL: Duration = Duration::from_millis(10);

/// What ties a session's jail to its owner.
pub(super) struct Link {
    pub steps: mpsc::Receiver<StepJob>,
    /// Set when the session is closed (a running step is stopped).
    pub closed: Arc<AtomicBool>,
    /// The memory the session's cgroup holds, after each step.
    pub memory: Arc<AtomicU64>,
    /// Told once the program is ready for steps, or why it is not.
    pub opened: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    /// CPU time the program may use between two steps.
    pub idle_cpu: Duration,
    /// Why the session's jail ended between steps, when it did.
    pub why: Arc<std::sync::Mutex<Option<String>>>,
    /// The largest answer a step may have (its output cap).
    pub answer_cap: usize,
}

/// One step to run.
pub(super) struct StepJob {
    pub input: Vec<u8>,
    /// The step's budgets (wall time, CPU time, output caps); the memory,
    /// process and file limits are the session's, set when it opened.
    pub limits: Limits,
    pub arrived: Instant,
    pub answer: tokio::sync::oneshot::Sender<NativeOutcome>,
}

/// The jail's end of the pipes, and how to watch it.
pub(super) struct Io<'a> {
    pub pid: libc::pid_t,
    pub pidfd: &'a OwnedFd,
    pub cgroup: &'a RunCgroup,
    pub stdin: &'a OwnedFd,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
}

/// Runs the session's steps until it is closed or a step ends it. `header`
/// is the program's first line.
pub(super) fn serve(io: &Io<'_>, header: &[u8], mut link: Link) {
    let mut stdin = borrow(io.stdin);
    let mut buffer = Vec::new();
    let ready = write_within(&mut stdin, header, Instant::now() + Duration::from_secs(5))
        .map_err(|e| format!("writing the session's first line: {e}"))
        .and_then(|()| ready(io, &mut buffer, &link));
    link.memory.store(io.cgroup.memory_now().unwrap_or(0), Ordering::Relaxed);
    let failed = ready.is_err();
    if let Some(opened) = link.opened.take() {
        let _ = opened.send(ready);
    }
    if failed {
        return;
    }
    let mut idle_from = io.cgroup.cpu().unwrap_or_default();
    loop {
        let job = match link.steps.recv_timeout(Duration::from_millis(100)) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if link.closed.load(Ordering::Acquire) {
                    return;
                }
                let why = if exited(io.pidfd) {
                    Some("its interpreter ended between steps".to_owned())
                } else {
                    io.cgroup.cpu().filter(|cpu| cpu.saturating_sub(idle_from) > link.idle_cpu).map(|cpu| {
                        format!(
                            "it used {} ms of CPU between steps, more than a step may ({} ms): something it started \
                             kept running",
                            cpu.saturating_sub(idle_from).as_millis(),
                            link.idle_cpu.as_millis()
                        )
                    })
                };
                if let Some(why) = why {
                    *link.why.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let outcome = step(io, &mut stdin, &mut buffer, &job, &link);
        link.memory.store(io.cgroup.memory_now().unwrap_or(0), Ordering::Relaxed);
        idle_from = io.cgroup.cpu().unwrap_or_default();
        let goes_on = matches!(outcome.status, Status::Ok | Status::ToolError);
        let _ = job.answer.send(outcome);
        if !goes_on {
            return;
        }
    }
}

/// Waits (up to 10 s) for the program's first answer, which says it is
/// ready; or why it is not (what it wrote on stderr).
fn ready(io: &Io<'_>, buffer: &mut Vec<u8>, link: &Link) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut said = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let failed = |said: &[u8], what: &str| {
        let text = String::from_utf8_lossy(&said[said.len().saturating_sub(2048)..]).trim().to_owned();
        format!("the session's interpreter {what}: {text}")
    };
    loop {
        if Instant::now() >= deadline || link.closed.load(Ordering::Acquire) {
            return Err(failed(&said, "was not ready in time"));
        }
        let mut fds = [
            libc::pollfd { fd: io.stdout.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: io.stderr.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: io.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if sys::poll(&mut fds, 100).is_err() {
            continue;
        }
        if fds[1].revents != 0
            && let Some(bytes) = read_some(io.stderr.as_raw_fd(), &mut chunk)
        {
            said.extend_from_slice(bytes);
        }
        if fds[0].revents != 0 {
            match read_some(io.stdout.as_raw_fd(), &mut chunk) {
                Some(bytes) => buffer.extend_from_slice(bytes),
                None => return Err(failed(&said, "ended before it was ready")),
            }
            if let Frame::Whole(_) = parse_frame(buffer, link.answer_cap + SLACK) {
                buffer.clear();
                return Ok(());
            }
        }
        if fds[2].revents != 0 {
            // What it wrote last, then why it ended.
            while let Some(bytes @ [_, ..]) = read_some(io.stderr.as_raw_fd(), &mut chunk) {
                said.extend_from_slice(bytes);
            }
            return Err(failed(&said, "ended before it was ready"));
        }
    }
}

/// Room past the answer cap for a frame's own fields.
const SLACK: usize = 4096;

/// Reads and drops what `fd` holds now: what the program wrote between
/// steps is no step's.
fn drain(fd: RawFd, chunk: &mut [u8]) {
    while let Some([_, ..]) = read_some(fd, chunk) {}
}

/// A `File` over a descriptor this module only borrows.
fn borrow(fd: &OwnedFd) -> std::mem::ManuallyDrop<File> {
    use std::os::fd::FromRawFd;
    #[allow(unsafe_code)]
    // SAFETY: the descriptor outlives the `File`, which is never dropped
    // (`ManuallyDrop`), so it is not closed twice.
    std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) })
}

fn exited(pidfd: &OwnedFd) -> bool {
    sys::poll(&mut [libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }], 0) != Ok(0)
}

/// Writes all of `bytes` to the non-blocking `file` before `deadline`.
fn write_within(file: &mut File, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match file.write(bytes) {
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Err(ErrorKind::TimedOut.into());
                }
                let mut fds = [libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLOUT, revents: 0 }];
                let _ = sys::poll(&mut fds, 10);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why the supervisor stopped a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    Wall,
    Cpu,
    Closed,
    Oversized,
}

/// Runs one step: its frame in, its answer frame (or its end) out.
fn step(io: &Io<'_>, stdin: &mut File, buffer: &mut Vec<u8>, job: &StepJob, link: &Link) -> NativeOutcome {
    let closed = &link.closed;
    let limits = &job.limits;
    let deadline = job.arrived + limits.wall_time;
    let before = io.cgroup.stats();
    let cpu_start = before.cpu.unwrap_or_default();
    let mut frame = format!("{}\n", job.input.len()).into_bytes();
    frame.extend_from_slice(&job.input);
    let mut written = 0;
    let mut stderr = Vec::new();
    let mut stderr_dropped = false;
    // A frame's length line, then at most this many bytes (the program
    // answers an error itself past the cap it was given).
    let most = link.answer_cap + SLACK;
    buffer.clear();
    let mut chunk = vec![0u8; 64 * 1024];
    drain(io.stdout.as_raw_fd(), &mut chunk);
    drain(io.stderr.as_raw_fd(), &mut chunk);
    let mut stopped = None;
    let mut answer = None;
    let mut ended = false;
    let mut next_cpu_check = Instant::now() + CPU_POLL;
    while answer.is_none() && stopped.is_none() && !ended {
        let now = Instant::now();
        if now >= deadline {
            stopped = Some(Stopped::Wall);
            break;
        }
        if closed.load(Ordering::Acquire) {
            stopped = Some(Stopped::Closed);
            break;
        }
        if now >= next_cpu_check {
            next_cpu_check = now + CPU_POLL;
            if io.cgroup.cpu().is_some_and(|cpu| cpu.saturating_sub(cpu_start) > limits.cpu_time) {
                stopped = Some(Stopped::Cpu);
                break;
            }
        }
        let mut fds = vec![
            libc::pollfd { fd: io.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: io.stdout.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: io.stderr.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if written < frame.len() {
            fds.push(libc::pollfd { fd: stdin.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
        }
        let wake = deadline.min(next_cpu_check).saturating_duration_since(Instant::now());
        let timeout = i32::try_from(wake.as_millis().clamp(1, 100)).unwrap_or(100);
        if sys::poll(&mut fds, timeout).is_err() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let ready = |i: usize| fds.get(i).is_some_and(|p| p.revents != 0);
        if ready(3) {
            match stdin.write(frame.get(written..).unwrap_or_default()) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => ended = true,
            }
        }
        if ready(2) {
            match read_some(io.stderr.as_raw_fd(), &mut chunk) {
                Some(bytes) => {
                    let room = limits.output_bytes.saturating_sub(stderr.len());
                    stderr_dropped |= bytes.len() > room;
                    stderr.extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
                }
                None => ended = true,
            }
        }
        if ready(1) {
            match read_some(io.stdout.as_raw_fd(), &mut chunk) {
                Some(bytes) => {
                    buffer.extend_from_slice(bytes);
                    match parse_frame(buffer, most) {
                        Frame::Whole(body) => answer = Some(body),
                        Frame::Partial => {}
                        Frame::Oversized => stopped = Some(Stopped::Oversized),
                    }
                }
                None => ended = true,
            }
        }
        if ready(0) {
            ended = true;
        }
    }
    let cpu = io.cgroup.cpu().map(|c| c.saturating_sub(cpu_start));
    if answer.is_none() {
        // The session cannot go on: its jail goes with this step.
        sys::kill(io.pid, libc::SIGKILL);
        let _ = sys::wait_exited_unreaped(io.pid);
    }
    let after = io.cgroup.stats();
    let mut outcome = NativeOutcome::failed(Status::Ok, String::new(), job.arrived.elapsed());
    outcome.error = None;
    outcome.stderr = stderr;
    outcome.stderr_truncated = stderr_dropped;
    outcome.cpu = cpu;
    outcome.peak_memory_bytes = after.peak_memory_bytes;
    outcome.peak_processes = after.peak_processes;
    outcome.timings = Timings::default();
    let oom = after.oom_kills > before.oom_kills;
    let pids = after.pids_refused > before.pids_refused;
    outcome.limits_hit =
        [(pids, "pids"), (oom, "memory")].into_iter().filter_map(|(hit, l)| hit.then_some(l)).collect();
    let (status, message) = match (answer, stopped) {
        (Some(body), _) => return answered(outcome, &body),
        (None, _) if oom => (
            Status::MemoryLimit,
            format!("the session ran out of memory: the tier allows {} bytes", limits.memory_bytes),
        ),
        (None, Some(Stopped::Wall)) => {
            (Status::Timeout, format!("wall-clock budget of {} ms ran out", limits.wall_time.as_millis()))
        }
        (None, Some(Stopped::Cpu)) => {
            (Status::CpuLimit, format!("CPU time budget of {} ms used up", limits.cpu_time.as_millis()))
        }
        (None, Some(Stopped::Closed)) => {
            (Status::Cancelled, "cancelled: the session was closed while this step ran".to_owned())
        }
        (None, Some(Stopped::Oversized)) => {
            (Status::Crashed, format!("the session's interpreter answered past {most} bytes: the session ended"))
        }
        (None, None) => (Status::Crashed, "the session's interpreter ended".to_owned()),
    };
    outcome.status = status;
    outcome.error = Some(message);
    outcome
}

/// Reads what is there: `None` at end of file or on an error.
fn read_some(fd: RawFd, chunk: &mut [u8]) -> Option<&[u8]> {
    match sys::read(fd, chunk) {
        Ok(0) => None,
        Ok(n) => chunk.get(..n),
        Err(libc::EAGAIN | libc::EINTR) => Some(&[]),
        Err(_) => None,
    }
}

enum Frame {
    Whole(Vec<u8>),
    Partial,
    Oversized,
}

/// A frame at the start of `buffer`: its length in decimal, a newline, the bytes.
fn parse_frame(buffer: &[u8], most: usize) -> Frame {
    let Some(newline) = buffer.iter().position(|&b| b == b'\n') else {
        return if buffer.len() > 20 { Frame::Oversized } else { Frame::Partial };
    };
    let Some(len) = std::str::from_utf8(&buffer[..newline]).ok().and_then(|s| s.trim().parse::<usize>().ok()) else {
        return Frame::Oversized;
    };
    if len > most {
        return Frame::Oversized;
    }
    match buffer.get(newline + 1..newline + 1 + len) {
        Some(body) => Frame::Whole(body.to_vec()),
        None => Frame::Partial,
    }
}

/// The program's answer to a step: `{"ok": true, "answer": {...}}` (the
/// answer is the step's output), or `{"ok": false, "stdout", "traceback"}`.
fn answered(mut outcome: NativeOutcome, body: &[u8]) -> NativeOutcome {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match parsed {
        Some(serde_json::Value::Object(mut frame)) if frame.get("ok") == Some(&serde_json::Value::Bool(true)) => {
            let answer = frame.remove("answer").unwrap_or(serde_json::Value::Null);
            outcome.stdout = serde_json::to_vec(&answer).unwrap_or_default();
            outcome.exit_code = Some(0);
        }
        Some(serde_json::Value::Object(frame)) => {
            let text = |key: &str| frame.get(key).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
            outcome.stdout = text("stdout").into_bytes();
            outcome.stderr.extend_from_slice(text("traceback").as_bytes());
            outcome.exit_code = Some(1);
            outcome.status = Status::ToolError;
            outcome.error = Some("the step's code raised an exception (the traceback is on stderr)".to_owned());
        }
        _ => {
            outcome.status = Status::ToolError;
            outcome.error = Some("the session's interpreter answered something that is not a step's answer".to_owned());
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_whole_and_refused_when_oversized() {
        assert!(matches!(parse_frame(b"5\nhel", 100), Frame::Partial));
        assert!(matches!(parse_frame(b"5\nhello, and more", 100), Frame::Whole(b) if b == b"hello"));
        assert!(matches!(parse_frame(b"500\n", 100), Frame::Oversized));
        assert!(matches!(parse_frame(b"x\n", 100), Frame::Oversized));
        assert!(matches!(parse_frame(b"123456789012345678901234", 100), Frame::Oversized));
        assert!(matches!(parse_frame(b"12", 100), Frame::Partial));
    }
}
