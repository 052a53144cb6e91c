//! [`SseStack`]: every layer of the crate in the one order that works, built together so that
//! one pass over each stream serves all of them.
//!
//! # Stack order
//!
//! Outermost first. The builder applies this order whatever order its methods are called in;
//! stacking the layers by hand, keep it, for the reasons given:
//!
//! 1. [`SseHeadersLayer`]: it decides the final headers, so nothing inside can undo them, and
//!    its `406` answers before any other work is done.
//! 2. [`PassthroughLayer`]: it removes `Content-Length` and sends the first byte; it must sit
//!    outside every layer that adds bytes, or a `Content-Length` could survive them.
//! 3. `compression::SseCompressionLayer` (feature `compression`): outside everything that adds
//!    bytes (heartbeats, replayed events), so those are compressed and flushed too.
//! 4. `subscriptions::SubscribeLayer` (feature `subscriptions`): inside compression, so its
//!    cursor reads plain events; outside replay, which must see the subscription's stream
//!    rewritten to its topic and its cursor as `Last-Event-ID`.
//! 5. [`ReconnectDelayLayer`]: `retry:` goes first in the stream (after the initial comment).
//! 6. [`CommentMetadataLayer`]: outside replay, so replayed events are framed like live ones.
//! 7. [`HeartbeatLayer`]: it must see everything the client sees, so that replayed or framed
//!    events count as activity, and outside the timeouts, so that heartbeats never count as
//!    upstream activity.
//! 8. [`LifetimeLayer`]: it ends streams at a boundary it can see, with its final `retry:` hint.
//! 9. [`ReplayLayer`]: inside the heartbeat layer, so heartbeats are never recorded, and inside
//!    the lifetime layer, so a replayed burst is ended at a boundary like anything else.
//! 10. [`FanoutLayer`]: inside replay, so that each client is replayed on its own before it
//!     joins the shared stream, and given replay's store so that it records once for everybody
//!     (also while it lingers); outside it, per-client stages (heartbeat, metadata,
//!     compression, lifetime) still act per client. Outside replay it would share one client's
//!     replay with everyone.
//! 11. [`IdleTimeoutLayer`], [`ResponseTimeoutLayer`]: they measure the upstream: an idle timeout
//!     outside the heartbeat layer never fires (heartbeats look like traffic); a response timeout
//!     outside a layer that answers early (the `406`) would time that answer too.
//!
//! Steps 5 to 9 and the idle timeout run as one engine over each stream: it scans every byte
//! once, parses fields once and only where a stage needs them (ids for replay, metadata fields
//! for framing), and keeps one timer for heartbeats, the idle timeout and the lifetime. With
//! fan-out, the idle timeout measures the silence of the shared subscription each client reads.
//!
//! [`SseHeadersLayer`]: crate::SseHeadersLayer
//! [`PassthroughLayer`]: crate::PassthroughLayer
//! [`ReconnectDelayLayer`]: crate::ReconnectDelayLayer
//! [`CommentMetadataLayer`]: crate::CommentMetadataLayer
//! [`HeartbeatLayer`]: crate::HeartbeatLayer
//! [`LifetimeLayer`]: crate::LifetimeLayer
//! [`ReplayLayer`]: crate::ReplayLayer
//! [`FanoutLayer`]: crate::FanoutLayer
//! [`IdleTimeoutLayer`]: crate::timeout::IdleTimeoutLayer
//! [`ResponseTimeoutLayer`]: crate::timeout::ResponseTimeoutLayer

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::{Identity, Layer};
use tower_service::Service;

#[cfg(feature = "compression")]
use crate::compression::{SseCompression, SseCompressionLayer};
use crate::fanout::Fanout;
use crate::headers::SseHeaders;
use crate::passthrough::Passthrough;
use crate::replay::{Ids, MemoryStore, PathAndQuery, Qos, Replay, ReplayStore};
use crate::timeout::{ResponseTimeout, ResponseTimeoutLayer};
use crate::{
    CommentMetadataLayer, FanoutLayer, HeartbeatLayer, LifetimeLayer, PassthroughLayer,
    ReconnectDelayLayer, ReplayLayer, SseHeadersLayer,
};

