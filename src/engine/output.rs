//! Capped stdout/stderr for guests.
//!
//! wasmtime-wasi's `MemoryOutputPipe` fails the guest's write once it is full,
//! which turns an output flood into a crash (Rust's `println!` panics on a failed
//! write). The contract is different: bytes over the cap are dropped, the report
//! says `truncated`, and the status stays what the run ended with. So this pipe
//! accepts every write and keeps only the first `cap` bytes.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// An in-memory output stream that keeps at most `cap` bytes and counts the rest.
#[derive(Clone)]
pub(crate) struct CappedPipe {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    cap: usize,
    dropped: u64,
}

/// What a guest wrote: the kept bytes and whether any were dropped.
pub(crate) struct CapturedOutput {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

impl CappedPipe {
    pub(crate) fn new(cap: usize) -> Self {
        Self { inner: Arc::new(Mutex::new(Captured { kept: Vec::new(), cap, dropped: 0 })) }
    }

    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A panic while holding this lock cannot leave the buffer inconsistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = self.lock();
        let room = c.cap.saturating_sub(c.kept.len());
        let keep = bytes.len().min(room);
        c.kept.extend_from_slice(&bytes[..keep]);
        c.dropped += (bytes.len() - keep) as u64;
    }

    /// Takes what was written so far.
    pub(crate) fn take(&self) -> CapturedOutput {
        let mut c = self.lock();
        CapturedOutput { bytes: std::mem::take(&mut c.kept), truncated: std::mem::take(&mut c.dropped) > 0 }
    }
}

#[async_trait::async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready; what does not fit is dropped, not refused.
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_beyond_the_cap_are_dropped_and_flagged() {
        let pipe = CappedPipe::new(5);
        pipe.push(b"abc");
        pipe.push(b"defgh");
        let out = pipe.take();
        assert_eq!(out.bytes, b"abcde");
        assert!(out.truncated);
    }

    #[test]
    fn output_within_the_cap_is_kept_whole() {
        let pipe = CappedPipe::new(5);
        pipe.push(b"abcde");
        let out = pipe.take();
        assert_eq!(out.bytes, b"abcde");
        assert!(!out.truncated);
    }
}
