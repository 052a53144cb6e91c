//! Provisioned subscriptions: server-side cursors, suspend, reactivate and delete, over HTTP.
//!
//! A client provisions a subscription to a topic, then consumes it as an event stream. The
//! subscription remembers where its reader is (the id of the last event written to it), so a
//! reader that comes back without `Last-Event-ID` (a new page, another device) still resumes.
//! An operator can suspend it, which closes its open channels at an event boundary and refuses
//! new ones until it is reactivated, and delete it.
//!
//! [`Subscriptions`] is the handle that holds the [`SubscriptionStore`] and the settings. It
//! makes two services, one for readers and one for whoever manages subscriptions:
//!
//! - [`SubscribeLayer`] ([`Subscriptions::layer`]) wraps the service that serves the topics'
//!   event streams and serves readers, under its [`api_prefix`](Subscriptions::api_prefix):
//!
//!   | request | answer |
//!   |---|---|
//!   | `GET /subscriptions/{id}/subscribe` | the topic's event stream, resumed from the cursor; `404`; `409` when suspended |
//!   | `GET` on a topic's own stream path ([`topic_path`](Subscriptions::topic_path), `/topics/{topic}` by default) | the stream, with a disposable subscription |
//!
//!   Every other request, the management routes below included, goes to the inner service
//!   untouched (unless [`SubscribeLayer::with_api`] opts in to serving them here too).
//!
//! - [`SubscriptionApi`] ([`Subscriptions::api`]), the management API, a service to mount
//!   behind your own authentication (see [below](#access)); it matches the last segments of the
//!   path, so where it is mounted does not matter:
//!
//!   | request | answer |
//!   |---|---|
//!   | `POST /topics/{topic}/subscriptions` (JSON body optional: `{"lastEventId": "42"}`) | `201`, `Location`, the subscription; `429` when the topic or the store is full |
//!   | `GET /topics/{topic}/subscriptions?limit=20&offset=0&sort=createdAt` | `200`, a page: `{"items": [...], "total", "offset", "limit", "sort"}`, `Link: <...>; rel="next"` |
//!   | `GET /subscriptions/{id}` | `200`, the subscription; `404` |
//!   | `PATCH /subscriptions/{id}` with `{"status": "suspended"}` or `{"status": "active"}` | `200`, the subscription; `404` |
//!   | `DELETE /subscriptions/{id}` | `204`; `404` |
//!
//!   `sort` is `createdAt`, `id` or `status`, `-` first for descending; `limit` is 1 to 100.
//!   A subscription in JSON: `{"id", "topic", "mode": "sse", "status": "active" | "suspended",
//!   "disposable", "createdAt" (RFC 3339), "lastEventId" (the cursor, or null), "subscribe"
//!   (its stream's path, under the `api_prefix`)}`. Errors are
//!   `{"error": "<code>", "message": "..."}`.
//!
//! Make both from the same handle (or clones of it): a suspension or deletion through the API
//! then closes the layer's open channels at once.
//!
//! # Consuming a subscription
//!
//! `GET .../subscriptions/{id}/subscribe` is rewritten to the topic's stream path and goes to
//! the inner service, with `Last-Event-ID` set to the subscription's cursor unless the request
//! carries its own (the header, or the `lastEventId` query parameter): a browser's
//! `EventSource` that reconnects by itself knows best what it has. The rest of the request's
//! query goes no further, so a reader cannot steer what the subscription reads. With no cursor yet, the
//! replay layer's [`first_message`](crate::replay::ReplayLayer::first_message) policy applies.
//! The response carries `sse-subscription: {id}`.
//!
//! The cursor moves as events are written to the channel: the id the client would send as
//! `Last-Event-ID` after each event (an `id`-only block moves it too, an empty `id` resets it).
//! An event counts as delivered when it is handed to the connection; if the connection dies
//! with it unsent, a reader without `Last-Event-ID` resumes after it. A
//! [`MemorySubscriptions`] store moves the cursor at once; a shared store writes it in the
//! background, coalesced, so a reader that reconnects to another instance within that moment
//! may get an event twice, never miss one.
//!
//! A plain request to a topic's stream path creates a disposable subscription for the life of
//! its channel (see [`disposable`](Subscriptions::disposable)): it is listed, can be suspended
//! (which closes the channel) and is removed when the channel closes.
//!
//! # Where it goes in a stack
//!
//! Outside the replay layer, which must see the rewritten path and the cursor as
//! `Last-Event-ID`; inside compression, heartbeats and comment metadata, so the cursor reads
//! plain events: in the crate's recommended order, right after the lifetime layer. The topic's
//! stream key is its stream path, so provisioned, disposable and plain clients of a topic share
//! one history and, with [`FanoutLayer`](crate::FanoutLayer), one upstream subscription.
//!
//! # Access
//!
//! The module authenticates nobody. Reading a subscription needs its id: 128 bits from the
//! operating system's CSPRNG that only whoever created it learns (the API's answer to the
//! create) — an id is the capability to read it. The management API hands ids out (a list
//! shows every id of a topic, the disposable ones of plain readers included) and can suspend
//! or delete any subscription: mount it only behind authentication, for operators, as in the
//! [example below](#the-management-api-behind-authentication), or on a listener of its own
//! that readers cannot reach. [`Subscriptions::is_api_path`] tells its routes apart for a
//! router of your own.
//!
//! # Caps
//!
//! At most [`max_per_topic`](Subscriptions::max_per_topic) subscriptions per topic (10,000)
//! and [`max_subscriptions`](Subscriptions::max_subscriptions) in the whole store (100,000,
//! all instances of a shared store together); disposable ones count while their channel is
//! open. Beyond them a create answers `429` and a plain reader gets its stream without a
//! disposable subscription. A refusal costs the store a constant amount of work (in Redis, a
//! few commands, however full the topic), so a flood of creates cannot slow the store down.
//!
//! # Stores
//!
//! [`MemorySubscriptions`] (the default) keeps subscriptions in this process. With the `redis`
//! feature, [`RedisStore::subscriptions`](https://docs.rs/tower-sse/latest/tower_sse/replay/struct.RedisStore.html#method.subscriptions) keeps them,
//! and their cursors, in the same Redis as the replay history, so any instance can serve any
//! subscription; a suspension made on one instance closes channels on the others within the
//! [`poll_interval`](Subscriptions::poll_interval).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http::{header, Method, Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceExt};
//! use tower_layer::Layer;
//! use tower_sse::subscriptions::Subscriptions;
//!
//! // Serves every topic's stream at /topics/{topic}, resuming after Last-Event-ID.
//! let topics = service_fn(|request: Request<Full<bytes::Bytes>>| async move {
//!     let after: u32 = request.headers().get("last-event-id")
//!         .and_then(|id| id.to_str().ok()?.parse().ok())
//!         .unwrap_or(0);
//!     let events: String = (after + 1..=after + 2).map(|n| format!("id: {n}\ndata: {n}\n\n")).collect();
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .body(Full::from(events))
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let subscriptions = Subscriptions::in_memory();
//! // For readers, in front of the topics.
//! let service = subscriptions.layer().layer(topics);
//! // For operators only (mount it behind authentication).
//! let api = subscriptions.api();
//!
//! // Provision a subscription to "news".
//! let create = Request::post("/topics/news/subscriptions").body(Full::<bytes::Bytes>::default()).unwrap();
//! let created = api.clone().oneshot(create).await.unwrap();
//! assert_eq!(created.status(), StatusCode::CREATED);
//! let json = created.into_body().collect().await.unwrap().to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
//! let subscribe = json["subscribe"].as_str().unwrap().to_owned();
//!
//! // Read it: events 1 and 2. The cursor is now at 2.
//! let read = Request::get(&subscribe).body(Full::default()).unwrap();
//! let body = service.clone().oneshot(read).await.unwrap().into_body();
//! assert_eq!(body.collect().await.unwrap().to_bytes(), "id: 1\ndata: 1\n\nid: 2\ndata: 2\n\n");
//!
//! // Come back without Last-Event-ID: it resumes after 2.
//! let again = Request::get(&subscribe).body(Full::default()).unwrap();
//! let body = service.clone().oneshot(again).await.unwrap().into_body();
//! assert_eq!(body.collect().await.unwrap().to_bytes(), "id: 3\ndata: 3\n\nid: 4\ndata: 4\n\n");
//!
//! // Suspended, it refuses readers.
//! let id = json["id"].as_str().unwrap();
//! let suspend = Request::builder()
//!     .method(Method::PATCH)
//!     .uri(format!("/subscriptions/{id}"))
//!     .body(Full::<bytes::Bytes>::from(r#"{"status":"suspended"}"#))
//!     .unwrap();
//! assert_eq!(api.oneshot(suspend).await.unwrap().status(), StatusCode::OK);
//! let refused = Request::get(&subscribe).body(Full::default()).unwrap();
//! assert_eq!(service.clone().oneshot(refused).await.unwrap().status(), StatusCode::CONFLICT);
//!
//! // The readers' service does not manage subscriptions: a list goes to the topics' service
//! // (which here answers any path with events), not to the API.
//! let anonymous = Request::get("/topics/news/subscriptions").body(Full::default()).unwrap();
//! let answer = service.oneshot(anonymous).await.unwrap();
//! assert_eq!(answer.headers()[header::CONTENT_TYPE], "text/event-stream");
//! # }
//! ```
//!
//! # The management API behind authentication
//!
//! Any tower layer that answers `401` before the request reaches the API will do; here an axum
//! router serves readers in the open and the API under `/admin`, behind a bearer token:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::extract::Request;
//! use axum::middleware::{self, Next};
//! use axum::response::{IntoResponse, Response};
//! use axum::Router;
//! use http::StatusCode;
//! use tower::ServiceExt;
//! use tower_layer::Layer;
//! use tower_sse::subscriptions::Subscriptions;
//!
//! async fn operators_only(request: Request, next: Next) -> Response {
//!     // Compare in constant time in real code (the token is a secret).
//!     match request.headers().get("authorization") {
//!         Some(value) if value == "Bearer s3cret" => next.run(request).await,
//!         _ => StatusCode::UNAUTHORIZED.into_response(),
//!     }
//! }
//!
//! let subscriptions = Subscriptions::in_memory().api_prefix("/admin");
//! let topics = Router::new().route("/topics/{topic}", axum::routing::get(|| async { "..." }));
//! let admin = Router::new()
//!     .route_service("/admin/topics/{topic}/subscriptions", subscriptions.api())
//!     .route_service("/admin/subscriptions/{id}", subscriptions.api())
//!     .layer(middleware::from_fn(operators_only));
//! let app = admin.fallback_service(subscriptions.layer().layer(topics));
//!
//! let create = |token: Option<&str>| {
//!     let mut request = http::Request::post("/admin/topics/news/subscriptions");
//!     if let Some(token) = token {
//!         request = request.header("authorization", format!("Bearer {token}"));
//!     }
//!     request.body(axum::body::Body::empty()).unwrap()
//! };
//! assert_eq!(app.clone().oneshot(create(None)).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(app.clone().oneshot(create(Some("guess"))).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! let created = app.clone().oneshot(create(Some("s3cret"))).await.unwrap();
//! assert_eq!(created.status(), StatusCode::CREATED);
//!
//! // Readers need no token, only the subscription's id.
//! let location = created.headers()["location"].to_str().unwrap();
//! let read = http::Request::get(format!("{location}/subscribe")).body(axum::body::Body::empty()).unwrap();
//! assert_eq!(app.oneshot(read).await.unwrap().status(), StatusCode::OK);
//! # }
//! ```

