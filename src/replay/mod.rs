//! `Last-Event-ID` replay: a reconnecting client gets what it missed, then the live stream.
//!
//! [`ReplayLayer`] records every event-stream response to a `GET` that passes through, event by
//! event, into a [`ReplayStore`] under a stream key (see [below](#who-shares-a-history)). When a
//! client reconnects with `Last-Event-ID` (the header, or a `lastEventId` query parameter as
//! EventSource polyfills and Mercure send it), the layer:
//!
//! 1. looks the id up in the store (bounded: an index, not a scan);
//! 2. sends the retained events after it, first in the response;
//! 3. calls the inner service with `Last-Event-ID` set to the last replayed id, so an upstream that
//!    can resume continues exactly from there (after an unknown id replayed from the oldest event,
//!    the client's own id goes to the inner service instead);
//! 4. drops live events whose ids the client already has (the one it sent, and every replayed
//!    one) for the life of the stream, so an upstream that resends them delivers nothing twice.
//!
//! Several clients on one key share one history; an event seen by several connections is stored
//! once, by id. Only events with an id are recorded: an event without one can be neither resumed
//! after nor told apart from its copies. To give every event an id, see [`Ids`]: the fan-out
//! hub assigns them, once per key for every connection.
//!
//! A client that sends no id gets the live stream, or first what the
//! [`first_message`](ReplayLayer::first_message) policy says: the newest event, the last N, or
//! everything retained (a "snapshot"; the upstream is then asked to resume after it).
//!
//! Every replayed response says where it resumed in a `sse-resumed-from` header: `new` (no id
//! was sent), `snapshot` (no id was sent; retained events came first), `last-event-id` (found;
//! what followed was replayed, and nothing is missing), `partial` (found and replayed, but
//! nothing recorded the stream for a while after it, and the upstream is not known to resume:
//! events sent meanwhile may be missing), `earliest` (unknown id; replayed from the oldest
//! retained event), `live` (unknown id; nothing old was sent) or `upstream` (the id went to the
//! inner service untouched). With [`history_lost_event`](ReplayLayer::history_lost_event) a named
//! event tells the page itself whenever the layer cannot promise the client misses nothing
//! (`partial`, `earliest`, `live`, and `upstream` unless the upstream is
//! [known to resume](ReplayLayer::upstream_resumes)).
//!
//! A store that tracks recorders ([`ReplayStore::recorder_started`]; the memory store does, and
//! the Redis store for what its instance recorded) knows when nobody recorded a key: a lone
//! client that went away, without the fan-out hub. While another client or the hub records the
//! stream, a reconnecting client gets `last-event-id`.
//!
//! # Who shares a history
//!
//! Every request with the same key reads and records one history. The default key,
//! [`PathAndQuery`], is the request's path, its query without `lastEventId`, and, when the
//! request carries credentials (`Authorization`, `Cookie`, or headers named with
//! [`PathAndQuery::credential_headers`]), a SHA-256 digest of them (never the credentials in
//! clear). So one user is never replayed another's events, nor an anonymous client a user's.
//! [`PathAndQuery::share_across_credentials`] opts out, for streams that are the same for
//! everybody; [`PathAndQuery::query_params`] keeps only the named query parameters in the key,
//! so clients cannot make up keys (and fill the store) at will. A custom [`StreamKey`] (a
//! closure too) replaces all of this and is responsible for keeping users apart itself.
//!
//! Only `GET` requests are recorded and replayed: any other method (`POST`, `HEAD`, ...) goes
//! to the inner service untouched, `Last-Event-ID` included, and its response is not recorded.
//!
//! # QoS
//!
//! Five delivery levels, as SSE gateways name them (Gravitee's SSE Advanced among them), are
//! presets of the layer:
//!
//! | [`Qos`] | known id | unknown or expired id | store failure | guarantees |
//! |---|---|---|---|---|
//! | `None` | nothing recorded or replayed | header to the inner service | - | none from this layer |
//! | `AtBest` | replay after it | header to the inner service | header to the inner service | best effort, no cost when history is missing |
//! | `Balanced` (default) | replay after it | replay from the oldest retained | header to the inner service | no duplicates; loss only beyond the retained window |
//! | `AtMostOnce` | replay after it | nothing old (`live`) | nothing old | an id is never delivered twice to a reconnecting client; loss preferred |
//! | `AtLeastOnce` | replay after it | replay from the oldest retained | header to the inner service | everything retained is redelivered; duplicates preferred to loss |
//!
//! The window is the store's: a [`MemoryStore`] keeps, per key, the newest events within its
//! [`MemoryLimits`]; a `RedisStore` (feature `redis`) keeps them in Redis Streams, shared by
//! every instance that points at the same Redis. At-least-once replays up to the whole window at once; the others up to
//! [`max_replay`](ReplayLayer::max_replay) events (default 1,000). The cost of replay is one store
//! read per reconnect and one append per recorded event.
//!
//! An event that was in flight while the client reconnected (recorded by another connection
//! after the replay was read, but begun upstream before the new connection joined) is sent from
//! the store just before the next live event: the first new live event triggers one more read
//! after the client's newest id. This needs the recording connection to be ahead of the
//! reconnecting one; with independent upstream connections a lagging recorder can still leave a
//! gap, which a hub that keeps one upstream subscription per key closes.
//!
//! Without a hub, every connection on a key records what it carries. The store keeps one
//! history per key and is told where each connection's recording stands
//! ([`ReplayStore::append_carried`]): a connection whose next event follows its previous one in
//! the history carries what another recorded already (one comparison of ids, nothing copied),
//! and a connection that fell behind the retained history (a slow client's) appends nothing, so
//! no stale event comes after the newest and reaches a resuming client twice. A connection's
//! first frame has no place yet: its events are looked up by id, and those not retained are
//! appended.
//!
//! The layer knows the client has its own last event and whatever was replayed; it cannot know
//! about older events. An upstream that ignores `Last-Event-ID` and resends events from before
//! the client's id will get them through; such an upstream belongs behind a hub that keeps one
//! subscription per key.
//!
//! # Bad input
//!
//! An id longer than [`max_id_len`](ReplayLayer::max_id_len) (256 bytes by default) or holding a
//! control character is treated as unknown: never looked up, never stored, never echoed.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http::{header, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceExt};
//! use tower_layer::Layer;
//! use tower_sse::replay::ReplayLayer;
//!
//! // An upstream that sends three events and cannot resume by itself.
//! let upstream = service_fn(|_req: Request<()>| async {
//!     let body = Full::new(bytes::Bytes::from_static(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n"));
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .body(body)
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let service = ReplayLayer::new().layer(upstream);
//!
//! // A first client records the stream.
//! let first = service.clone().oneshot(Request::new(())).await.unwrap();
//! first.into_body().collect().await.unwrap();
//!
//! // A client that saw event 1 reconnects: it gets 2 and 3 from the store. This upstream
//! // ignores Last-Event-ID and sends 1, 2, 3 again: the client has them, so they are dropped.
//! // Nothing recorded the stream since the first client left, and this upstream is not
//! // declared to resume (`upstream_resumes`): events sent meanwhile may be missing, and the
//! // answer says so.
//! let request = Request::builder().header("last-event-id", "1").body(()).unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.headers()["sse-resumed-from"], "partial");
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "id: 2\ndata: b\n\nid: 3\ndata: c\n\n");
//! # }
//! ```