/// Builds the whole recommended stack in its documented order; every part is optional and
/// switched on or off at run time. See the [module docs](self) for the order and why.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use axum::response::sse::{Event, Sse};
/// use tower::ServiceExt;
/// use tower_sse::replay::MemoryStore;
/// use tower_sse::{ReplayLayer, SseStack};
///
/// async fn events() -> Sse<impl tokio_stream::Stream<Item = Result<Event, std::convert::Infallible>>> {
///     Sse::new(tokio_stream::iter([Ok(Event::default().id("1").data("hi"))]))
/// }
///
/// let heartbeats: Option<Duration> = Some(Duration::from_secs(15));
/// let stack = SseStack::new()
///     .initial_comment("ok")
///     .heartbeat(heartbeats) // `None` leaves heartbeats out
///     .idle_timeout(Duration::from_secs(60))
///     .replay(ReplayLayer::with_store(MemoryStore::new()));
/// let app = Router::new().route("/events", get(events)).layer(stack);
///
/// let request = http::Request::get("/events").body(axum::body::Body::empty()).unwrap();
/// let response = app.oneshot(request).await.unwrap();
/// assert_eq!(response.headers()["x-accel-buffering"], "no");
/// let mut reader = tower_sse::wire::EventReader::new(response.into_body());
/// assert_eq!(reader.next_event().await.unwrap().unwrap().comments()[0], "ok");
/// assert_eq!(reader.next_event().await.unwrap().unwrap().id(), Some(&b"1"[..]));
/// # }
/// ```
#[derive(Clone)]
pub struct SseStack<St = MemoryStore, K = PathAndQuery, L = Identity> {
    headers: SseHeadersLayer,
    passthrough: PassthroughLayer,
    #[cfg(feature = "compression")]
    compression: Option<SseCompressionLayer>,
    around_replay: L,
    replay: ReplayLayer<St, K>,
    replaying: bool,
    fanout: Option<FanoutLayer>,
    /// Ids the hub assigns (`Keep`: as the fan-out layer was given).
    ids: Ids,
    response_timeout: Option<ResponseTimeoutLayer>,
}

