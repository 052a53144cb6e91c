//! Ending event streams at an event boundary: after a maximum lifetime, or on shutdown.
//!
//! [`LifetimeLayer`] ends an event stream when one of two things happens:
//!
//! - its maximum lifetime is over ([`max_lifetime`](LifetimeLayer::max_lifetime)), so load
//!   balancers can rebalance long-lived connections; [`jitter`](LifetimeLayer::jitter) shortens
//!   each stream's lifetime by a random amount (Mercure ends streams at 80-100 % of theirs) so
//!   streams opened together do not all reconnect in the same second;
//! - a [`Shutdown`] handle fires ([`shutdown`](LifetimeLayer::shutdown)), so a server's graceful
//!   shutdown (`axum::serve(..).with_graceful_shutdown(..)`, hyper-util's `GracefulShutdown`)
//!   completes promptly instead of waiting forever on open streams (axum #2673).
//!
//! Either way the stream ends at the next event boundary, never inside an event: the client has
//! every event it was sent, and reconnects with the right `Last-Event-ID`. If the inner body
//! stops in the middle of an event, the layer waits for its end at most the
//! [`grace`](LifetimeLayer::grace) period (5 s by default) and then ends anyway; the client
//! discards the unfinished event, as the spec says. Optionally a final `retry:` block
//! ([`retry_on_end`](LifetimeLayer::retry_on_end)) tells clients how long to wait before they
//! come back, say during a deploy.
//!
//! Responses that are not event streams pass through untouched, and shutdown does not touch
//! them: the server's own graceful shutdown lets them finish.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use http::{header, Request, Response};
//! use http_body_util::BodyExt;
//! use tower::{service_fn, ServiceExt};
//! use tower_layer::Layer;
//! use tower_sse::lifetime::{LifetimeLayer, Shutdown};
//!
//! let endless = service_fn(|_req: Request<()>| async {
//!     let (mut tx, body) = http_body_util::channel::Channel::<bytes::Bytes>::new(1);
//!     tokio::spawn(async move {
//!         tx.send_data("data: 1\n\ndata: 2 sta".into()).await.unwrap();
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         tx.send_data("rts\n\ndata: 3".into()).await.unwrap();
//!         std::future::pending::<()>().await;
//!     });
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .body(body)
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let shutdown = Shutdown::new();
//! let service = LifetimeLayer::new()
//!     .shutdown(&shutdown)
//!     .retry_on_end(Duration::from_secs(10))
//!     .layer(endless);
//!
//! let body = service.oneshot(Request::new(())).await.unwrap().into_body();
//! let mut body = std::pin::pin!(body);
//! let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
//! assert_eq!(first, "data: 1\n\ndata: 2 sta");
//!
//! // Shutdown in the middle of event 2: the stream goes on to its end, adds the retry hint and
//! // ends, without the start of event 3.
//! shutdown.trigger();
//! let rest = body.collect().await.unwrap().to_bytes();
//! assert_eq!(rest, "rts\n\nretry: 10000\n\n");
//! # }
//! ```

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tower_layer::Layer;
use tower_service::Service;

use crate::engine::{engine_body, EngineBody, Stages, Start};
use crate::future::{head_response_future, Exchange, OnResponse};
use crate::jitter;
use crate::wire::Event;
use std::future::Future;

/// A signal that ends every open event stream of the [`LifetimeLayer`]s it was given to, each
/// at its next event boundary.
///
/// Cheap to clone; every clone fires the same signal. Fire it when the server starts its graceful
/// shutdown: [`after`](Shutdown::after) turns the future you already wait on (`ctrl_c()`, a
/// `CancellationToken::cancelled()`) into one that fires it too, so open event streams end and
/// the graceful shutdown completes instead of waiting on them forever:
///
/// ```no_run
/// # async fn run(app: axum::Router, listener: tokio::net::TcpListener) {
/// use tower_sse::lifetime::{LifetimeLayer, Shutdown};
///
/// let shutdown = Shutdown::new();
/// let app = app.layer(LifetimeLayer::new().shutdown(&shutdown));
/// axum::serve(listener, app)
///     .with_graceful_shutdown(shutdown.after(tokio::signal::ctrl_c()))
///     .await
///     .unwrap();
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    triggered: Arc<Flag>,
    notify: Arc<Notify>,
}