mod body;
#[cfg(feature = "redis")]
mod redis_store;
mod store;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderValue, Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;

pub use body::ReplayBody;
pub(crate) use body::{Admit, Recorder, ReplayStage};
#[cfg(all(feature = "redis", feature = "subscriptions"))]
pub(crate) use redis_store::{timed, Connection as RedisConnection};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis_store::{RedisConfig, RedisStats, RedisStore};
pub use store::{
    CarriedEvents, Lookup, MemoryLimits, MemoryStore, Position, ReadFrom, ReplayStore, StoreError,
    StoredEvent,
};

use crate::engine::{EngineBody, Stages, Start};
use crate::future::Exchange;
use crate::telemetry;
use crate::wire::{is_plain_event_stream, Event, LAST_EVENT_ID};

const RESUMED_FROM: HeaderName = HeaderName::from_static("sse-resumed-from");
const QUERY_PARAMETER: &str = "lastEventId";
const DEFAULT_MAX_ID_LEN: usize = 256;

/// Which requests share a history: the stream key of a request, or `None` to leave it alone.
///
/// A key decides who sees whose events: the replay layer replays, and the fan-out hub shares,
/// everything recorded under a key to every request with that key. A custom key (a closure
/// included) is responsible for keeping users apart itself: unless a stream is the same for
/// everybody, put the caller's identity into the key, as [`PathAndQuery`] does by default.
pub trait StreamKey<B>: Clone + Send + Sync + 'static {
    /// The key of `request`.
    fn key(&self, request: &Request<B>) -> Option<Bytes>;
}

/// The default [`StreamKey`]: the request's path and query, and a digest of its credentials.
///
/// The key of a request is, in this order:
///
/// 1. the path, as sent;
/// 2. the query, as sent, without `lastEventId` parameters (the id a client resumes from is
///    not part of the stream); with [`query_params`](Self::query_params), only the named
///    parameters, sorted by the order of the names, repeats dropped, escapes of unreserved
///    characters decoded (so `?b=1&a=2`, `?a=2&b=1&a=2` and `?%61=2&b=1` are one key);
/// 3. when the request carries credentials (any of the `Authorization` and `Cookie` headers,
///    and the names added with [`credential_headers`](Self::credential_headers)):
///    `#credentials=` and the SHA-256 of those headers' names and values, in hex. The
///    credentials themselves are never stored; the digest is the same on every instance, so
///    gateways that share a Redis store agree on keys. (It is unsalted: whoever can read the
///    store's keys can test guesses of a weak credential, a short password say, against it.)
///
/// So a request with credentials never reads, and is never recorded into, the history of a
/// request with other credentials or none, and the fan-out hub never hands it a subscription
/// opened with someone else's credentials (as an HTTP shared cache does not reuse a response
/// to a request with `Authorization`). Requests without credentials share by path and query.
/// (A `#` never reaches a request's path, so no path can pose as a digest.) Every different
/// `Cookie` header is its own key: name only the cookies that matter in a custom key when
/// clients carry others that change.
///
/// [`share_across_credentials`](Self::share_across_credentials) leaves the credentials out:
/// only for streams whose content is the same for everybody who may read them.
///
/// ```
/// use http::Request;
/// use tower_sse::replay::{PathAndQuery, StreamKey};
///
/// let request = |uri: &str, auth: Option<&str>| {
///     let mut request = Request::get(uri);
///     if let Some(auth) = auth {
///         request = request.header("authorization", auth);
///     }
///     request.body(()).unwrap()
/// };
/// let key = PathAndQuery::new();
/// let anonymous = key.key(&request("/events?lastEventId=7", None)).unwrap();
/// assert_eq!(anonymous, "/events");
/// let alice = key.key(&request("/events", Some("Bearer alice"))).unwrap();
/// let bob = key.key(&request("/events", Some("Bearer bob"))).unwrap();
/// assert!(alice.starts_with(b"/events#credentials="));
/// assert_ne!(alice, bob);
/// assert!(!alice.windows(5).any(|w| w == b"alice"));
///
/// // Opt-in: one stream for everybody, keyed by one query parameter only.
/// let shared = PathAndQuery::new().share_across_credentials().query_params(["topic"]);
/// let bob = shared.key(&request("/events?x=1&topic=a", Some("Bearer bob"))).unwrap();
/// assert_eq!(bob, "/events?topic=a");
/// ```
#[derive(Clone, Debug)]
pub struct PathAndQuery {
    credentials: Arc<[HeaderName]>,
    share_across_credentials: bool,
    /// `None`: the whole query.
    query_params: Option<Arc<[Box<str>]>>,
}

