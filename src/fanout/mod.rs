//! A fan-out hub: one upstream subscription per stream key, shared by every client of that key,
//! lingering after the last one leaves so that reconnecting clients miss nothing.
//!
//! Without a hub, N readers of one topic cost N upstream streams, and whatever the upstream sends
//! while a lone client reconnects is lost unless the upstream can resume. [`FanoutLayer`] calls
//! the inner service once per stream key (by default the request's path, query and credentials;
//! see [below](#what-is-shared-what-is-not)): a background
//! task reads that response's event stream and hands every event to each client of the key. Later
//! requests for the key attach to the running subscription; the upstream is not called again.
//!
//! # What is shared, what is not
//!
//! Only `GET` requests with a stream key are shared; any other method (`POST`, `HEAD`, ...) and a
//! request whose key function returns `None` go straight to the inner service. The first request
//! of a key is the one the inner service sees: its headers open the subscription that everybody
//! with the same key reads. The default key, [`PathAndQuery`], is the path, the query (without
//! `lastEventId`) and, when the request carries credentials (`Authorization`, `Cookie`, or
//! headers named with [`PathAndQuery::credential_headers`]), a SHA-256 digest of them: alice,
//! bob and an anonymous client on one path get three subscriptions, each opened with its own
//! credentials, and nobody reads a stream opened with someone else's.
//! [`PathAndQuery::share_across_credentials`] opts out (one subscription per path and query,
//! opened with whoever came first's credentials): only for streams that are the same for
//! everybody who may read them. [`PathAndQuery::query_params`] keeps only the named query
//! parameters in the key, so clients cannot open subscriptions at will with made-up ones. A
//! custom [key](FanoutLayer::key) (a closure too) replaces all of this and is responsible for
//! keeping users apart itself.
//!
//! A subscription is opened only by a `200` event stream that no layer has encoded. Anything else
//! (an error, a JSON answer, a 404, a compressed stream) goes to the request that opened it,
//! untouched, and every request that was waiting for the same key is sent to the inner service on
//! its own, so each gets the inner service's own answer.
//!
//! Every client gets the upstream's status and headers (minus `Content-Length`) and its events,
//! re-framed so that each frame holds whole events: a client joins at an event boundary. The hub
//! parses the upstream within [`limits`](FanoutLayer::limits); an event beyond them ends the
//! subscription cleanly (clients get everything before it). Layers
//! outside the hub (heartbeat, comment metadata, compression, lifetime) still apply per client.
//!
//! # Slow clients
//!
//! Each client has its own queue of at most [`queue_capacity`](FanoutLayer::queue_capacity)
//! frames (default 256; the frames' bytes are shared by all clients, so a queue costs about 48
//! bytes per slot of its own). A client that does not keep up never slows the others or the
//! upstream. When its queue is full, or its oldest frame has waited longer than the
//! [`write_deadline`](FanoutLayer::write_deadline) (5 s by default, as Mercure's
//! `dispatch_timeout`) when the next event arrives, the [`SlowClient`] policy applies:
//!
//! - [`SlowClient::Disconnect`] (default): the client's queue is dropped at once and its body
//!   ends with a [`ClientTooSlow`] error the next time the server reads it, so the server aborts
//!   the connection. `EventSource` reconnects with the id of the last whole event it got and,
//!   with a [`ReplayLayer`](crate::replay::ReplayLayer) outside, is replayed from the store: no
//!   loss. (A client that stopped reading altogether keeps only its connection and the socket
//!   buffers until it reads again or TCP gives up: the server does not read a body it cannot
//!   write.)
//! - [`SlowClient::SkipEvents`]: frames that find the queue full are skipped for that client,
//!   which stays connected with a gap (for streams where only the newest value matters).
//!
//! # Linger
//!
//! When the last client leaves, the subscription stays open for [`linger`](FanoutLayer::linger)
//! (default 10 s), still recording into the store when one is given: a client that comes back
//! within it misses nothing, even when the upstream cannot resume. Then the upstream connection
//! closes and the task ends. When the upstream ends or fails, every client sees a clean end (and
//! `EventSource` reconnects); the next request opens a new subscription whose request carries
//! `Last-Event-ID` set to the last id the upstream sent, so an upstream that can resume continues.
//!
//! # How many subscriptions
//!
//! Stream keys come from requests, so clients choose how many there are. The hub holds at most
//! [`max_subscriptions`](FanoutLayer::max_subscriptions) subscriptions at once (default 10,000),
//! and at most as many upstream responses: a request for a new key when the hub is full first
//! closes the subscriptions that have no client, the ones idle for longest first (a batch of
//! 1/64 of the cap at a time, so that the search is not repeated for every request); the new
//! subscription calls the upstream once a closed one has let go of its response. When every
//! subscription has clients, the request is sent to the inner service on its own, unshared, as
//! without a hub: it costs one upstream stream for as long as its client stays, and nothing
//! after. (The alternative, `503` with `Retry-After`, would end browser readers for good:
//! `EventSource` does not reconnect after a non-`200` answer.) A subscription whose clients all
//! left before any of them got the response (a request that gave up within milliseconds) does
//! not linger: nobody can come back to resume it, so it closes at once, and an upstream call
//! still in flight is dropped.
//!
//! # With replay
//!
//! Put the [`ReplayLayer`](crate::replay::ReplayLayer) outside the hub and give the hub the same
//! store with [`record_into`](FanoutLayer::record_into) (and the same key, when not the
//! default). The hub then records each event once
//! (not once per client), keeps recording while it lingers, and assigns ids once for everyone
//! ([`ids`](FanoutLayer::ids)). A client that reconnects with `Last-Event-ID` gets the stored
//! events after its id, then whatever was recorded while that replay was being read, then the
//! live events: no gap and no duplicate. Without a store the hub still fans out, and a replay
//! layer outside records per client.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{header, Request, Response};
//! use http_body::Frame;
//! use http_body_util::{BodyExt, StreamBody};
//! use tokio_stream::StreamExt;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_sse::fanout::FanoutLayer;
//! use tower_sse::replay::{MemoryStore, ReplayLayer};
//!
//! // An upstream that counts its subscriptions and sends two events, then nothing more.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = calls.clone();
//! let upstream = service_fn(move |_req: Request<()>| {
//!     counter.fetch_add(1, Ordering::SeqCst);
//!     async {
//!         let events = ["id: 1\ndata: a\n\n", "id: 2\ndata: b\n\n"];
//!         let frames = events.map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from(e))));
//!         let stream = tokio_stream::iter(frames).chain(tokio_stream::pending());
//!         let response = Response::builder()
//!             .header(header::CONTENT_TYPE, "text/event-stream")
//!             .body(StreamBody::new(stream))
//!             .unwrap();
//!         Ok::<_, Infallible>(response)
//!     }
//! });
//!
//! let store = MemoryStore::new();
//! let fanout = FanoutLayer::new().record_into(store.clone());
//! let service = ServiceBuilder::new()
//!     .layer(ReplayLayer::with_store(store))
//!     .layer(fanout.clone())
//!     .service(upstream);
//!
//! // Two clients of one key: one upstream subscription.
//! let first = service.clone().oneshot(Request::new(())).await.unwrap();
//! let second = service.clone().oneshot(Request::new(())).await.unwrap();
//! let mut first = first.into_body();
//! for expected in ["id: 1\ndata: a\n\n", "id: 2\ndata: b\n\n"] {
//!     let frame = first.frame().await.unwrap().unwrap().into_data().unwrap();
//!     assert_eq!(frame, expected);
//! }
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! assert_eq!(fanout.clients(), 2);
//! # drop(second);
//!
//! // A client that saw event 1 comes back: event 2 comes from the store.
//! let request = Request::builder().header("last-event-id", "1").body(()).unwrap();
//! let mut third = service.oneshot(request).await.unwrap().into_body();
//! let frame = third.frame().await.unwrap().unwrap().into_data().unwrap();
//! assert_eq!(frame, "id: 2\ndata: b\n\n");
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```

mod body;
mod hub;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

pub use body::FanoutBody;

use crate::replay::{Ids, MemoryStore, PathAndQuery, ReplayStore, StreamKey};
use crate::wire::Limits;
use crate::BoxError;
use hub::{Client, Declined, HeadState, Hub, Subscription};

/// What happens to a client that does not keep up; see the [module docs](self#slow-clients).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlowClient {
    /// Cut the client off (its body ends with [`ClientTooSlow`]); it reconnects and resumes.
    #[default]
    Disconnect,
    /// Skip the frames that do not fit its queue; it stays connected with a gap.
    SkipEvents,
}

/// The error a client's body ends with when the [`SlowClient::Disconnect`] policy cut it off.
#[derive(Debug)]
pub struct ClientTooSlow(());

impl fmt::Display for ClientTooSlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client fell behind its shared event stream and was cut off")
    }
}

impl std::error::Error for ClientTooSlow {}

#[derive(Clone, Debug)]
struct Config {
    queue: usize,
    slow_client: SlowClient,
    write_deadline: Option<Duration>,
    linger: Duration,
    ids: Ids,
    limits: Limits,
    max_subscriptions: usize,
}

/// Shares one upstream subscription per stream key among all its clients; see the
/// [module docs](self).
///
/// Clones share one hub: build the layer once and clone it (or the services it makes).
#[derive(Clone)]
pub struct FanoutLayer<St = MemoryStore, K = PathAndQuery> {
    hub: Arc<Hub>,
    key: K,
    store: Option<St>,
    config: Arc<Config>,
}

impl<St: fmt::Debug, K: fmt::Debug> fmt::Debug for FanoutLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanoutLayer")
            .field("key", &self.key)
            .field("store", &self.store)
            .field("config", &self.config)
            .field("subscriptions", &self.subscriptions())
            .field("clients", &self.clients())
            .finish()
    }
}

impl Default for FanoutLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl FanoutLayer {
    /// The default bound on concurrent subscriptions: 10,000.
    pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 10_000;

    /// A hub keyed by [`PathAndQuery::new`] (path, query and credentials), recording nothing, with the defaults in the
    /// [module docs](self).
    pub fn new() -> Self {
        Self {
            hub: Arc::default(),
            key: PathAndQuery::new(),
            store: None,
            config: Arc::new(Config {
                queue: 256,
                slow_client: SlowClient::default(),
                write_deadline: Some(Duration::from_secs(5)),
                linger: Duration::from_secs(10),
                ids: Ids::Keep,
                limits: Limits::default(),
                max_subscriptions: Self::DEFAULT_MAX_SUBSCRIPTIONS,
            }),
        }
    }
}

impl<St, K> FanoutLayer<St, K> {
    /// Keys requests with `key` (a [`StreamKey`], or a closure `Fn(&Request<B>) -> Option<Bytes>`);
    /// `None` sends a request straight to the inner service. A key other than [`PathAndQuery`]
    /// must keep users apart itself: every request with one key reads the subscription the
    /// first of them opened, with its credentials.
    pub fn key<K2>(self, key: K2) -> FanoutLayer<St, K2> {
        FanoutLayer {
            hub: self.hub,
            key,
            store: self.store,
            config: self.config,
        }
    }

    /// Records every event into `store` (give it the replay layer's store), once per event and
    /// also while lingering.
    pub fn record_into<St2: ReplayStore>(self, store: St2) -> FanoutLayer<St2, K> {
        self.recording(Some(store))
    }

    /// [`record_into`](Self::record_into) the store when there is one, records nothing
    /// otherwise (for configurations where replay is optional).
    pub fn recording<St2: ReplayStore>(self, store: Option<St2>) -> FanoutLayer<St2, K> {
        FanoutLayer {
            hub: self.hub,
            key: self.key,
            store,
            config: self.config,
        }
    }

    /// Whose ids the events carry, as [`ReplayLayer::ids`](crate::replay::ReplayLayer::ids)
    /// (needs [`record_into`](Self::record_into): ids come from the store). Default: the
    /// upstream's.
    pub fn ids(mut self, ids: Ids) -> Self {
        Arc::make_mut(&mut self.config).ids = ids;
        self
    }

    /// Keeps the subscription open for `linger` after its last client leaves (default 10 s).
    pub fn linger(mut self, linger: Duration) -> Self {
        Arc::make_mut(&mut self.config).linger = linger;
        self
    }

    /// Queues at most `frames` frames of whole events per client (default 256, at least 1).
    pub fn queue_capacity(mut self, frames: usize) -> Self {
        Arc::make_mut(&mut self.config).queue = frames.max(1);
        self
    }

    /// What happens to a client that does not keep up (default: disconnect it).
    pub fn on_slow_client(mut self, policy: SlowClient) -> Self {
        Arc::make_mut(&mut self.config).slow_client = policy;
        self
    }

    /// Treats a client as too slow once a frame has waited `deadline` in its queue (checked
    /// when the next event arrives; default 5 s; `None`: only a full queue counts).
    pub fn write_deadline(mut self, deadline: Option<Duration>) -> Self {
        Arc::make_mut(&mut self.config).write_deadline = deadline;
        self
    }

    /// Bounds the hub's parser (default [`Limits::default`]: lines of 1 MiB, events of 4 MiB).
    /// An upstream event beyond them ends the subscription after the events before it: every
    /// client sees a clean end, and the event is never sent in part.
    pub fn limits(mut self, limits: Limits) -> Self {
        Arc::make_mut(&mut self.config).limits = limits;
        self
    }

    /// Holds at most `subscriptions` subscriptions at once, lingering ones included (default
    /// [`DEFAULT_MAX_SUBSCRIPTIONS`](FanoutLayer::DEFAULT_MAX_SUBSCRIPTIONS), at least 1); see
    /// [the module docs](self#how-many-subscriptions).
    pub fn max_subscriptions(mut self, subscriptions: usize) -> Self {
        Arc::make_mut(&mut self.config).max_subscriptions = subscriptions.max(1);
        self
    }

    /// Upstream subscriptions currently running (lingering ones included).
    pub fn subscriptions(&self) -> usize {
        self.hub.subscriptions()
    }

    /// Clients currently fed by a subscription (a client cut off as too slow no longer counts).
    pub fn clients(&self) -> usize {
        self.hub.clients()
    }
}

impl<S, St: Clone, K: Clone> Layer<S> for FanoutLayer<St, K> {
    type Service = Fanout<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Fanout {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`FanoutLayer`]; see the [module docs](self).
#[derive(Clone)]
pub struct Fanout<S, St = MemoryStore, K = PathAndQuery> {
    inner: S,
    layer: FanoutLayer<St, K>,
}

impl<S: fmt::Debug, St: fmt::Debug, K: fmt::Debug> fmt::Debug for Fanout<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fanout")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S> Fanout<S> {
    /// Wraps `inner` with a hub of its own and the defaults of [`FanoutLayer::new`]. Services
    /// that should share a hub share one layer instead.
    pub fn new(inner: S) -> Self {
        FanoutLayer::new().layer(inner)
    }

    /// The layer, to configure it and share its hub among services.
    pub fn layer() -> FanoutLayer {
        FanoutLayer::new()
    }
}

impl<S, St, K> Fanout<S, St, K> {
    inner_service_accessors!();
}

impl<S, St, K, ReqBody, ResBody> Service<Request<ReqBody>> for Fanout<S, St, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
    K: StreamKey<ReqBody>,
    St: ReplayStore,
{
    type Response = Response<FanoutBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let key = (request.method() == Method::GET)
            .then(|| self.layer.key.key(&request))
            .flatten();
        let Some(key) = key else {
            return ResponseFuture::direct(self.inner.call(request));
        };
        // The ready service goes to whoever calls it; a clone takes its place (tower's rule).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let max = self.layer.config.max_subscriptions;
        let Some((client, opened)) = self.layer.hub.attach(key, max) else {
            // Full of subscriptions that all have clients: this one is not shared.
            let mut inner = inner;
            return ResponseFuture::direct(inner.call(request));
        };
        match opened {
            Some(topic) => {
                let (owner, declined) = oneshot::channel();
                let subscription = Subscription {
                    hub: self.layer.hub.clone(),
                    topic,
                    config: self.layer.config.clone(),
                    store: self.layer.store.clone(),
                };
                tokio::spawn(hub::run(subscription, inner, request, owner));
                ResponseFuture {
                    state: State::Owner {
                        client: Some(client),
                        declined,
                    },
                }
            }
            None => ResponseFuture {
                state: State::Waiter {
                    client: Some(client),
                    request: Some(request),
                    inner: Some(inner),
                },
            },
        }
    }
}

pin_project! {
    /// The response future of [`Fanout`].
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody, ResBody, S::Future, S::Error>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody, F, E> {
        /// Not shared, or sent on its own after the shared subscription failed to open.
        Direct { #[pin] future: F },
        /// Opened the subscription: a declined answer comes back to it.
        Owner {
            client: Option<Client>,
            declined: oneshot::Receiver<Declined<ResBody, E>>,
        },
        /// Joined a subscription that another request opened.
        Waiter {
            client: Option<Client>,
            request: Option<Request<ReqBody>>,
            inner: Option<S>,
        },
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    fn direct(future: S::Future) -> Self {
        Self {
            state: State::Direct { future },
        }
    }
}

impl<S, ReqBody, ResBody> fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Direct { .. } => "Direct",
            State::Owner { .. } => "Owner",
            State::Waiter { .. } => "Waiter",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<FanoutBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Direct { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(FanoutBody::direct)));
                }
                StateProj::Owner { client, declined } => {
                    match declined.try_recv() {
                        Ok(Declined::Response(response)) => {
                            return Poll::Ready(Ok(response.map(FanoutBody::direct)));
                        }
                        Ok(Declined::Error(error)) => return Poll::Ready(Err(error)),
                        Err(_) => {}
                    }
                    let attached = client.as_ref().expect("polled after completion");
                    match ready!(attached.poll_head(cx)) {
                        HeadState::Open(head) => {
                            let client = client.take().expect("polled after completion");
                            return Poll::Ready(Ok(head.response(FanoutBody::shared(client))));
                        }
                        // The task sends a declined answer before it fails the topic; nothing
                        // came only when the inner service panicked inside it.
                        HeadState::Failed => match declined.try_recv() {
                            Ok(Declined::Response(response)) => {
                                return Poll::Ready(Ok(response.map(FanoutBody::direct)));
                            }
                            Ok(Declined::Error(error)) => return Poll::Ready(Err(error)),
                            Err(_) => panic!("the fan-out subscription task panicked"),
                        },
                    }
                }
                StateProj::Waiter {
                    client,
                    request,
                    inner,
                } => {
                    let attached = client.as_ref().expect("polled after completion");
                    match ready!(attached.poll_head(cx)) {
                        HeadState::Open(head) => {
                            let client = client.take().expect("polled after completion");
                            return Poll::Ready(Ok(head.response(FanoutBody::shared(client))));
                        }
                        HeadState::Failed => {
                            client.take();
                            let request = request.take().expect("polled after completion");
                            let mut inner = inner.take().expect("polled after completion");
                            let future = inner.call(request);
                            this.state.set(State::Direct { future });
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