impl fmt::Debug for SseStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseStack")
            .field("headers", &self.headers)
            .field("passthrough", &self.passthrough)
            .field("replay", &self.replay)
            .field("replaying", &self.replaying)
            .field("fanout", &self.fanout)
            .field("response_timeout", &self.response_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for SseStack {
    fn default() -> Self {
        Self::new()
    }
}

impl SseStack {
    /// Header policy and unbuffered passthrough only; add the other parts with the builder
    /// methods.
    pub fn new() -> Self {
        Self {
            headers: SseHeadersLayer::new(),
            passthrough: PassthroughLayer::new(),
            #[cfg(feature = "compression")]
            compression: None,
            around_replay: Identity::new(),
            replay: ReplayLayer::new().qos(Qos::None),
            replaying: false,
            fanout: None,
            ids: Ids::Keep,
            response_timeout: None,
        }
    }
}

impl<St, K, L> SseStack<St, K, L> {
    /// The header policy (default [`SseHeadersLayer::new`]).
    pub fn headers(mut self, headers: SseHeadersLayer) -> Self {
        self.headers = headers;
        self
    }

    /// A comment sent as soon as an event stream's headers are (see
    /// [`PassthroughLayer::initial_comment`]).
    pub fn initial_comment(mut self, text: impl Into<String>) -> Self {
        self.passthrough = PassthroughLayer::new().initial_comment(text);
        self
    }

    /// Compresses event streams by `Accept-Encoding`, flushed after every event. Built into the
    /// stack, it does not scan the stream again: for a response it compresses, the engine sends
    /// whole events per frame and compression flushes per frame.
    #[cfg(feature = "compression")]
    #[cfg_attr(docsrs, doc(cfg(feature = "compression")))]
    pub fn compression(mut self, compression: impl Part<SseCompressionLayer>) -> Self {
        self.compression = compression.into_part();
        self
    }

    /// How long clients wait before they reconnect, as a `retry:` block first in every stream:
    /// a [`ReconnectDelayLayer`] or just the time.
    pub fn reconnect_delay(mut self, delay: impl Part<ReconnectDelayLayer>) -> Self {
        self.replay = self.replay.with_stages(|stages| {
            stages.retry = delay.into_part().map(|delay| delay.stage());
        });
        self
    }

    /// Response headers and per-event metadata as comment lines.
    pub fn metadata(mut self, metadata: impl Part<CommentMetadataLayer>) -> Self {
        self.replay = self.replay.with_stages(|stages| {
            stages.metadata = metadata.into_part().map(|metadata| metadata.stage());
        });
        self
    }

    /// Heartbeats on quiet streams: a [`HeartbeatLayer`] or just the interval.
    pub fn heartbeat(mut self, heartbeat: impl Part<HeartbeatLayer>) -> Self {
        self.replay = self.replay.with_stages(|stages| {
            stages.heartbeat = heartbeat.into_part().map(|h| h.stage());
        });
        self
    }

    /// A maximum lifetime and graceful shutdown, ending streams at an event boundary.
    pub fn lifetime(mut self, lifetime: impl Part<LifetimeLayer>) -> Self {
        self.replay = self.replay.with_stages(|stages| {
            stages.lifetime = lifetime.into_part().map(|lifetime| lifetime.stage());
        });
        self
    }

    /// Ends a stream, cleanly, after `timeout` without a frame from the upstream (with fan-out:
    /// from the shared subscription).
    pub fn idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        let timeout = timeout.into().filter(|t| !t.is_zero());
        self.replay = self.replay.with_stages(|stages| stages.idle = timeout);
        self
    }

    /// Answers `504 Gateway Timeout` when response headers take longer than `timeout`.
    pub fn response_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.response_timeout = timeout
            .into()
            .filter(|t| !t.is_zero())
            .map(ResponseTimeoutLayer::new);
        self
    }

    /// Records streams and replays them to reconnecting clients (a layer with
    /// [`Qos::None`] records and replays nothing). Fan-out, if any, keys streams like replay
    /// and records into its store.
    pub fn replay<St2, K2>(self, replay: ReplayLayer<St2, K2>) -> SseStack<St2, K2, L> {
        let stages = self.replay.stages();
        let replaying = replay.is_on();
        SseStack {
            headers: self.headers,
            passthrough: self.passthrough,
            #[cfg(feature = "compression")]
            compression: self.compression,
            around_replay: self.around_replay,
            replay: replay.with_stages(|s| *s = stages),
            replaying,
            fanout: self.fanout,
            ids: self.ids,
            response_timeout: self.response_timeout,
        }
    }

    /// One upstream subscription per stream key, shared by all its clients. Its key and store
    /// are replay's, whatever the layer was given.
    pub fn fanout(mut self, fanout: impl Part<FanoutLayer>) -> Self {
        self.fanout = fanout.into_part();
        self
    }

    /// Gives events ids from the replay store as `ids` says. The fan-out hub assigns them, once
    /// per stream key for every connection (so a reconnecting client never gets an event twice
    /// under two ids): with replay on, asking for ids brings the hub in, with its defaults when
    /// [`fanout`](Self::fanout) was not given.
    pub fn ids(mut self, ids: Ids) -> Self {
        self.ids = ids;
        self
    }

    /// A layer around replay, inside compression: where the subscriptions layer goes.
    #[cfg(feature = "subscriptions")]
    fn around_replay<L2>(self, layer: L2) -> SseStack<St, K, L2> {
        SseStack {
            headers: self.headers,
            passthrough: self.passthrough,
            #[cfg(feature = "compression")]
            compression: self.compression,
            around_replay: layer,
            replay: self.replay,
            replaying: self.replaying,
            fanout: self.fanout,
            ids: self.ids,
            response_timeout: self.response_timeout,
        }
    }
}

#[cfg(feature = "subscriptions")]
impl<St, K> SseStack<St, K, Identity> {
    /// Provisioned subscriptions: readers by id and disposable channels (the management API is
    /// mounted separately, behind your authentication: `Subscriptions::api`).
    #[cfg_attr(docsrs, doc(cfg(feature = "subscriptions")))]
    pub fn subscriptions<Sub: crate::subscriptions::SubscriptionStore>(
        self,
        subscriptions: crate::subscriptions::Subscriptions<Sub>,
    ) -> SseStack<St, K, Toggled<crate::subscriptions::SubscribeLayer<Sub>>> {
        self.around_replay(Toggled(Some(subscriptions.layer())))
    }