impl Default for PathAndQuery {
    fn default() -> Self {
        Self::new()
    }
}

impl PathAndQuery {
    /// Path, whole query (minus `lastEventId`) and a digest of `Authorization` and `Cookie`.
    pub fn new() -> Self {
        Self {
            credentials: Arc::new([header::AUTHORIZATION, header::COOKIE]),
            share_across_credentials: false,
            query_params: None,
        }
    }

    /// Counts these request headers as credentials too (an API key header, say), besides
    /// `Authorization` and `Cookie`.
    pub fn credential_headers<I>(mut self, names: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<HeaderName>,
    {
        let mut all = self.credentials.to_vec();
        for name in names {
            let name = name.into();
            if !all.contains(&name) {
                all.push(name);
            }
        }
        self.credentials = all.into();
        self
    }

    /// Leaves credentials out of the key: requests share by path and query whoever sends them,
    /// and a fan-out subscription opened with one client's credentials feeds every client.
    /// Only for streams that are the same for everybody who may read them.
    pub fn share_across_credentials(mut self) -> Self {
        self.share_across_credentials = true;
        self
    }

    /// Keeps only the query parameters named here in the key, so a client cannot make up new
    /// keys with parameters the stream does not depend on. The request itself is unchanged:
    /// the inner service still gets every parameter. (Under the fan-out hub, the first request
    /// of a key opens the subscription everybody shares: name every parameter the stream
    /// depends on.)
    pub fn query_params<I>(mut self, names: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let names: Vec<Box<str>> = names
            .into_iter()
            .map(|name| normalize(&name.into()).into_owned().into_boxed_str())
            .collect();
        self.query_params = Some(names.into());
        self
    }

    /// The SHA-256 of the request's credentials, `None` when it carries none.
    fn credentials_digest(&self, headers: &http::HeaderMap) -> Option<[u8; 32]> {
        let mut hasher: Option<Sha256> = None;
        for name in self.credentials.iter() {
            for value in headers.get_all(name) {
                let hasher = hasher
                    .get_or_insert_with(|| Sha256::new_with_prefix(b"tower-sse credentials v1\0"));
                hasher.update(name.as_str().as_bytes());
                hasher.update([0]);
                hasher.update((value.len() as u64).to_be_bytes());
                hasher.update(value.as_bytes());
            }
        }
        hasher.map(|hasher| hasher.finalize().into())
    }
}

impl<B> StreamKey<B> for PathAndQuery {
    fn key(&self, request: &Request<B>) -> Option<Bytes> {
        let uri = request.uri();
        let mut key = uri.path().to_owned();
        let pairs = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(QUERY_PARAMETER));
        let kept: Vec<Cow<'_, str>> = match &self.query_params {
            None => pairs.map(Cow::Borrowed).collect(),
            Some(names) => {
                let mut kept: Vec<(usize, Cow<'_, str>)> = pairs
                    .filter_map(|pair| {
                        let pair = normalize(pair);
                        let name = pair.split('=').next().unwrap_or_default();
                        let rank = names.iter().position(|known| **known == *name)?;
                        Some((rank, pair))
                    })
                    .collect();
                // Stable: a parameter's repeated values keep their order.
                kept.sort_by_key(|(rank, _)| *rank);
                kept.dedup();
                kept.into_iter().map(|(_, pair)| pair).collect()
            }
        };
        if !kept.is_empty() {
            key.push('?');
            key.push_str(&kept.join("&"));
        }
        if !self.share_across_credentials {
            if let Some(digest) = self.credentials_digest(request.headers()) {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                key.reserve(CREDENTIALS_MARK.len() + 2 * digest.len());
                key.push_str(CREDENTIALS_MARK);
                for byte in digest {
                    key.push(char::from(HEX[usize::from(byte >> 4)]));
                    key.push(char::from(HEX[usize::from(byte & 0xf)]));
                }
            }
        }
        Some(Bytes::from(key))
    }
}

/// What separates a key's path and query from its credentials digest.
const CREDENTIALS_MARK: &str = "#credentials=";

/// `text` with escapes of unreserved characters decoded and the other escapes' hex digits in
/// upper case (RFC 3986, 6.2.2): one spelling for every equivalent one.
fn normalize(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escape {
            Some(byte) if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) => {
                out.push(char::from(byte));
                i += 3;
            }
            Some(byte) => {
                out.push_str(&format!("%{byte:02X}"));
                i += 3;
            }
            None => {
                // Not an escape: kept as it is (whole UTF-8 sequences, the query is a `&str`).
                let len = text[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&text[i..i + len]);
                i += len;
            }
        }
    }
    Cow::Owned(out)
}