/// The fired flag, alone in its cache lines: every stream reads it with every frame, and a
/// small allocation beside it that some core writes would make each read a cache miss.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Flag(AtomicBool);

impl Shutdown {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal: open streams end at their next boundary, new ones end at once.
    pub fn trigger(&self) {
        self.triggered.0.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// A future that waits for `signal` (whatever it outputs), then fires this shutdown: hand it
    /// to a server's graceful shutdown (axum's `with_graceful_shutdown`, or wherever you await
    /// the signal) in place of `signal`, with no task to spawn.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_sse::lifetime::Shutdown;
    ///
    /// let shutdown = Shutdown::new();
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let graceful = shutdown.after(stopped);
    /// assert!(!shutdown.is_triggered());
    /// stop.send(()).unwrap();
    /// graceful.await;
    /// assert!(shutdown.is_triggered());
    /// # }
    /// ```
    pub fn after(&self, signal: impl Future) -> impl Future<Output = ()> {
        let shutdown = self.clone();
        async move {
            signal.await;
            shutdown.trigger();
        }
    }

    /// True once [`trigger`](Shutdown::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        self.triggered.0.load(Ordering::SeqCst)
    }

    /// A future that resolves once the signal fires (at once if it has).
    ///
    /// Cheap to poll again: polled by the task it was last polled by, it only reads a flag, so a
    /// connection or body may poll it with every frame it handles.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_sse::lifetime::Shutdown;
    ///
    /// let shutdown = Shutdown::new();
    /// let waiting = tokio::spawn(shutdown.triggered());
    /// shutdown.trigger();
    /// waiting.await.unwrap();
    /// # }
    /// ```
    pub fn triggered(&self) -> Triggered {
        Triggered {
            triggered: self.triggered.clone(),
            // Created before the flag is read: a trigger in between still completes it.
            notified: Box::pin(self.notify.clone().notified_owned()),
            registered: None,
        }
    }
}

/// Resolves once its [`Shutdown`] fires; made by [`Shutdown::triggered`].
///
/// `Unpin`, and polled again by the same task it reads the flag and the waker it holds, never
/// the wait registered with the signal (a separate allocation a stream's hot path would
/// otherwise fetch with every frame).
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct Triggered {
    triggered: Arc<Flag>,
    notified: Pin<Box<OwnedNotified>>,
    // The waker the wait is registered with. Registering again takes the signal's lock, which
    // every stream shares: with the same waker, reading the flag is enough.
    registered: Option<Waker>,
}

impl Future for Triggered {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.triggered.0.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if let Some(registered) = &self.registered {
            if registered.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        if self.notified.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Ends event streams at a boundary after a maximum lifetime or on shutdown; see the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct LifetimeLayer {
    config: Arc<LifetimeConfig>,
}

/// What the lifetime stage of the stream engine needs.
#[derive(Clone, Debug)]
pub(crate) struct LifetimeConfig {
    max_lifetime: Option<Duration>,
    jitter: Duration,
    shutdown: Option<Shutdown>,
    farewell: Option<Duration>,
    farewell_jitter: Duration,
    grace: Duration,
    /// Ends are counted as lifetime and shutdown timeouts (not when the signal is another
    /// layer's, such as a subscription's suspension).
    counted: bool,
}

impl LifetimeConfig {
    /// The `retry:` block that ends a stream, jittered per stream.
    pub(crate) fn farewell(&self) -> Option<Bytes> {
        let retry = jitter::extend(self.farewell?, self.farewell_jitter);
        let event = Event::builder().retry(retry).build().ok()?;
        Some(event.encode())
    }

    pub(crate) fn has_farewell(&self) -> bool {
        self.farewell.is_some()
    }

    /// This stream's lifetime, jittered; `Duration::MAX` without a maximum.
    pub(crate) fn lifetime(&self) -> Duration {
        self.max_lifetime
            .map_or(Duration::MAX, |max| jitter::shorten(max, self.jitter))
    }

    pub(crate) fn shutdown(&self) -> Option<&Shutdown> {
        self.shutdown.as_ref()
    }

    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    pub(crate) fn is_counted(&self) -> bool {
        self.counted
    }