    /// [`subscriptions`](Self::subscriptions), or none.
    #[cfg_attr(docsrs, doc(cfg(feature = "subscriptions")))]
    pub fn maybe_subscriptions<Sub: crate::subscriptions::SubscriptionStore>(
        self,
        subscriptions: Option<crate::subscriptions::Subscriptions<Sub>>,
    ) -> SseStack<St, K, Toggled<crate::subscriptions::SubscribeLayer<Sub>>> {
        self.around_replay(Toggled(subscriptions.map(|s| s.layer())))
    }
}

/// The service of the parts inside replay: fan-out (or not), then the response timeout (or not).
type Inner<S, St, K> =
    Toggle<Fanout<Toggle<ResponseTimeout<S>, S>, St, K>, Toggle<ResponseTimeout<S>, S>>;

#[cfg(feature = "compression")]
type Compressed<S> = Toggle<SseCompression<S>, S>;
#[cfg(not(feature = "compression"))]
type Compressed<S> = S;

/// The service an [`SseStack`] makes around `S`.
pub type SseStackService<S, St = MemoryStore, K = PathAndQuery, L = Identity> =
    SseHeaders<Passthrough<Compressed<<L as Layer<Replay<Inner<S, St, K>, St, K>>>::Service>>>;

impl<S, St, K, L> Layer<S> for SseStack<St, K, L>
where
    St: ReplayStore,
    K: Clone,
    L: Layer<Replay<Inner<S, St, K>, St, K>>,
{
    type Service = SseStackService<S, St, K, L>;

    fn layer(&self, service: S) -> Self::Service {
        let timed = Toggled(self.response_timeout).layer(service);
        let store = self.replaying.then(|| self.replay.store().clone());
        let assigns = self.replaying && self.ids != Ids::Keep;
        let fanout = self
            .fanout
            .clone()
            .or_else(|| assigns.then(FanoutLayer::new))
            .map(|fanout| {
                let fanout = fanout
                    .key(self.replay.stream_key().clone())
                    .recording(store);
                if assigns {
                    fanout.ids(self.ids)
                } else {
                    fanout
                }
            });
        let fanned = Toggled(fanout).layer(timed);
        let replayed = self.replay.layer(fanned);
        let around = self.around_replay.layer(replayed);
        #[cfg(feature = "compression")]
        let around = Toggled(
            self.compression
                .map(crate::compression::SseCompressionLayer::frames_are_events),
        )
        .layer(around);
        self.headers.layer(self.passthrough.layer(around))
    }
}

/// A layer applied or not, decided at run time, without boxing: `Some(layer)` applies it.
#[derive(Clone, Debug)]
pub struct Toggled<L>(Option<L>);

impl<L: Layer<S>, S> Layer<S> for Toggled<L> {
    type Service = Toggle<L::Service, S>;

    fn layer(&self, inner: S) -> Self::Service {
        match &self.0 {
            Some(layer) => Toggle::On(layer.layer(inner)),
            None => Toggle::Off(inner),
        }
    }
}

/// The service of a [`Toggled`] layer: the layer's service, or the inner service alone.
#[derive(Clone, Debug)]
pub enum Toggle<A, B> {
    /// The layer is applied.
    On(A),
    /// The layer is left out.
    Off(B),
}

impl<A, B, Req, BodyA, BodyB> Service<Request<Req>> for Toggle<A, B>
where
    A: Service<Request<Req>, Response = Response<BodyA>>,
    B: Service<Request<Req>, Response = Response<BodyB>, Error = A::Error>,
{
    type Response = Response<ToggleBody<BodyA, BodyB>>;
    type Error = A::Error;
    type Future = ToggleFuture<A::Future, B::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Self::On(service) => service.poll_ready(cx),
            Self::Off(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        match self {
            Self::On(service) => ToggleFuture {
                kind: Either::On {
                    inner: service.call(request),
                },
            },
            Self::Off(service) => ToggleFuture {
                kind: Either::Off {
                    inner: service.call(request),
                },
            },
        }
    }
}

pin_project! {
    /// The response future of a [`Toggle`].
    pub struct ToggleFuture<A, B> {
        #[pin]
        kind: Either<A, B>,
    }
}