impl<B, F> StreamKey<B> for F
where
    F: Fn(&Request<B>) -> Option<Bytes> + Clone + Send + Sync + 'static,
{
    fn key(&self, request: &Request<B>) -> Option<Bytes> {
        self(request)
    }
}

/// Delivery guarantees, as presets; see the [module docs](self) for the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Qos {
    /// No recording, no replay.
    None,
    /// Replay what is known; otherwise leave it to the inner service.
    AtBest,
    /// Replay what is known; an unknown id replays from the oldest retained event.
    #[default]
    Balanced,
    /// Never deliver an id twice; an unknown id sends nothing old.
    AtMostOnce,
    /// Redeliver everything retained after the id; an unknown id replays from the oldest.
    AtLeastOnce,
}

/// What to do with a `Last-Event-ID` the store does not know (or no longer retains).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownId {
    /// Replay from the oldest retained event (`sse-resumed-from: earliest`).
    FromOldest,
    /// Send nothing old; the inner service gets no `Last-Event-ID` (`live`).
    LiveOnly,
    /// Replay nothing; the inner service gets the header as the client sent it (`upstream`).
    PassUpstream,
}

/// What a call of `ReplayLayer::ids` needs and nothing has: ids are assigned by the fan-out
/// hub (see [`Ids`]).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "the replay layer alone cannot assign ids: each connection would assign its own",
    label = "ids are assigned once per stream by the fan-out hub",
    note = "put `FanoutLayer::new().record_into(store).ids(..)` inside the `ReplayLayer`, or build the stack with `SseStack::new().ids(..)`, which brings the hub in"
)]
pub trait AssignedByTheHub: sealed::Unimplemented {}

mod sealed {
    /// Implemented by nothing.
    pub trait Unimplemented {}
}

/// Whose ids the events carry: set on the fan-out hub ([`FanoutLayer::ids`](crate::FanoutLayer::ids))
/// or the stack ([`SseStack::ids`](crate::SseStack::ids)), which assign each event its id once
/// for every connection on its key.
///
/// ```
/// use tower_sse::replay::{Ids, ReplayLayer};
/// use tower_sse::SseStack;
///
/// // The stack brings the hub in: one upstream subscription and one id per event, whoever reads.
/// let stack = SseStack::new().replay(ReplayLayer::new()).ids(Ids::AssignMissing);
/// # let _ = stack;
/// ```
///
/// The replay layer alone refuses, at build time, with an error that says to add the hub:
///
/// ```compile_fail
/// use tower_sse::replay::{Ids, ReplayLayer};
///
/// // error: the replay layer alone cannot assign ids: each connection would assign its own
/// let replay = ReplayLayer::new().ids(Ids::AssignMissing);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ids {
    /// Keep the upstream's ids; events without one are neither recorded nor resumable.
    #[default]
    Keep,
    /// Give events without an id one from the store, increasing per key.
    AssignMissing,
    /// Give every event an id from the store, replacing the upstream's (whose ids then never
    /// reach the client, so the inner service gets no `Last-Event-ID`).
    AssignAlways,
}

impl Ids {
    /// Whether a message event gets an id from the store under this policy.
    pub(crate) fn assigns(self, event: &Event) -> bool {
        match self {
            Self::Keep => false,
            Self::AssignMissing => event.id().is_none_or(<[u8]>::is_empty),
            Self::AssignAlways => true,
        }
    }
}

/// Only message events with a non-empty id are recorded: the others can be neither resumed
/// after nor told apart from their copies.
pub(crate) fn is_recordable(event: &Event) -> bool {
    event.is_message() && event.id().is_some_and(|id| !id.is_empty())
}

/// Marks a response whose events an inner layer (the fan-out hub) has recorded into the replay
/// store already, with their final ids: the replay layer then neither records nor assigns ids.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AlreadyRecorded;

/// What a client that sends no `Last-Event-ID` gets before the live stream (Nchan's and Axway's
/// "snapshot"). The response says `sse-resumed-from: snapshot` when something was sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FirstMessage {
    /// Nothing old: the live stream only (default).
    #[default]
    LiveOnly,
    /// The newest retained event.
    Newest,
    /// The newest `n` retained events, oldest first.
    Last(usize),
    /// Every retained event (up to [`max_replay`](ReplayLayer::max_replay)), oldest first.
    AllRetained,
}

impl FirstMessage {
    fn read(self, replay_limit: usize) -> (ReadFrom<'static>, usize) {
        match self {
            Self::LiveOnly | Self::Newest => (ReadFrom::Newest, 1),
            Self::Last(n) => (ReadFrom::Newest, n.min(replay_limit)),
            Self::AllRetained => (ReadFrom::Oldest, replay_limit),
        }
    }
}

/// Chooses a [`FirstMessage`] from a stream key.
type ChooseFirst = Arc<dyn Fn(&[u8]) -> FirstMessage + Send + Sync>;

/// The [`FirstMessage`] policy: one for every key, or chosen per key.
#[derive(Clone)]
enum FirstPolicy {
    Fixed(FirstMessage),
    ByKey(ChooseFirst),
}

impl FirstPolicy {
    fn for_key(&self, key: &[u8]) -> FirstMessage {
        match self {
            Self::Fixed(first) => *first,
            Self::ByKey(choose) => choose(key),
        }
    }
}