mod api;
mod body;
mod channels;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use api::SubscriptionApi;
pub use body::SubscribeBody;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisSubscriptions;
pub use service::{ResponseFuture, Subscribe, SubscribeLayer};
pub use store::{
    Caps, Created, MemorySubscriptions, Status, StoreError, StoreFuture, Subscription,
    SubscriptionStore,
};

use channels::Channels;

/// The subscriptions of a service: the store, the settings, and the channels open in this
/// process. Cheap to clone; make the [`layer`](Self::layer) and the [`api`](Self::api) from the
/// same handle (or clones of it), so a suspension through the API reaches the open channels at
/// once. See the [module docs](self).
#[derive(Clone)]
pub struct Subscriptions<St = MemorySubscriptions> {
    store: St,
    /// The store again, type-erased once for every channel's body.
    sink: Arc<dyn body::Sink>,
    config: Arc<Config>,
    channels: Arc<Channels>,
}

#[derive(Clone, Debug)]
struct Config {
    topic_path: TopicPath,
    api_prefix: String,
    disposable: bool,
    caps: Caps,
    poll_interval: Duration,
}

impl<St: fmt::Debug> fmt::Debug for Subscriptions<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriptions")
            .field("store", &self.store)
            .field("config", &self.config)
            .field("open_channels", &self.channels.count())
            .finish()
    }
}