pin_project! {
    #[project = EitherProj]
    enum Either<A, B> {
        On { #[pin] inner: A },
        Off { #[pin] inner: B },
    }
}

impl<A, B> Either<A, B> {
    fn name(&self) -> &'static str {
        match self {
            Self::On { .. } => "On",
            Self::Off { .. } => "Off",
        }
    }
}

impl<A, B> fmt::Debug for ToggleFuture<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ToggleFuture")
            .field(&self.kind.name())
            .finish()
    }
}

impl<A, B, BodyA, BodyB, E> Future for ToggleFuture<A, B>
where
    A: Future<Output = Result<Response<BodyA>, E>>,
    B: Future<Output = Result<Response<BodyB>, E>>,
{
    type Output = Result<Response<ToggleBody<BodyA, BodyB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let kind = match self.project().kind.project() {
            EitherProj::On { inner } => ready!(inner.poll(cx))?.map(|inner| Either::On { inner }),
            EitherProj::Off { inner } => ready!(inner.poll(cx))?.map(|inner| Either::Off { inner }),
        };
        Poll::Ready(Ok(kind.map(|kind| ToggleBody { kind })))
    }
}

pin_project! {
    /// The response body of a [`Toggle`].
    pub struct ToggleBody<A, B> {
        #[pin]
        kind: Either<A, B>,
    }
}

impl<A: Default, B> Default for ToggleBody<A, B> {
    fn default() -> Self {
        Self {
            kind: Either::On {
                inner: A::default(),
            },
        }
    }
}

impl<A, B> fmt::Debug for ToggleBody<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ToggleBody")
            .field(&self.kind.name())
            .finish()
    }
}

impl<A, B> Body for ToggleBody<A, B>
where
    A: Body<Data = Bytes>,
    B: Body<Data = Bytes>,
    A::Error: Into<crate::BoxError>,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            EitherProj::On { inner } => inner.poll_frame(cx).map_err(Into::into),
            EitherProj::Off { inner } => inner.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Either::On { inner } => inner.is_end_stream(),
            Either::Off { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Either::On { inner } => inner.size_hint(),
            Either::Off { inner } => inner.size_hint(),
        }
    }
}

/// A part of an [`SseStack`], or none: what the builder methods take, so that a part is
/// switched on or off at run time with an `Option`.
///
/// Implemented for every layer the builder takes and an `Option` of it, and, for heartbeats and
/// the retry block, for a `Duration` and an `Option<Duration>`.
pub trait Part<L> {
    /// The layer, or `None` to leave the part out.
    fn into_part(self) -> Option<L>;
}

impl<L> Part<L> for L {
    fn into_part(self) -> Option<L> {
        Some(self)
    }
}

impl<L> Part<L> for Option<L> {
    fn into_part(self) -> Option<L> {
        self
    }
}

impl Part<HeartbeatLayer> for Duration {
    fn into_part(self) -> Option<HeartbeatLayer> {
        Some(HeartbeatLayer::new(self))
    }
}

impl Part<HeartbeatLayer> for Option<Duration> {
    fn into_part(self) -> Option<HeartbeatLayer> {
        self.map(HeartbeatLayer::new)
    }
}

impl Part<ReconnectDelayLayer> for Duration {
    fn into_part(self) -> Option<ReconnectDelayLayer> {
        Some(ReconnectDelayLayer::new(self))
    }
}

impl Part<ReconnectDelayLayer> for Option<Duration> {
    fn into_part(self) -> Option<ReconnectDelayLayer> {
        self.map(ReconnectDelayLayer::new)
    }
}

impl From<Duration> for HeartbeatLayer {
    fn from(interval: Duration) -> Self {
        HeartbeatLayer::new(interval)
    }
}