impl fmt::Debug for FirstPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(first) => first.fmt(f),
            Self::ByKey(_) => f.write_str("ByKey(..)"),
        }
    }
}

#[derive(Clone, Debug)]
struct Config {
    first: FirstPolicy,
    qos: Qos,
    unknown: UnknownId,
    store_failure: UnknownId,
    lost_event: Option<String>,
    /// The inner service resumes after a `Last-Event-ID` it is sent.
    upstream_resumes: bool,
    ids: Ids,
    max_replay: usize,
    max_id_len: usize,
    /// The stages of a stack built together that run in the same pass (none for the replay
    /// layer alone).
    stages: Stages,
}

impl Config {
    fn for_qos(qos: Qos) -> Self {
        let (unknown, store_failure) = match qos {
            Qos::None | Qos::AtBest => (UnknownId::PassUpstream, UnknownId::PassUpstream),
            Qos::Balanced | Qos::AtLeastOnce => (UnknownId::FromOldest, UnknownId::PassUpstream),
            Qos::AtMostOnce => (UnknownId::LiveOnly, UnknownId::LiveOnly),
        };
        Self {
            first: FirstPolicy::Fixed(FirstMessage::LiveOnly),
            qos,
            unknown,
            store_failure,
            lost_event: None,
            upstream_resumes: false,
            ids: Ids::Keep,
            max_replay: 1_000,
            max_id_len: DEFAULT_MAX_ID_LEN,
            stages: Stages::default(),
        }
    }

    fn replay_limit(&self) -> usize {
        match self.qos {
            Qos::AtLeastOnce => usize::MAX,
            _ => self.max_replay,
        }
    }
}

/// Records event streams and replays them to reconnecting clients; see the [module docs](self).
#[derive(Clone)]
pub struct ReplayLayer<St = MemoryStore, K = PathAndQuery> {
    store: St,
    key: K,
    config: Arc<Config>,
}

impl<St: fmt::Debug, K: fmt::Debug> fmt::Debug for ReplayLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayLayer")
            .field("store", &self.store)
            .field("key", &self.key)
            .field("config", &self.config)
            .finish()
    }
}

impl Default for ReplayLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayLayer {
    /// Balanced QoS over a new [`MemoryStore`] with default limits, keyed by [`PathAndQuery::new`].
    pub fn new() -> Self {
        Self::with_store(MemoryStore::new())
    }
}

impl<St> ReplayLayer<St> {
    /// Balanced QoS over `store`, keyed by [`PathAndQuery::new`].
    pub fn with_store(store: St) -> Self {
        Self {
            store,
            key: PathAndQuery::new(),
            config: Arc::new(Config::for_qos(Qos::default())),
        }
    }
}

impl<St, K> ReplayLayer<St, K> {
    /// Keys requests with `key` (a [`StreamKey`], or a closure `Fn(&Request<B>) -> Option<Bytes>`).
    /// A key other than [`PathAndQuery`] must keep users apart itself: every request with one
    /// key is replayed what any of them recorded.
    pub fn key<K2>(self, key: K2) -> ReplayLayer<St, K2> {
        ReplayLayer {
            store: self.store,
            key,
            config: self.config,
        }
    }

    /// Applies a [`Qos`] preset (and its unknown-id and store-failure policies).
    pub fn qos(mut self, qos: Qos) -> Self {
        let config = Arc::make_mut(&mut self.config);
        let preset = Config::for_qos(qos);
        config.qos = preset.qos;
        config.unknown = preset.unknown;
        config.store_failure = preset.store_failure;
        self
    }

    /// Overrides what an unknown or expired id does.
    pub fn on_unknown_id(mut self, policy: UnknownId) -> Self {
        Arc::make_mut(&mut self.config).unknown = policy;
        self
    }

    /// Sends an event of type `name` when the layer cannot prove the client misses nothing, so
    /// page code learns it (`EventSource` hides headers). Its data is the `sse-resumed-from`
    /// value: `earliest` or `live` (the client's id was unknown), `partial` (recording stopped
    /// for a while after the client's id), `upstream` (the id went to an inner service that is
    /// not known to resume, see [`upstream_resumes`](Self::upstream_resumes)).
    pub fn history_lost_event(mut self, name: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).lost_event = Some(name.into());
        self
    }

    /// Declares that the inner service resumes after the `Last-Event-ID` it is sent, as the
    /// spec asks of servers (default: not known, so not counted on).
    ///
    /// It decides what the layer can promise when its own history is not enough: when nothing
    /// recorded the stream for a while after the client's id (a lone client that went away,
    /// without the fan-out hub), the events retained are replayed and the inner service is
    /// asked to resume after them. With an upstream that resumes, the client then misses
    /// nothing (`sse-resumed-from: last-event-id`); otherwise the answer says `partial` and the
    /// [history-lost event](Self::history_lost_event) is sent. Likewise an id passed to the
    /// inner service untouched (the store failed, or [`UnknownId::PassUpstream`]) comes with
    /// the history-lost event unless the upstream resumes.
    pub fn upstream_resumes(mut self, resumes: bool) -> Self {
        Arc::make_mut(&mut self.config).upstream_resumes = resumes;
        self
    }

    /// What a client that sends no `Last-Event-ID` gets before the live stream (default: live
    /// only).
    pub fn first_message(mut self, first: FirstMessage) -> Self {
        Arc::make_mut(&mut self.config).first = FirstPolicy::Fixed(first);
        self
    }

    /// [`first_message`](Self::first_message) chosen per stream key.
    pub fn first_message_by(
        mut self,
        choose: impl Fn(&[u8]) -> FirstMessage + Send + Sync + 'static,
    ) -> Self {
        Arc::make_mut(&mut self.config).first = FirstPolicy::ByKey(Arc::new(choose));
        self
    }

    /// Refused at build time: ids are assigned by the fan-out hub, once per stream key for
    /// every connection ([`FanoutLayer::ids`](crate::FanoutLayer::ids) inside this layer, or
    /// [`SseStack::ids`](crate::SseStack::ids), which brings the hub in). The replay layer
    /// alone would have each connection give the same event an id of its own: stored once per
    /// client, and a reconnecting client would get events twice.
    #[doc(hidden)]
    pub fn ids<I: AssignedByTheHub>(self, ids: I) -> Self {
        let _ = ids;
        self
    }

    /// Whose ids the events carry, for a hub inside that assigns them.
    #[cfg(test)]
    pub(crate) fn with_ids(mut self, ids: Ids) -> Self {
        Arc::make_mut(&mut self.config).ids = ids;
        self
    }

    /// Replays at most `events` per reconnect (default 1,000; at-least-once replays all).
    pub fn max_replay(mut self, events: usize) -> Self {
        Arc::make_mut(&mut self.config).max_replay = events;
        self
    }

    /// Treats ids longer than `bytes` as unknown (default 256).
    pub fn max_id_len(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_id_len = bytes;
        self
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }
}

