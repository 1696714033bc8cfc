//! This node among the nodes sharing a PostgreSQL store (issue 19): its
//! name, its heartbeat, and the admissions that must count every node's
//! calls — a user's calls in flight and requests per second are held to the
//! tier's across the nodes ([`crate::store::Live`]). On SQLite there is one
//! node and none of this runs: [`super::admission`] alone decides.
//!
//! A node admits locally first (its own caps and memory, no round trip),
//! then takes the user's place in the store. It keeps the calls it holds
//! places for, so its heartbeat can write them back after the database lost
//! them, and remove those whose release did not reach it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::admission::Denial;
use super::error::ApiError;
use crate::store::{Held, Home, Live, Orphan, StoreError};

/// How often a node says it is alive and writes back what it holds.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node unseen for this long is taken for dead: its calls' places are given
/// back. A node that was only cut off from the database for longer writes its
/// places back when it returns (until then its users may run more calls than
/// their tier's across the nodes).
pub(crate) const LEASE: Duration = Duration::from_secs(10);
/// How long one heartbeat may take: well within the lease.
const BEAT_TIMEOUT: Duration = Duration::from_secs(4);

pub(crate) struct Node {
    /// Unique per process start: `<host>/<random>`.
    pub(crate) id: String,
    /// Where it listens, for the nodes table.
    address: String,
    live: Live,
    next: AtomicU64,
    /// Calls with a place being taken (`false`) or held (`true`), and whose.
    calls: Mutex<HashMap<String, (String, bool)>>,
}

/// A call's place across the nodes; given back when dropped.
pub(crate) struct Place {
    node: Arc<Node>,
    call: String,
}

impl Place {
    /// A place the store refused: nothing to give back.
    fn forgotten(mut self) {
        let call = std::mem::take(&mut self.call);
        self.node.forget(&call);
    }

    /// Gives the place back now (the call has ended), so that the caller's
    /// next call finds it free; dropped instead, it goes back soon after.
    pub(crate) async fn give_back(mut self) {
        let call = std::mem::take(&mut self.call);
        self.node.release(&call).await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.call.is_empty() {
            return; // given back
        }
        let node = Arc::clone(&self.node);
        let call = std::mem::take(&mut self.call);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime left: the place goes with the node's lease.
            node.forget(&call);
            return;
        };
        runtime.spawn(async move { node.release(&call).await });
    }
}

impl Node {
    pub(crate) fn new(live: Live, address: String) -> Arc<Self> {
        let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
        let mut random = [0u8; 6];
        let _ = getrandom::fill(&mut random);
        let id = format!("{host}/{}", hex::encode(random));
        Arc::new(Self { id, address, live, next: AtomicU64::new(0), calls: Mutex::default() })
    }

    /// Gives back `call`'s place in the store, and forgets it.
    async fn release(&self, call: &str) {
        if let Err(e) = self.live.give_place(call).await {
            // The next heartbeat removes it: the call is no longer held here.
            tracing::warn!(error = %e, call, "giving back a call's place in the store failed");
        }
        self.forget(call);
    }