impl Subscriptions<MemorySubscriptions> {
    /// Subscriptions kept in this process's memory.
    pub fn in_memory() -> Self {
        Self::new(MemorySubscriptions::new())
    }
}

impl<St: SubscriptionStore> Subscriptions<St> {
    /// The default topic stream path: `/topics/{topic}`.
    pub const DEFAULT_TOPIC_PATH: &'static str = "/topics/{topic}";

    /// Subscriptions kept in `store`, with topics at `/topics/{topic}`, the API at the root,
    /// disposable subscriptions on, at most 10,000 subscriptions per topic and 100,000 in all,
    /// and a shared store polled every second.
    pub fn new(store: St) -> Self {
        Self {
            sink: Arc::new(store.clone()),
            store,
            config: Arc::new(Config {
                topic_path: TopicPath::parse(Self::DEFAULT_TOPIC_PATH)
                    .expect("the default template is valid"),
                api_prefix: String::new(),
                disposable: true,
                caps: Caps {
                    per_topic: 10_000,
                    total: 100_000,
                },
                poll_interval: Duration::from_secs(1),
            }),
            channels: Arc::default(),
        }
    }

    /// Where the inner service serves a topic's event stream: a path with one `{topic}`
    /// placeholder, such as `/streams/{topic}` or `/{topic}.sse` (default `/topics/{topic}`).
    /// A subscribe request is rewritten to it; a plain request to it gets a disposable
    /// subscription. Topic names are 1 to 128 bytes of `A-Z a-z 0-9 - . _ ~`.
    ///
    /// # Panics
    ///
    /// When `template` does not start with `/` or has not exactly one `{topic}`.
    pub fn topic_path(mut self, template: &str) -> Self {
        self.config_mut().topic_path = TopicPath::parse(template).unwrap_or_else(|| {
            panic!("topic path {template:?}: expected a path with exactly one {{topic}}")
        });
        self
    }

