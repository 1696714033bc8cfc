//! The one error type of the HTTP API. Every failure answers
//! `{"error": {"code", "message"}}` with a status that says whose fault it is:
//! 4xx for the client's mistakes, 5xx only for the server's own.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use serde::Deserialize as _;

use crate::store::StoreError;
use crate::userfs::FsError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 answers.
    pub retry_after: Option<u64>,
    /// A path refused because it would leave the caller's directory (for
    /// behaviour analysis).
    pub escape: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None, escape: false }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn too_many(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self { retry_after: Some(retry_after.max(1)), ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message) }
    }

    /// The filesystem of the data directory is full: 507, and the client may
    /// try again once an operator has made room (logged as an error: it
    /// needs one).
    pub fn storage_full(what: &str) -> Self {
        tracing::error!("{what} failed: no space left on the data directory's filesystem");
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage_full",
            format!("{what} failed: the server has no space left to store it; try again later"),
        )
    }

    /// The server's own failure: logged in full, answered in general terms.
    pub fn internal(what: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", format!("{what} failed; see the server log"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => Self::not_found("not_found", m),
            StoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            e if e.is_disk_full() => Self::storage_full("recording it in the database"),
            e if e.is_busy() => {
                tracing::error!(error = %e, "the database stayed locked by another process past the writer's patience");
                Self {
                    retry_after: Some(1),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "database_busy",
                        "the database is locked by another process (a backup or a manual session?); nothing was \
                         recorded; try again shortly",
                    )
                }
            }
            e if e.is_unreachable() => {
                // Once a second at most: every request says it while the database is away.
                static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let now = crate::store::unix_now().max(0) as u64;
                if LAST.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                    tracing::error!(error = %e, "the database cannot be reached (said once a second at most)");
                }
                Self {
                    retry_after: Some(1),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "database_unavailable",
                        "the database cannot be reached from this node; try again shortly (or on another node)",
                    )
                }
            }
            e => Self::internal("database", &e),
        }
    }
}

impl From<FsError> for ApiError {
    fn from(e: FsError) -> Self {
        match e {
            FsError::Escape(_) => Self { escape: true, ..Self::bad_request("bad_path", e.to_string()) },
            // A link the user's own tools made is no escape attempt: it is only never followed.
            FsError::BadPath(_) | FsError::Symlink => Self::bad_request("bad_path", e.to_string()),
            FsError::NotFound => Self::not_found("not_found", "no such file or directory"),
            FsError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            FsError::QuotaExceeded(m) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded", m),
            FsError::Io(m) => Self::internal("file system", &m),
            FsError::NoSpace(what) => Self::storage_full(&what),
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "bad_body" };
        Self::new(status, code, e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Reads an optional whole number of a request body: JSON Schema's
/// `integer`, which includes a number written with a zero fraction
/// (`5000.0`, as Python's `json.dumps` writes a float). A fraction, a
/// negative number or one past `T` is refused with what was expected.
/// For `#[serde(default, deserialize_with = "whole_number")]`.
///
/// # Errors
///
/// Serde's error for any other value.
pub fn whole_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error as _;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else { return Ok(None) };
    let too_large = || D::Error::custom(format!("{number} is too large for this field"));
    let whole = match number.as_u64() {
        Some(whole) => whole,
        None => match number.as_f64() {
            // Below 2^53 every whole number is exact in an f64.
            Some(f) if f.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&f) => f as u64,
            Some(f) if f.fract() == 0.0 && f > 0.0 => return Err(too_large()),
            _ => return Err(D::Error::custom(format!("invalid value {number}, expected a whole number"))),
        },
    };
    T::try_from(whole).map(Some).map_err(|_| too_large())
}

/// Parses a JSON request body into `T`, answering 400 with serde's message.
///
/// # Errors
///
/// [`ApiError`] 400 `bad_json`.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every request body is an object: serde would also read a struct from an
    // array of its fields in order (`[3600, "why"]`), which nobody means.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::bad_request("bad_json", "request body: a JSON object is expected, not an array"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("bad_json", format!("request body: {e}")))
}

/// `axum::extract::Path` whose rejection (bad percent-encoding, a segment that
/// is not valid UTF-8) is our 400, not axum's plain-text one.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(t)| ApiPath(t))
            .map_err(|e| ApiError::bad_request("bad_path", e.body_text()))
    }
}

/// How long a client may take to send a request body.
const BODY_TIME: std::time::Duration = std::time::Duration::from_secs(120);

/// Reads a request body of at most `limit` bytes.
///
/// A longer body is still read to its end (up to four times the limit, and
/// not when its `Content-Length` already says it is longer) and thrown away
/// before answering 413: a server that answers and closes while the client is
/// still sending makes the kernel reset the connection, and the client never
/// sees the answer.
///
/// # Errors
///
/// 413 `body_too_large`, 408 `body_timeout` after two minutes, 400 `bad_body`.
pub async fn read_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let drain_cap = limit.saturating_mul(4).max(1 << 20);
    let too_large = || {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over the {limit}-byte limit"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > drain_cap as u64) {
        return Err(too_large());
    }
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad_request("bad_body", format!("reading the body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                total = total.saturating_add(data.len());
                if total <= limit {
                    buf.extend_from_slice(&data);
                } else if total > drain_cap {
                    break;
                }
            }
        }
        Ok::<(), ApiError>(())
    };
    tokio::time::timeout(BODY_TIME, read).await.map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the body took over two minutes to arrive",
        )
    })??;
    if total > limit {
        return Err(too_large());
    }
    Ok(buf.freeze())
}