impl<St, K> ReplayLayer<St, K> {
    /// Changes the engine stages that run in the same pass (the stack builder's).
    pub(crate) fn with_stages(mut self, change: impl FnOnce(&mut Stages)) -> Self {
        change(&mut Arc::make_mut(&mut self.config).stages);
        self
    }

    /// False for [`Qos::None`]: nothing is recorded or replayed.
    pub(crate) fn is_on(&self) -> bool {
        self.config.qos != Qos::None
    }

    pub(crate) fn stages(&self) -> Stages {
        self.config.stages.clone()
    }

    pub(crate) fn stream_key(&self) -> &K {
        &self.key
    }
}

impl<S, St: Clone, K: Clone> Layer<S> for ReplayLayer<St, K> {
    type Service = Replay<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Replay {
            inner,
            store: self.store.clone(),
            key: self.key.clone(),
            config: self.config.clone(),
        }
    }
}

/// The service made by [`ReplayLayer`]; see the [module docs](self).
#[derive(Clone)]
pub struct Replay<S, St = MemoryStore, K = PathAndQuery> {
    inner: S,
    store: St,
    key: K,
    config: Arc<Config>,
}

impl<S: fmt::Debug, St: fmt::Debug, K: fmt::Debug> fmt::Debug for Replay<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<S> Replay<S> {
    /// Wraps `inner` with a [`MemoryStore`] of its own and the defaults of
    /// [`ReplayLayer::new`].
    pub fn new(inner: S) -> Self {
        ReplayLayer::new().layer(inner)
    }

    /// The layer, to configure it and share its store among services.
    pub fn layer() -> ReplayLayer {
        ReplayLayer::new()
    }
}

impl<S, St, K> Replay<S, St, K> {
    inner_service_accessors!();
}

/// Where a response resumed, as the `sse-resumed-from` header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resumed {
    New,
    /// A new client, given retained events first by the [`FirstMessage`] policy.
    Snapshot,
    LastEventId,
    /// Found, but recording stopped for a while after the client's id.
    Partial,
    Earliest,
    Live,
    Upstream,
}

impl Resumed {
    fn label(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Snapshot => "snapshot",
            Self::LastEventId => "last-event-id",
            Self::Partial => "partial",
            Self::Earliest => "earliest",
            Self::Live => "live",
            Self::Upstream => "upstream",
        }
    }

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.label())
    }
}

/// What a response will replay, decided before the inner service is called.
#[derive(Debug)]
struct Plan {
    key: Bytes,
    /// The id the client sent, when it was valid: the client has that event already.
    client_id: Option<Bytes>,
    resumed: Resumed,
    replay: Vec<StoredEvent>,
    /// The history-lost signal's data, when history was skipped.
    lost: Option<&'static str>,
}

impl Plan {
    fn new(key: Bytes, resumed: Resumed) -> Self {
        Self {
            key,
            client_id: None,
            resumed,
            replay: Vec::new(),
            lost: None,
        }
    }
}

/// Which read a lookup is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    AfterId,
    Oldest,
    /// A new client's first events, as the [`FirstMessage`] policy says.
    Snapshot(FirstMessage),
}