    /// Serves the management API and the subscribe paths under `prefix` (such as `/api`);
    /// default: at the root.
    pub fn api_prefix(mut self, prefix: &str) -> Self {
        self.config_mut().api_prefix = prefix.trim_end_matches('/').to_owned();
        self
    }

    /// Whether a plain request to a topic's stream path creates a disposable subscription
    /// (default true): listed while its channel is open, suspendable, removed when it closes.
    /// Each costs a store write when its channel opens and one when it closes.
    pub fn disposable(mut self, disposable: bool) -> Self {
        self.config_mut().disposable = disposable;
        self
    }

    /// Refuses to create more than `max` subscriptions per topic (default 10,000): the API
    /// answers `429`, a plain reader gets its stream without a disposable subscription.
    /// Disposable subscriptions count while their channel is open.
    pub fn max_per_topic(mut self, max: usize) -> Self {
        self.config_mut().caps.per_topic = max;
        self
    }

    /// Refuses to create more than `max` subscriptions in the whole store, every topic (and,
    /// in a shared store, every instance) together (default 100,000), as
    /// [`max_per_topic`](Self::max_per_topic) does. It bounds the memory of the in-memory
    /// store and the keys of a shared one.
    pub fn max_subscriptions(mut self, max: usize) -> Self {
        self.config_mut().caps.total = max;
        self
    }