    fn forget(&self, call: &str) {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).remove(call);
    }

    /// A place for a call of `user`, whose tier allows `cap` calls at once
    /// across the nodes.
    ///
    /// # Errors
    ///
    /// `Ok(Err(denial))` when the user's calls on all nodes are at the cap;
    /// `Err` (503) when the database cannot be reached.
    pub(crate) async fn take_place(self: &Arc<Self>, user: &str, cap: u32) -> Result<Result<Place, Denial>, ApiError> {
        let call = format!("{}#{}", self.id, self.next.fetch_add(1, Ordering::Relaxed));
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).insert(call.clone(), (user.to_owned(), false));
        // Until it is known taken or refused, the place is a Place: dropped
        // (the request cancelled mid-way), it is given back in case the
        // statement went through.
        let pending = Place { node: Arc::clone(self), call };
        let taken = self.live.take_place(&pending.call, user, &self.id, cap).await;
        match taken {
            Ok(Ok(())) => {
                if let Some(entry) = self.calls.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&pending.call) {
                    entry.1 = true;
                }
                Ok(Ok(pending))
            }
            Ok(Err(running)) => {
                pending.forgotten();
                Ok(Err(Denial {
                    reason: "user_concurrency",
                    message: format!("{running} calls already running across the nodes, the tier's limit"),
                    retry_after: 1,
                }))
            }
            Err(e) => {
                // Whether it went through is not known: given back (dropped).
                drop(pending);
                Err(unreachable(e))
            }
        }
    }

    /// Takes one request from `user`'s bucket shared by the nodes (`rate`
    /// per second, bursts of twice that).
    ///
    /// # Errors
    ///
    /// `Ok(Err(denial))` when the bucket is empty; `Err` (503) when the
    /// database cannot be reached.
    pub(crate) async fn take_token(&self, user: &str, rate: u32) -> Result<Result<(), Denial>, ApiError> {
        let rate = f64::from(rate.max(1));
        match self.live.take_token(user, rate, 2.0 * rate).await {
            Ok(Ok(())) => Ok(Ok(())),
            Ok(Err(wait)) => Ok(Err(Denial {
                reason: "rate",
                message: format!(
                    "over your rate of {rate} requests per second across the nodes (the tier's, or lower while \
                     throttled)"
                ),
                retry_after: wait.ceil() as u64,
            })),
            Err(e) => Err(unreachable(e)),
        }
    }

    /// Says this node is alive, writes back the places it holds, and gives
    /// back dead nodes' places.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub(crate) async fn beat(&self) -> Result<crate::store::Beat, StoreError> {
        let held = || {
            let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            Held {
                held: calls.iter().filter(|(_, (_, held))| *held).map(|(c, (u, _))| (c.clone(), u.clone())).collect(),
                keep: calls.keys().cloned().collect(),
            }
        };
        self.live.heartbeat(&self.id, &self.address, held, LEASE).await
    }

    /// Records that this node holds code session `id`.
    pub(crate) async fn own_session(&self, id: &str) -> Result<(), StoreError> {
        self.live.own_session(id, &self.id).await
    }

    /// The node holding the caller's open session `id`, when another does.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub(crate) async fn session_elsewhere(&self, id: &str, user: &str) -> Result<Option<Home>, StoreError> {
        Ok(self.live.session_home(id, user).await?.filter(|home| home.node != self.id))
    }

    /// The open sessions of `nodes`, found dead.
    pub(crate) async fn sessions_of(&self, nodes: &[String]) -> Result<Vec<Orphan>, StoreError> {
        self.live.sessions_of(nodes).await
    }

    /// Leaves the nodes' table, giving back any place still held.
    pub(crate) async fn leave(&self) {
        if let Err(e) = self.live.leave(&self.id, LEASE).await {
            tracing::warn!(error = %e, node = %self.id, "leaving the nodes' table failed: the lease will end it");
        }
    }
}

/// A database that cannot be reached while admitting: 503, try again.
fn unreachable(e: StoreError) -> ApiError {
    let mut error = ApiError::from(e);
    if error.status == axum::http::StatusCode::INTERNAL_SERVER_ERROR {
        // Any failure to count the user's calls refuses the call: never admit blind.
        error = ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "this node could not count your calls across the nodes; try again shortly",
        );
    }
    error.retry_after = error.retry_after.or(Some(1));
    error
}

/// The header a node puts on a request it forwards to another: the node
/// that receives it answers it itself, never forwards it again.
pub(crate) const FORWARDED_BY: &str = "x-imagentx-forwarded-by";

/// How long a node waits to reach another before answering 503.
const FORWARD_CONNECT: Duration = Duration::from_secs(5);