impl<S, St, K, ReqBody, ResBody> Service<Request<ReqBody>> for Replay<S, St, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: ReplayStore,
    K: StreamKey<ReqBody>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ReplayBody<ResBody, St>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let exchange = Exchange::of(&request);
        let config = &self.config;
        // Only GET streams are recorded and replayed: other methods are not reads of a stream.
        let key = match config.qos {
            Qos::None => None,
            _ if request.method() != Method::GET => None,
            _ => self.key.key(&request),
        };
        let Some(key) = key else {
            return self.respond(request, None);
        };
        let (step, client_id) = match last_event_id(&request, config.max_id_len) {
            ClientId::None => match config.first.for_key(&key) {
                FirstMessage::LiveOnly => {
                    return self.respond(request, Some(Plan::new(key, Resumed::New)));
                }
                first => (Step::Snapshot(first), Vec::new()),
            },
            ClientId::Valid(id) => (Step::AfterId, id),
            ClientId::Garbage => {
                telemetry::unknown_id();
                // Never looked up, never passed on.
                request.headers_mut().remove(LAST_EVENT_ID);
                match config.unknown {
                    UnknownId::FromOldest => (Step::Oldest, Vec::new()),
                    UnknownId::LiveOnly => {
                        let mut plan = Plan::new(key, Resumed::Live);
                        plan.lost = Some("live");
                        return self.respond(request, Some(plan));
                    }
                    UnknownId::PassUpstream => {
                        return self.respond(request, Some(Plan::new(key, Resumed::Upstream)));
                    }
                }
            }
        };
        let (from, limit) = match step {
            Step::AfterId => (ReadFrom::After(&client_id), config.replay_limit()),
            Step::Oldest => (ReadFrom::Oldest, config.replay_limit()),
            Step::Snapshot(first) => first.read(config.replay_limit()),
        };
        let read = self.store.read(&key, from, limit);
        // The ready service goes into the future; a clone takes its place (tower's rule).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Reading {
                read,
                step,
                request: Some(request),
                inner: Some(inner),
            },
            exchange,
            store: self.store.clone(),
            config: self.config.clone(),
            plan: Some(Plan {
                client_id: (step == Step::AfterId).then(|| Bytes::from(client_id)),
                ..Plan::new(key, Resumed::Upstream)
            }),
        }
    }
}

impl<S, St, K> Replay<S, St, K>
where
    St: ReplayStore,
{
    fn respond<ReqBody>(
        &mut self,
        request: Request<ReqBody>,
        plan: Option<Plan>,
    ) -> ResponseFuture<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        let exchange = Exchange::of(&request);
        ResponseFuture {
            state: State::Calling {
                future: self.inner.call(request),
            },
            exchange,
            store: self.store.clone(),
            config: self.config.clone(),
            plan,
        }
    }
}

/// The client's own valid last event id, from the header or the `lastEventId` query parameter.
#[cfg(feature = "subscriptions")]
pub(crate) fn client_last_event_id<B>(request: &Request<B>) -> Option<Vec<u8>> {
    match last_event_id(request, DEFAULT_MAX_ID_LEN) {
        ClientId::Valid(id) => Some(id),
        ClientId::None | ClientId::Garbage => None,
    }
}

enum ClientId {
    None,
    Valid(Vec<u8>),
    Garbage,
}

/// The client's last event id: the header's raw bytes (a non-ASCII id is valid), else the
/// `lastEventId` query parameter, percent-decoded.
fn last_event_id<B>(request: &Request<B>, max_len: usize) -> ClientId {
    let id = match request.headers().get(LAST_EVENT_ID) {
        Some(value) => value.as_bytes().to_vec(),
        None => {
            let query = request.uri().query().unwrap_or_default();
            let Some(value) = query.split('&').find_map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (name == QUERY_PARAMETER).then_some(value)
            }) else {
                return ClientId::None;
            };
            match percent_decode(value.as_bytes(), max_len) {
                Some(id) => id,
                None => return ClientId::Garbage,
            }
        }
    };
    if id.is_empty() {
        ClientId::None
    } else if id.len() > max_len || id.iter().any(|&b| b < 0x20 || b == 0x7f) {
        ClientId::Garbage
    } else {
        ClientId::Valid(id)
    }
}

/// `%XX` escapes decoded; `None` for a malformed escape or more than `max_len` bytes.
fn percent_decode(input: &[u8], max_len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len().min(max_len + 1));
    let mut i = 0;
    while i < input.len() {
        let byte = if input[i] == b'%' {
            let hex = std::str::from_utf8(input.get(i + 1..i + 3)?).ok()?;
            i += 3;
            u8::from_str_radix(hex, 16).ok()?
        } else {
            i += 1;
            input[i - 1]
        };
        if out.len() == max_len {
            return None;
        }
        out.push(byte);
    }
    Some(out)
}