    /// How often open channels ask a shared store whether their subscription was suspended or
    /// deleted by another instance (default one second; one request per interval for all the
    /// channels of this process).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.config_mut().poll_interval = every.max(Duration::from_millis(10));
        self
    }

    /// The layer for readers: the subscribe paths and the disposable subscriptions, in front
    /// of the topics' service. It does not serve the management API (see
    /// [`SubscribeLayer::with_api`]).
    pub fn layer(&self) -> SubscribeLayer<St> {
        SubscribeLayer::new(self.clone())
    }

    /// The management API (create, list, get, suspend and reactivate, delete), as a service to
    /// mount behind your own authentication.
    pub fn api(&self) -> SubscriptionApi<St> {
        SubscriptionApi::new(self.clone())
    }

    /// Whether `path` is a route of the management API under the
    /// [`api_prefix`](Self::api_prefix) (`.../topics/{topic}/subscriptions`,
    /// `.../subscriptions/{id}`; not a subscribe path): for a router of your own that sends
    /// these to [`api`](Self::api) behind its authentication and the rest to the readers.
    pub fn is_api_path(&self, path: &str) -> bool {
        matches!(
            Route::under(&self.config.api_prefix, path),
            Some(Route::Subscription(_) | Route::TopicSubscriptions(_))
        )
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// How many channels of subscriptions are open in this process.
    pub fn open_channels(&self) -> usize {
        self.channels.count()
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The path of a subscription's stream, under the API prefix.
    fn subscribe_path(&self, id: &str) -> String {
        format!("{}/subscriptions/{id}/subscribe", self.config.api_prefix)
    }
}

/// A topic's stream path: the template split around its `{topic}` placeholder.
#[derive(Clone, Debug)]
struct TopicPath {
    before: String,
    after: String,
}

impl TopicPath {
    const PLACEHOLDER: &'static str = "{topic}";

    fn parse(template: &str) -> Option<Self> {
        let (before, after) = template.split_once(Self::PLACEHOLDER)?;
        if !before.starts_with('/') || after.contains(Self::PLACEHOLDER) || after.contains('?') {
            return None;
        }
        Some(Self {
            before: before.to_owned(),
            after: after.to_owned(),
        })
    }

    fn path(&self, topic: &str) -> String {
        format!("{}{topic}{}", self.before, self.after)
    }

    /// The topic whose stream `path` is, if it is one.
    fn topic<'a>(&self, path: &'a str) -> Option<&'a str> {
        let topic = path.strip_prefix(&self.before)?.strip_suffix(&self.after)?;
        valid_topic(topic).then_some(topic)
    }
}

/// 1 to 128 bytes of `A-Z a-z 0-9 - . _ ~`, and not a dot segment.
fn valid_topic(topic: &str) -> bool {
    (1..=128).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Ids as the API hands them out, or a user store's: 1 to 64 bytes of `A-Z a-z 0-9 - _`.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// A request the module answers, by its path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    /// `/subscriptions/{id}`
    Subscription(String),
    /// `/subscriptions/{id}/subscribe`
    Subscribe(String),
    /// `/topics/{topic}/subscriptions`
    TopicSubscriptions(String),
}

impl Route {
    /// The route `segments` (a path split at `/`, without the leading empty one) name exactly.
    fn exact(segments: &[&str]) -> Option<Self> {
        match segments {
            ["subscriptions", id] if valid_id(id) => Some(Self::Subscription((*id).to_owned())),
            ["subscriptions", id, "subscribe"] if valid_id(id) => {
                Some(Self::Subscribe((*id).to_owned()))
            }
            ["topics", topic, "subscriptions"] if valid_topic(topic) => {
                Some(Self::TopicSubscriptions((*topic).to_owned()))
            }
            _ => None,
        }
    }

    /// The route of `path` under `prefix`.
    fn under(prefix: &str, path: &str) -> Option<Self> {
        let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        Self::exact(&segments)
    }

    /// The route the last segments of `path` name, wherever it is mounted.
    fn ending(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.split('/').collect();
        let n = segments.len();
        (n >= 3)
            .then(|| Self::exact(&segments[n - 3..]))
            .flatten()
            .or_else(|| (n >= 2).then(|| Self::exact(&segments[n - 2..])).flatten())
    }
}

#[cfg(test)]
mod tests;