impl From<Duration> for ReconnectDelayLayer {
    fn from(retry: Duration) -> Self {
        ReconnectDelayLayer::new(retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::MemoryStore;
    use crate::test_util::{frames, Script};
    use crate::timeout::IdleTimeoutLayer;
    use crate::wire::scanned;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    const STREAM: &[u8] = b"\xEF\xBB\xBFid: 1\r\nevent: tick\r\nmeta-trace: a\r\ndata: one\r\n\r\n: upstream comment\n\nid: 2\rdata: two\r\rid: 3\ndata: three\ndata: lines\n\nid: 4\ndata: no end";

    fn upstream(
        script: Script,
    ) -> impl Service<
        Request<()>,
        Response = Response<crate::testing::ScriptedBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<crate::testing::ScriptedBody>, Infallible>>,
    > + Clone {
        service_fn(move |_request: Request<()>| {
            let body = script.clone().into_body();
            async move {
                Ok(Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .unwrap())
            }
        })
    }

    fn full(store: MemoryStore) -> SseStack {
        SseStack::new()
            .initial_comment("ok")
            .reconnect_delay(Duration::from_secs(2))
            .metadata(CommentMetadataLayer::new().metadata_as_comment(true))
            .heartbeat(Duration::from_secs(15))
            .lifetime(LifetimeLayer::new().max_lifetime(Duration::from_secs(600)))
            .idle_timeout(Duration::from_secs(60))
            .response_timeout(Duration::from_secs(10))
            .replay(ReplayLayer::with_store(store))
    }

    /// The events a client parses from `bytes`, as text to compare.
    fn parse(bytes: &[u8]) -> Vec<String> {
        let mut parser = crate::wire::Parser::new();
        parser.push(Bytes::copy_from_slice(bytes));
        std::iter::from_fn(|| parser.next_event())
            .map(|e| format!("{:?}", e.unwrap()))
            .collect()
    }

    /// Through the whole stack, every byte of the upstream body is scanned once, however it is
    /// cut into frames; the stack's own bytes (comment, retry block) are never scanned.
    #[tokio::test]
    async fn the_full_stack_scans_every_byte_once() {
        let cuts: [(&str, Script); 3] = [
            ("whole", Script::new().chunk(STREAM)),
            ("split", Script::new().chunks(STREAM.chunks(7))),
            ("byte by byte", Script::new().byte_by_byte(STREAM)),
        ];
        let mut outputs = Vec::new();
        for (name, script) in cuts {
            let store = MemoryStore::new();
            let service = full(store.clone()).layer(upstream(script));
            scanned::take();
            let response = service
                .oneshot(Request::get("/events").body(()).unwrap())
                .await;
            let body = frames(response.unwrap().into_body()).await.concat();
            // The leading BOM is dropped unscanned: the stack's own bytes went first.
            assert_eq!(scanned::take(), STREAM.len() - 3, "{name}: bytes scanned");
            outputs.push(body.clone());
            // Recorded as the client saw them, before metadata framing: once each.
            let recorded = store
                .read(
                    &Bytes::from_static(b"/events"),
                    crate::replay::ReadFrom::Oldest,
                    10,
                )
                .await
                .unwrap();
            let Some(events) = recorded.into_events() else {
                panic!("{name}: nothing recorded")
            };
            let ids: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
            assert_eq!(ids, ["1", "2", "3"], "{name}");
        }
        let text = String::from_utf8(outputs[0].clone()).unwrap();
        assert!(text.starts_with(":ok\n\nretry: 2000\n\n"), "{text}");
        assert!(text.contains(":trace=a\n"), "metadata framed: {text}");
        assert!(!text.contains("meta-trace"), "{text}");
        assert!(
            !text.contains("no end"),
            "an incomplete event is never sent: {text}"
        );
        // Whatever the cut, the client parses the same events.
        assert_eq!(parse(&outputs[0]), parse(&outputs[1]));
        assert_eq!(parse(&outputs[0]), parse(&outputs[2]));
    }

    /// With compression in the stack, still one scan: the engine sends whole events per frame
    /// and compression flushes per frame instead of finding boundaries again. The client
    /// decompresses the same events, and a client that asks for no encoding gets what the stack
    /// without compression sends.
    #[cfg(feature = "compression")]
    #[tokio::test]
    async fn with_compression_still_one_scan() {
        use std::io::Read;
        let plain = frames(
            full(MemoryStore::new())
                .layer(upstream(Script::new().chunk(STREAM)))
                .oneshot(Request::get("/events").body(()).unwrap())
                .await
                .unwrap()
                .into_body(),
        )
        .await
        .concat();
        for (name, script) in [
            ("whole", Script::new().chunk(STREAM)),
            ("split", Script::new().chunks(STREAM.chunks(7))),
            ("byte by byte", Script::new().byte_by_byte(STREAM)),
        ] {
            let service = full(MemoryStore::new())
                .compression(crate::compression::SseCompressionLayer::new())
                .layer(upstream(script));
            scanned::take();
            let request = Request::get("/events")
                .header(http::header::ACCEPT_ENCODING, "gzip")
                .body(())
                .unwrap();
            let response = service.oneshot(request).await.unwrap();
            assert_eq!(response.headers()[http::header::CONTENT_ENCODING], "gzip");
            let compressed = frames(response.into_body()).await.concat();
            assert_eq!(scanned::take(), STREAM.len() - 3, "{name}: bytes scanned");
            let mut text = Vec::new();
            flate2::read::GzDecoder::new(&compressed[..])
                .read_to_end(&mut text)
                .unwrap();
            // The initial comment is the passthrough's, outside compression: an encoded stream
            // gets none.
            assert_eq!(parse(&text), parse(&plain)[1..], "{name}");
        }
        // Asked for no encoding, the client gets what the stack without compression sends.
        let response = full(MemoryStore::new())
            .compression(crate::compression::SseCompressionLayer::new())
            .layer(upstream(Script::new().chunks(STREAM.chunks(7))))
            .oneshot(Request::get("/events").body(()).unwrap())
            .await
            .unwrap();
        assert!(response
            .headers()
            .get(http::header::CONTENT_ENCODING)
            .is_none());
        assert_eq!(frames(response.into_body()).await.concat(), plain);
    }

    /// The stack's own bytes go first, so the upstream's leading byte order mark is dropped; a
    /// second mark right after it is content (the first line's field is `\u{feff}data`, no
    /// message), with compression or without, however the stream is cut.
    #[cfg(feature = "compression")]
    #[tokio::test]
    async fn a_mark_after_the_dropped_leading_one_is_content() {
        use std::io::Read;
        let stream: &[u8] = b"\xEF\xBB\xBF\xEF\xBB\xBFdata:1\n\nta:2\n\n";
        let minute = Duration::from_secs(60);
        for compressed in [false, true] {
            for cut in [1, 2, 4, stream.len()] {
                let mut stack = SseStack::new()
                    .reconnect_delay(minute)
                    .metadata(CommentMetadataLayer::new().metadata_as_comment(true))
                    .heartbeat(minute)
                    .replay(ReplayLayer::with_store(MemoryStore::new()));
                if compressed {
                    stack = stack.compression(crate::compression::SseCompressionLayer::new());
                }
                let service = stack.layer(upstream(Script::new().chunks(stream.chunks(cut))));
                let request = Request::get("/events")
                    .header(http::header::ACCEPT_ENCODING, "gzip")
                    .body(())
                    .unwrap();
                let response = service.oneshot(request).await.unwrap();
                let body = frames(response.into_body()).await.concat();
                let mut text = Vec::new();
                if compressed {
                    flate2::read::GzDecoder::new(&body[..])
                        .read_to_end(&mut text)
                        .unwrap();
                } else {
                    text = body;
                }
                let mut parser = crate::wire::Parser::new();
                parser.push(Bytes::from(text.clone()));
                let messages = std::iter::from_fn(|| parser.next_event())
                    .filter(|event| event.as_ref().unwrap().is_message())
                    .count();
                assert_eq!(
                    messages,
                    0,
                    "compressed {compressed}, cut {cut}: {:?}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

    /// The same layers stacked by hand scan the stream once per layer that reads it: the
    /// builder is what makes one pass.
    #[tokio::test]
    async fn layers_stacked_by_hand_scan_once_each() {
        let service = ServiceBuilder::new()
            .layer(CommentMetadataLayer::new().metadata_as_comment(true))
            .layer(HeartbeatLayer::new(Duration::from_secs(15)))
            .layer(LifetimeLayer::new().max_lifetime(Duration::from_secs(600)))
            .layer(ReplayLayer::new())
            .layer(IdleTimeoutLayer::new(Duration::from_secs(60)))
            .service(upstream(Script::new().chunk(STREAM)));
        scanned::take();
        let response = service
            .oneshot(Request::get("/events").body(()).unwrap())
            .await;
        frames(response.unwrap().into_body()).await;
        assert!(scanned::take() > 2 * STREAM.len());
    }

    /// Parts switch on and off at run time, and what is off does nothing.
    #[tokio::test]
    async fn parts_left_out_do_nothing() {
        let off: Option<Duration> = None;
        let service = SseStack::new()
            .heartbeat(off)
            .reconnect_delay(off)
            .metadata(None)
            .lifetime(None)
            .idle_timeout(off)
            .layer(upstream(Script::new().chunk(&b"data: x\n\n"[..])));
        let response = service
            .oneshot(Request::get("/events").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.headers()["x-accel-buffering"], "no");
        assert_eq!(frames(response.into_body()).await.concat(), b"data: x\n\n");
    }

    /// A `HEAD` request gets the stream's headers and no body work.
    #[tokio::test]
    async fn head_gets_no_body() {
        let service = full(MemoryStore::new()).layer(upstream(Script::new().chunk(STREAM)));
        let response = service
            .oneshot(Request::head("/events").body(()).unwrap())
            .await
            .unwrap();
        assert!(frames(response.into_body()).await.is_empty());
    }

    /// Heartbeats, the idle timeout and the lifetime share one timer: the first due fires.
    #[tokio::test(start_paused = true)]
    async fn one_timer_serves_heartbeat_idle_and_lifetime() {
        let service = SseStack::new()
            .heartbeat(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(12))
            .lifetime(LifetimeLayer::new().max_lifetime(Duration::from_secs(600)))
            .layer(upstream(Script::new().chunk(&b"data: x\n\n"[..]).hang()));
        let response = service
            .oneshot(Request::get("/events").body(()).unwrap())
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        let mut body = std::pin::pin!(response.into_body());
        let mut seen = Vec::new();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let data = frame.unwrap().into_data().unwrap();
            seen.push((start.elapsed().as_secs(), data));
        }
        let expected: Vec<(u64, Bytes)> = vec![
            (0, Bytes::from_static(b"data: x\n\n")),
            (5, Bytes::from_static(b":\n\n")),
            (10, Bytes::from_static(b":\n\n")),
        ];
        assert_eq!(seen, expected);
        // The idle timeout ended it at 12 s, with heartbeats never counted as upstream traffic.
        assert_eq!(start.elapsed().as_secs(), 12);
    }

    /// Ids asked of the stack are assigned by the hub it brings in: once per event for every
    /// connection, stored once, and a client reconnecting after its first event gets the two
    /// that followed, each once (the replay layer alone gave each connection ids of its own:
    /// `one, two, two, three, three`).
    #[tokio::test]
    async fn asked_for_ids_the_stack_assigns_them_once_for_every_connection() {
        use crate::testing::{reconnect, subscribe, TestStream};
        let (mut senders, upstream) = crate::test_util::channel_service("text/event-stream");
        let store = MemoryStore::new();
        let service = SseStack::new()
            .replay(ReplayLayer::with_store(store.clone()).upstream_resumes(true))
            .ids(Ids::AssignMissing)
            .layer(upstream);
        let first = service.clone().oneshot(subscribe::<()>("/events")).await;
        let mut first = TestStream::new(first.unwrap());
        let second = service.clone().oneshot(subscribe::<()>("/events")).await;
        let mut second = TestStream::new(second.unwrap());
        let mut sender = senders.recv().await.unwrap();
        let text = Bytes::from_static(b"data: one\n\ndata: two\n\ndata: three\n\n");
        sender.send_data(text).await.unwrap();
        let id = |e: &crate::wire::Event| Bytes::copy_from_slice(e.id().unwrap());
        let ids: Vec<Bytes> = first.events(3).await.iter().map(id).collect();
        let seen: Vec<Bytes> = second.events(3).await.iter().map(id).collect();
        assert_eq!(seen, ids, "the same ids on every connection");
        assert!(senders.try_recv().is_err(), "one upstream subscription");
        assert_eq!(store.len(b"/events"), 3, "each event stored once");

        let again = service.oneshot(reconnect::<()>("/events", &ids[0])).await;
        let mut again = TestStream::new(again.unwrap());
        again.assert_header("sse-resumed-from", "last-event-id");
        let replayed: Vec<String> = again
            .events(2)
            .await
            .iter()
            .map(|e| e.data().unwrap().into_owned())
            .collect();
        assert_eq!(replayed, ["two", "three"]);
        sender
            .send_data(Bytes::from_static(b"data: four\n\n"))
            .await
            .unwrap();
        assert_eq!(again.next_event().await.data().as_deref(), Some("four"));
    }
}