pin_project! {
    /// The response future of [`Replay`].
    pub struct ResponseFuture<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        St: ReplayStore,
    {
        #[pin]
        state: State<S::Future, St::Read, S, Request<ReqBody>>,
        exchange: Exchange,
        store: St,
        config: Arc<Config>,
        plan: Option<Plan>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R, S, Req> {
        Reading {
            #[pin]
            read: R,
            step: Step,
            request: Option<Req>,
            inner: Option<S>,
        },
        Calling { #[pin] future: F },
    }
}

impl<S, St, ReqBody> fmt::Debug for ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: ReplayStore,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// What a finished read means for the plan.
enum Next {
    Call,
    ReadOldest,
}

fn apply_read(
    config: &Config,
    plan: &mut Plan,
    step: Step,
    result: Result<Lookup, StoreError>,
    headers: &mut http::HeaderMap,
) -> Next {
    // Only a read after the client's id can miss what came after it.
    let result = match result {
        Ok(Lookup::Interrupted { events, .. }) if step != Step::AfterId => {
            Ok(Lookup::Found(events))
        }
        result => result,
    };
    let policy = match (step, result) {
        (Step::AfterId, Ok(Lookup::Found(events))) => {
            plan.resumed = Resumed::LastEventId;
            plan.replay = events;
            None
        }
        (Step::AfterId, Ok(Lookup::Interrupted { events, resumable })) => {
            // Asked to resume after what is replayed, an upstream that resumes sends the rest.
            if resumable && config.upstream_resumes {
                plan.resumed = Resumed::LastEventId;
            } else {
                plan.resumed = Resumed::Partial;
                plan.lost = Some("partial");
            }
            plan.replay = events;
            None
        }
        (Step::Oldest, Ok(Lookup::Found(events))) => {
            plan.resumed = Resumed::Earliest;
            plan.lost = Some("earliest");
            plan.replay = events;
            None
        }
        (Step::Snapshot(_), Ok(Lookup::Found(events))) if !events.is_empty() => {
            plan.resumed = Resumed::Snapshot;
            plan.replay = events;
            None
        }
        // Nothing retained yet, or the store failed: a new client starts live.
        (Step::Snapshot(_), result) => {
            if let Err(error) = result {
                telemetry::store_failed(&error);
            }
            plan.resumed = Resumed::New;
            return Next::Call;
        }
        (Step::AfterId, Ok(Lookup::Unknown)) => {
            telemetry::unknown_id();
            Some(config.unknown)
        }
        (Step::AfterId, Err(error)) => {
            telemetry::store_failed(&error);
            Some(config.store_failure)
        }
        // Reading from the oldest cannot find "unknown"; a failure leaves it to the inner service.
        (Step::Oldest, result) => {
            if let Err(error) = result {
                telemetry::store_failed(&error);
            }
            Some(UnknownId::PassUpstream)
        }
    };
    match policy {
        Some(UnknownId::FromOldest) if step == Step::AfterId => return Next::ReadOldest,
        Some(UnknownId::LiveOnly) => {
            plan.resumed = Resumed::Live;
            plan.lost = Some("live");
            headers.remove(LAST_EVENT_ID);
        }
        Some(_) => {
            plan.resumed = Resumed::Upstream;
            if !config.upstream_resumes {
                plan.lost = Some("upstream");
            }
        }
        None => {}
    }
    if config.ids == Ids::AssignAlways {
        // The client's ids are the store's, which the inner service never saw.
        headers.remove(LAST_EVENT_ID);
    } else if matches!(
        plan.resumed,
        Resumed::LastEventId | Resumed::Partial | Resumed::Snapshot
    ) {
        // Resume the inner service right after what was replayed. From the oldest (an unknown
        // id), the client's own id stays: an upstream that knows it can fill the gap, and what
        // was replayed already is dropped from its answer.
        if let Some(value) = plan
            .replay
            .last()
            .and_then(|last| HeaderValue::from_bytes(&last.id).ok())
        {
            headers.insert(LAST_EVENT_ID, value);
        }
    }
    Next::Call
}

impl<S, St, ReqBody, ResBody> Future for ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    St: ReplayStore,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<ReplayBody<ResBody, St>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading {
                    read,
                    step,
                    request,
                    inner,
                } => {
                    let result = ready!(read.poll(cx));
                    let plan = this.plan.as_mut().expect("a plan while reading");
                    let mut request = request.take().expect("polled after completion");
                    let step = *step;
                    match apply_read(this.config, plan, step, result, request.headers_mut()) {
                        Next::ReadOldest => {
                            let read = this.store.read(
                                &plan.key,
                                ReadFrom::Oldest,
                                this.config.replay_limit(),
                            );
                            let inner = inner.take();
                            this.state.set(State::Reading {
                                read,
                                step: Step::Oldest,
                                request: Some(request),
                                inner,
                            });
                        }
                        Next::Call => {
                            let mut inner = inner.take().expect("polled after completion");
                            let future = inner.call(request);
                            this.state.set(State::Calling { future });
                        }
                    }
                }
                StateProj::Calling { future } => {
                    let response = ready!(future.poll(cx))?;
                    let plan = this.plan.take();
                    let whole;
                    let stages = if this.exchange.wants_whole_events() {
                        whole = Stages {
                            whole_blocks: true,
                            ..this.config.stages.clone()
                        };
                        &whole
                    } else {
                        &this.config.stages
                    };
                    return Poll::Ready(Ok(match plan {
                        Some(plan) if is_plain_event_stream(response.headers()) => {
                            let (mut parts, inner) = response.into_parts();
                            parts.headers.insert(RESUMED_FROM, plan.resumed.header());
                            telemetry::replayed(plan.resumed.label(), plan.replay.len());
                            let recorded = parts.extensions.get::<AlreadyRecorded>().is_some();
                            let body = body::stream_body(
                                inner,
                                &parts.headers,
                                plan,
                                this.store.clone(),
                                this.config,
                                recorded,
                                stages,
                            );
                            Response::from_parts(parts, ReplayBody::from_engine(body))
                        }
                        _ if !stages.is_empty()
                            && this.exchange.has_stream_body(response.headers()) =>
                        {
                            let plain = is_plain_event_stream(response.headers());
                            let (parts, inner) = response.into_parts();
                            let body = EngineBody::stream(
                                inner,
                                stages,
                                plain,
                                &parts.headers,
                                Start::new(),
                            );
                            Response::from_parts(parts, ReplayBody::from_engine(body))
                        }
                        _ => response
                            .map(|inner| ReplayBody::from_engine(EngineBody::untouched(inner))),
                    }));
                }
            }
        }
    }
}

/// The history-lost signal for `lost`, if configured.
fn lost_event(config: &Config, lost: &str) -> Option<Bytes> {
    let name = config.lost_event.as_ref()?;
    let event = Event::builder()
        .event(name.clone())
        .data(lost)
        .build()
        .ok()?;
    Some(event.encode())
}

#[cfg(test)]
mod tests;