    /// Ends a stream at its next boundary, within `grace`, when `signal` fires; no lifetime, no
    /// farewell, not counted as a timeout.
    #[cfg(feature = "subscriptions")]
    pub(crate) fn on_signal(signal: Shutdown, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            max_lifetime: None,
            jitter: Duration::ZERO,
            shutdown: Some(signal),
            farewell: None,
            farewell_jitter: Duration::ZERO,
            grace,
            counted: false,
        })
    }
}

impl LifetimeLayer {
    /// The engine stage.
    pub(crate) fn stage(&self) -> Arc<LifetimeConfig> {
        self.config.clone()
    }
}

impl Default for LifetimeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl LifetimeLayer {
    /// The default grace period for an event still in flight: 5 seconds.
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

    /// No lifetime limit and no shutdown signal yet: add them with the builder methods.
    pub fn new() -> Self {
        Self {
            config: Arc::new(LifetimeConfig {
                max_lifetime: None,
                jitter: Duration::ZERO,
                shutdown: None,
                farewell: None,
                farewell_jitter: Duration::ZERO,
                grace: Self::DEFAULT_GRACE,
                counted: true,
            }),
        }
    }

    /// Ends each stream after `lifetime` (less the [`jitter`](LifetimeLayer::jitter)).
    ///
    /// Any duration is accepted: `Duration::MAX` means never, as for `tokio::time::sleep`; so
    /// does a lifetime too long for the clock.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.config_mut().max_lifetime = Some(lifetime);
        self
    }

    /// Shortens each stream's lifetime by up to `spread`, at random: a 10-minute lifetime with
    /// a 2-minute spread ends streams between 8 and 10 minutes. Like
    /// [`ReconnectDelayLayer::jitter`](crate::ReconnectDelayLayer::jitter) and
    /// [`retry_jitter`](Self::retry_jitter), the spread is a duration; a spread longer than the
    /// lifetime can end a stream at once.
    pub fn jitter(mut self, spread: Duration) -> Self {
        self.config_mut().jitter = spread;
        self
    }

    /// Ends every stream when `shutdown` fires.
    pub fn shutdown(mut self, shutdown: &Shutdown) -> Self {
        self.config_mut().shutdown = Some(shutdown.clone());
        self
    }

    /// Sends `retry: <ms>` as the last block before the stream ends, so clients wait `retry`
    /// before they reconnect.
    pub fn retry_on_end(mut self, retry: Duration) -> Self {
        self.config_mut().farewell = Some(retry);
        self
    }

    /// Adds up to `spread` at random to each stream's final `retry:`, so that clients cut off
    /// together (by a shutdown, say) do not all come back in the same instant.
    pub fn retry_jitter(mut self, spread: Duration) -> Self {
        self.config_mut().farewell_jitter = spread;
        self
    }

    /// How long to wait for the end of an event in flight before ending anyway (default 5 s;
    /// `Duration::MAX` waits for the event's end however long it takes).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.config_mut().grace = grace;
        self
    }

    fn config_mut(&mut self) -> &mut LifetimeConfig {
        Arc::make_mut(&mut self.config)
    }
}