/// Sends the request (`method` `path`, the client's `headers` and `body`) to
/// the node at `address` that holds what it asks for, and answers what that
/// node answers. The client's credentials go with it: that node
/// authenticates the request again.
///
/// # Errors
///
/// 503 `node_unreachable` (with `Retry-After`) when the node does not answer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    node: &Node,
    owner: &str,
    address: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    (body, limit): (Bytes, Duration),
) -> Result<Response, ApiError> {
    let unreachable = |why: String| {
        tracing::warn!(node = owner, address, error = %why, "forwarding a request to the node holding it failed");
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unreachable",
            format!(
                "what this asks for is held by node {owner} at {address}, which did not answer ({why}); if that node \
                 is gone, the session ends within {} s",
                LEASE.as_secs() + HEARTBEAT.as_secs()
            ),
        );
        error.retry_after = Some(2);
        error
    };
    let stream = tokio::time::timeout(FORWARD_CONNECT, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| unreachable("no connection within 5 s".to_owned()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder().method(method).uri(path);
    for (name, value) in headers.iter().filter(|(name, _)| !hop_by_hop(name)) {
        request = request.header(name, value);
    }
    // The client as this node saw it: the owner counts it for behaviour
    // analysis when it trusts the nodes' addresses ([server] trusted_proxies).
    if let Some(client) = client {
        request = request.header("x-forwarded-for", client.to_string());
    }
    let request = request
        .header(header::HOST, address)
        .header(FORWARDED_BY, node.id.as_str())
        .body(Full::new(body))
        .map_err(|e| ApiError::internal("forwarding a request", &e))?;
    // The longest a step may run, and then some: a node that froze, or a
    // link that went silent, does not hold the request forever.
    let answered = tokio::time::timeout(limit, async {
        let answer = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = answer.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((parts, body))
    })
    .await
    .map_err(|_| format!("no answer within {} s", limit.as_secs()))
    .flatten();
    let (parts, body) = answered.map_err(unreachable)?;
    let mut response = (parts.status, body).into_response();
    for (name, value) in parts.headers.iter().filter(|(name, _)| !hop_by_hop(name)) {
        response.headers_mut().insert(name, value.clone());
    }
    Ok(response)
}

/// Headers of one connection, not of the request: never forwarded.
fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
            | "x-forwarded-for"
    ) || name == FORWARDED_BY
}

/// Keeps this node's row alive and its places right, every [`HEARTBEAT`]
/// (each heartbeat given [`BEAT_TIMEOUT`]); after a heartbeat that found
/// nodes dead, ends the sessions they held; after one that found this
/// node's row lost, ends here the sessions another node ended meanwhile.
pub(crate) async fn heartbeat(state: Arc<super::AppState>) {
    let Some(node) = state.node.clone() else { return };
    let mut every = tokio::time::interval(HEARTBEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        every.tick().await;
        let beat = tokio::time::timeout(BEAT_TIMEOUT, node.beat())
            .await
            .unwrap_or_else(|_| Err(StoreError::Unreachable(format!("no answer within {BEAT_TIMEOUT:?}"))));
        match beat {
            Ok(beat) => {
                if failing {
                    tracing::info!(node = %node.id, "the database answers the heartbeat again");
                }
                failing = false;
                if !beat.reaped_nodes.is_empty() || beat.reaped_places > 0 {
                    tracing::warn!(
                        nodes = ?beat.reaped_nodes,
                        places = beat.reaped_places,
                        lease_s = LEASE.as_secs(),
                        "nodes unseen for the lease taken for dead: their calls' places given back"
                    );
                }
                if !beat.reaped_nodes.is_empty() {
                    let (state, dead) = (Arc::clone(&state), beat.reaped_nodes);
                    tokio::spawn(async move { super::sessions::end_sessions_of(&state, &dead).await });
                }
                if beat.rejoined {
                    tracing::warn!(node = %node.id, "this node's row in the store was lost (a crash of the database, \
                                   or cut off past its lease): its places are written back");
                    let state = Arc::clone(&state);
                    tokio::spawn(async move { super::sessions::drop_ended_elsewhere(&state).await });
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, node = %node.id, "the heartbeat did not reach the database");
                }
                failing = true;
            }
        }
    }
}