impl<S> Layer<S> for LifetimeLayer {
    type Service = Lifetime<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Lifetime {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`LifetimeLayer`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Lifetime<S> {
    inner: S,
    layer: LifetimeLayer,
}

impl<S> Lifetime<S> {
    /// Wraps `inner` with no limit yet; to set one, configure the [`layer`](Self::layer).
    pub fn new(inner: S) -> Self {
        LifetimeLayer::new().layer(inner)
    }

    /// The layer, to configure it.
    pub fn layer() -> LifetimeLayer {
        LifetimeLayer::new()
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Lifetime<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<LifetimeBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture::new(
            Exchange::of(&request),
            self.inner.call(request),
            self.layer.clone(),
        )
    }
}

head_response_future! {
    /// The response future of [`Lifetime`].
    pub struct ResponseFuture for LifetimeLayer => LifetimeBody
}

impl<B> OnResponse<B> for LifetimeLayer {
    type Body = LifetimeBody<B>;

    fn on_response(self, exchange: Exchange, response: Response<B>) -> Response<LifetimeBody<B>> {
        if !exchange.has_plain_stream_body(response.headers()) {
            return response.map(|inner| LifetimeBody::from_engine(EngineBody::untouched(inner)));
        }
        let stages = Stages {
            lifetime: Some(self.config),
            ..Stages::default()
        };
        let (parts, inner) = response.into_parts();
        let body = EngineBody::stream(inner, &stages, true, &parts.headers, Start::new());
        Response::from_parts(parts, LifetimeBody::from_engine(body))
    }
}

engine_body! {
    /// The response body of [`Lifetime`]; see the [module docs](self).
    pub struct LifetimeBody,
    dropping "the lifetime timer, the shutdown watch and an end frame not yet sent are dropped."
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{channel_service, next_data_within};
    use http_body_util::BodyExt;
    use std::pin::pin;
    use std::pin::Pin;
    use tokio::time::Instant;
    use tower::ServiceExt;

    /// Counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Arc<CountingWaker>, Waker) {
        let count = Arc::new(CountingWaker(std::sync::atomic::AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn triggered_wakes_the_waker_it_was_last_polled_with() {
        let shutdown = Shutdown::new();
        let mut triggered = shutdown.triggered();
        let (first, first_waker) = counting_waker();
        let (second, second_waker) = counting_waker();
        let mut cx = Context::from_waker(&first_waker);
        for _ in 0..3 {
            assert!(Pin::new(&mut triggered).poll(&mut cx).is_pending());
        }
        // Another task polls it now: the wait moves to that task's waker.
        assert!(Pin::new(&mut triggered)
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        shutdown.trigger();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut triggered).poll(&mut cx).is_ready());
    }

    #[test]
    fn triggered_made_before_or_after_the_signal_completes() {
        let shutdown = Shutdown::new();
        let mut before = shutdown.triggered();
        shutdown.trigger();
        let mut after = shutdown.triggered();
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut before).poll(&mut cx).is_ready());
        assert!(Pin::new(&mut after).poll(&mut cx).is_ready());
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
    }

    const SECOND: Duration = Duration::from_secs(1);

    type Channel = http_body_util::channel::Channel<Bytes>;

    async fn start(
        layer: &LifetimeLayer,
        content_type: &'static str,
    ) -> (
        http_body_util::channel::Sender<Bytes>,
        LifetimeBody<Channel>,
    ) {
        let (mut senders, service) = channel_service(content_type);
        let response = layer
            .layer(service)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        (senders.recv().await.unwrap(), response.into_body())
    }

    /// Everything left in the body, and when it ended.
    async fn rest(body: Pin<&mut LifetimeBody<Channel>>) -> (Bytes, Instant) {
        let collected = body.collect().await.unwrap().to_bytes();
        (collected, Instant::now())
    }

    #[test]
    fn a_cloned_layer_can_still_be_configured() {
        let layer = LifetimeLayer::new();
        let _keep = layer.clone();
        let layer = layer.max_lifetime(SECOND).jitter(SECOND / 2);
        assert_eq!(layer.config.max_lifetime, Some(SECOND));
        assert_eq!(_keep.config.max_lifetime, None);
    }

    #[tokio::test(start_paused = true)]
    async fn max_lifetime_ends_at_a_boundary() {
        let layer = LifetimeLayer::new().max_lifetime(25 * SECOND);
        let (mut tx, body) = start(&layer, "text/event-stream").await;
        let mut body = pin!(body);
        let started = Instant::now();
        tokio::spawn(async move {
            for n in 0.. {
                tokio::time::sleep(10 * SECOND).await;
                if tx.send_data(format!("data: {n}\n\n").into()).await.is_err() {
                    return;
                }
            }
        });
        let (sent, ended) = rest(body.as_mut()).await;
        assert_eq!(sent, "data: 0\n\ndata: 1\n\n");
        assert_eq!(ended - started, 25 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_over_mid_event_waits_for_its_end() {
        let layer = LifetimeLayer::new()
            .max_lifetime(10 * SECOND)
            .retry_on_end(SECOND);
        let (mut tx, body) = start(&layer, "text/event-stream").await;
        let mut body = pin!(body);
        tx.send_data(Bytes::from_static(b"data: a")).await.unwrap();
        assert_eq!(
            next_data_within(body.as_mut(), SECOND).await.unwrap(),
            "data: a"
        );
        tokio::spawn(async move {
            tokio::time::sleep(12 * SECOND).await;
            tx.send_data(Bytes::from_static(b"\r\n\r\ndata: b\n\n"))
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let (sent, _) = rest(body.as_mut()).await;
        assert_eq!(sent, "\r\n\r\nretry: 1000\n\n");
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_lifetimes() {
        let layer = LifetimeLayer::new()
            .max_lifetime(100 * SECOND)
            .jitter(20 * SECOND);
        let mut ends = Vec::new();
        for _ in 0..8 {
            let (_tx, body) = start(&layer, "text/event-stream").await;
            let started = Instant::now();
            let mut body = pin!(body);
            let (_, ended) = rest(body.as_mut()).await;
            let lifetime = ended - started;
            assert!(
                (80 * SECOND..=100 * SECOND).contains(&lifetime),
                "{lifetime:?}"
            );
            ends.push(lifetime);
        }
        ends.sort();
        ends.dedup();
        assert!(
            ends.len() > 1,
            "every stream got the same lifetime: {ends:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_every_open_stream_and_new_ones_at_once() {
        let shutdown = Shutdown::new();
        let layer = LifetimeLayer::new()
            .shutdown(&shutdown)
            .retry_on_end(5 * SECOND);
        let mut open = Vec::new();
        for n in 0..10 {
            let (mut tx, body) = start(&layer, "text/event-stream").await;
            let mut body = Box::pin(body);
            tx.send_data(format!("data: {n}\n\n").into()).await.unwrap();
            assert!(next_data_within(body.as_mut(), SECOND).await.is_some());
            open.push((tx, body));
        }
        let triggered = Instant::now();
        shutdown.trigger();
        for (_tx, body) in &mut open {
            let (sent, ended) = rest(body.as_mut()).await;
            assert_eq!(sent, "retry: 5000\n\n");
            assert_eq!(ended, triggered);
        }
        let (_tx, body) = start(&layer, "text/event-stream").await;
        let mut body = pin!(body);
        assert_eq!(rest(body.as_mut()).await.0, "retry: 5000\n\n");
        shutdown.triggered().await;
    }

    #[tokio::test(start_paused = true)]
    async fn final_retry_hints_are_jittered() {
        let shutdown = Shutdown::new();
        let layer = LifetimeLayer::new()
            .shutdown(&shutdown)
            .retry_on_end(SECOND)
            .retry_jitter(SECOND);
        shutdown.trigger();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            let (_tx, body) = start(&layer, "text/event-stream").await;
            let mut body = pin!(body);
            let mut parser = crate::wire::Parser::new();
            parser.push(rest(body.as_mut()).await.0);
            let retry = parser.next_event().unwrap().unwrap().retry().unwrap();
            assert!((SECOND..2 * SECOND).contains(&retry), "{retry:?}");
            seen.insert(retry);
        }
        assert!(seen.len() > 1, "no spread: {seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_event_ends_after_the_grace_period_without_a_farewell() {
        let shutdown = Shutdown::new();
        let layer = LifetimeLayer::new()
            .shutdown(&shutdown)
            .retry_on_end(SECOND)
            .grace(3 * SECOND);
        let (mut tx, body) = start(&layer, "text/event-stream").await;
        let mut body = pin!(body);
        tx.send_data(Bytes::from_static(b"data: never ends"))
            .await
            .unwrap();
        next_data_within(body.as_mut(), SECOND).await.unwrap();
        let triggered = Instant::now();
        shutdown.trigger();
        let (sent, ended) = rest(body.as_mut()).await;
        assert_eq!(sent, "");
        assert_eq!(ended - triggered, 3 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn non_streams_are_left_to_finish() {
        let shutdown = Shutdown::new();
        let layer = LifetimeLayer::new()
            .shutdown(&shutdown)
            .max_lifetime(SECOND);
        let (mut tx, body) = start(&layer, "application/json").await;
        let mut body = pin!(body);
        shutdown.trigger();
        tokio::time::sleep(10 * SECOND).await;
        tx.send_data(Bytes::from_static(b"{}")).await.unwrap();
        drop(tx);
        assert_eq!(rest(body.as_mut()).await.0, "{}");
    }
}
