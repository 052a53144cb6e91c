//! Header policy for event-stream responses.
//!
//! [`SseHeadersLayer`] gives every event-stream response the headers that keep it flowing through
//! browsers, caches and proxies, with the defaults of APISIX's `sse` plugin:
//!
//! | header | default | why |
//! |---|---|---|
//! | `Content-Type` | `text/event-stream; charset=utf-8` | the exact type `EventSource` requires |
//! | `Cache-Control` | `no-cache` | a cached stream replays stale events |
//! | `Connection` | `keep-alive`, HTTP/1.1 only | illegal on HTTP/2 and HTTP/3, so removed there; an HTTP/1.0 stream is close-delimited, so it is never promised `keep-alive` |
//! | `X-Accel-Buffering` | `no` | nginx (and APISIX, Kong) buffer the response otherwise |
//!
//! Which responses it touches: those whose Content-Type is an event stream (the crate's one
//! predicate, [`is_event_stream`]); optionally also `200 OK` answers to requests that asked for
//! `text/event-stream` in `Accept`, for upstreams that mislabel their streams. Everything else
//! passes through untouched.
//!
//! In strict mode ([`strict_accept`](SseHeadersLayer::strict_accept)) a request whose `Accept`
//! rules out `text/event-stream` is answered `406 Not Acceptable` without calling the inner
//! service. Use it on routes that only serve streams.
//!
//! A response to `HEAD` gets the same headers as a `GET`, and no body: whatever body the inner
//! service gives it is dropped unpolled (HTTP/2 resets a `HEAD` stream that sends a body), and a
//! response that is not an event stream keeps the `Content-Length` of that body.
//!
//! Unlike `tower_http::set_header`, the policy is SSE-aware: it leaves non-stream responses alone
//! and knows which headers HTTP/2 forbids.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http::{header, Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_sse::SseHeadersLayer;
//!
//! let stream = service_fn(|_req: Request<()>| async {
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .header(header::CACHE_CONTROL, "max-age=60")
//!         .body(Full::new(bytes::Bytes::from_static(b"data: hi\n\n")))
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let service = ServiceBuilder::new()
//!     .layer(SseHeadersLayer::new().strict_accept(true))
//!     .service(stream);
//!
//! let response = service.clone().oneshot(Request::new(())).await.unwrap();
//! assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream; charset=utf-8");
//! assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
//! assert_eq!(response.headers()["x-accel-buffering"], "no");
//!
//! let json_only = Request::builder().header(header::ACCEPT, "application/json").body(()).unwrap();
//! let response = service.oneshot(json_only).await.unwrap();
//! assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{head_parts, shared_body, InnerOrLocal};
use crate::future::Exchange;
use crate::telemetry;
use crate::wire::{
    accepts_event_stream, asks_for_event_stream, is_event_stream, EVENT_STREAM_UTF8,
};

const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
const NOT_ACCEPTABLE_BODY: &str =
    "406 Not Acceptable: this resource is an event stream; send Accept: text/event-stream\n";

/// Applies the event-stream header policy; see the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct SseHeadersLayer {
    policy: Arc<Policy>,
}

#[derive(Clone, Debug)]
struct Policy {
    override_content_type: bool,
    cache_control: Option<HeaderValue>,
    connection: Option<HeaderValue>,
    disable_proxy_buffering: bool,
    match_accept: bool,
    strict_accept: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            override_content_type: true,
            cache_control: Some(HeaderValue::from_static("no-cache")),
            connection: Some(HeaderValue::from_static("keep-alive")),
            disable_proxy_buffering: true,
            match_accept: false,
            strict_accept: false,
        }
    }
}

impl SseHeadersLayer {
    /// The default policy: every header in the [module docs](self) table, no `Accept` rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to set `Content-Type: text/event-stream; charset=utf-8` (default: true).
    ///
    /// With false the inner service's Content-Type is kept, parameters and all.
    pub fn override_content_type(mut self, enabled: bool) -> Self {
        self.policy_mut().override_content_type = enabled;
        self
    }

    /// The `Cache-Control` value to set, replacing the inner service's (default: `no-cache`).
    pub fn cache_control(mut self, value: HeaderValue) -> Self {
        self.policy_mut().cache_control = Some(value);
        self
    }

    /// Leaves `Cache-Control` as the inner service set it.
    pub fn keep_cache_control(mut self) -> Self {
        self.policy_mut().cache_control = None;
        self
    }

    /// The `Connection` value for HTTP/1 responses (default: `keep-alive`).
    ///
    /// Never sent on HTTP/2 or HTTP/3, where the header is illegal; it is removed there even when
    /// the inner service (or a proxied HTTP/1 upstream) set it. Nor is `keep-alive` ever sent to
    /// an HTTP/1.0 client: an event stream has no length, so on HTTP/1.0 it ends when the
    /// connection closes; a `keep-alive` the inner service set is removed there too.
    pub fn connection_header(mut self, value: HeaderValue) -> Self {
        self.policy_mut().connection = Some(value);
        self
    }

    /// Sends no `Connection` header of its own.
    pub fn skip_connection_header(mut self) -> Self {
        self.policy_mut().connection = None;
        self
    }

    /// Whether to send `X-Accel-Buffering: no`, which turns off response buffering in nginx and
    /// the gateways built on it (default: true).
    pub fn disable_proxy_buffering(mut self, enabled: bool) -> Self {
        self.policy_mut().disable_proxy_buffering = enabled;
        self
    }

    /// Also treat a `200 OK` as an event stream when its request asked for `text/event-stream`
    /// in `Accept` (see [`asks_for_event_stream`]), whatever Content-Type it carries (default:
    /// false). For upstreams that label their streams `text/plain` or not at all.
    pub fn match_accept(mut self, enabled: bool) -> Self {
        self.policy_mut().match_accept = enabled;
        self
    }

    /// Answer `406 Not Acceptable` to requests whose `Accept` rules out `text/event-stream`
    /// (see [`accepts_event_stream`]), without calling the inner service (default: false).
    ///
    /// A request without `Accept` is served. Apply this only to routes that serve streams.
    pub fn strict_accept(mut self, enabled: bool) -> Self {
        self.policy_mut().strict_accept = enabled;
        self
    }

    fn policy_mut(&mut self) -> &mut Policy {
        Arc::make_mut(&mut self.policy)
    }
}

impl<S> Layer<S> for SseHeadersLayer {
    type Service = SseHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SseHeaders {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`SseHeadersLayer`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct SseHeaders<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> SseHeaders<S> {
    /// Wraps `inner` with the default policy.
    pub fn new(inner: S) -> Self {
        SseHeadersLayer::new().layer(inner)
    }

    /// The layer, to configure the policy for several services.
    pub fn layer() -> SseHeadersLayer {
        SseHeadersLayer::new()
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SseHeaders<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<SseHeadersBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if self.policy.strict_accept && !accepts_event_stream(request.headers()) {
            return ResponseFuture {
                state: State::Rejected { done: false },
            };
        }
        let asked = self.policy.match_accept && asks_for_event_stream(request.headers());
        let version = request.version();
        let head = Exchange::of(&request).is_head();
        ResponseFuture {
            state: State::Inner {
                future: self.inner.call(request),
                policy: self.policy.clone(),
                asked,
                version,
                head,
            },
        }
    }
}

pin_project! {
    /// The response future of [`SseHeaders`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner {
            #[pin]
            future: F,
            policy: Arc<Policy>,
            asked: bool,
            version: Version,
            head: bool,
        },
        Rejected {
            done: bool,
        },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<SseHeadersBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner {
                future,
                policy,
                asked,
                version,
                head,
            } => {
                let mut response = ready!(future.poll(cx))?;
                let is_stream = is_event_stream(response.headers())
                    || (*asked && response.status() == StatusCode::OK);
                if is_stream {
                    policy.apply(response.headers_mut(), *version);
                    telemetry::headers_applied(policy.override_content_type);
                }
                if *head {
                    let parts = head_parts(response);
                    let body = SseHeadersBody::from_shared(InnerOrLocal::empty());
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                Poll::Ready(Ok(response.map(|inner| {
                    SseHeadersBody::from_shared(InnerOrLocal::inner(inner))
                })))
            }
            StateProj::Rejected { done } => {
                assert!(!*done, "ResponseFuture polled after completion");
                *done = true;
                Poll::Ready(Ok(not_acceptable()))
            }
        }
    }
}

impl Policy {
    fn apply(&self, headers: &mut HeaderMap, version: Version) {
        if self.override_content_type {
            headers.insert(CONTENT_TYPE, EVENT_STREAM_UTF8);
        }
        if let Some(value) = &self.cache_control {
            headers.insert(CACHE_CONTROL, value.clone());
        }
        if version >= Version::HTTP_2 {
            headers.remove(CONNECTION);
        } else if version == Version::HTTP_11 {
            if let Some(value) = &self.connection {
                headers.insert(CONNECTION, value.clone());
            }
        } else {
            // HTTP/1.0 (or 0.9): the stream is delimited by the connection's close.
            if let Some(value) = self.connection.as_ref().filter(|v| !is_keep_alive(v)) {
                headers.insert(CONNECTION, value.clone());
            }
            if headers.get_all(CONNECTION).iter().any(is_keep_alive) {
                headers.remove(CONNECTION);
            }
        }
        if self.disable_proxy_buffering {
            headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
        }
    }
}

/// True when a `Connection` value has the `keep-alive` option.
fn is_keep_alive(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|option| crate::wire::media::trim(option).eq_ignore_ascii_case(b"keep-alive"))
}

fn not_acceptable<B>() -> Response<SseHeadersBody<B>> {
    telemetry::not_acceptable();
    let mut response = InnerOrLocal::plain_text(StatusCode::NOT_ACCEPTABLE, NOT_ACCEPTABLE_BODY)
        .map(SseHeadersBody::from_shared);
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("accept"));
    response
}

shared_body! {
    /// The response body of [`SseHeaders`]: the inner body untouched, or the short text of a
    /// `406 Not Acceptable`.
    pub struct SseHeadersBody(InnerOrLocal),
        none when "`None` for a `406 Not Acceptable` and for the answer to a `HEAD` request"
}

impl<B> SseHeadersBody<B> {
    /// True when the layer answered by itself (a `406 Not Acceptable`, or no body for `HEAD`).
    pub fn is_local(&self) -> bool {
        self.body.is_local()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::ACCEPT;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn upstream(
        content_type: &'static str,
    ) -> impl Service<
        Request<()>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        service_fn(move |_req: Request<()>| async move {
            let mut response = Response::new(Full::new(Bytes::from_static(b"data: x\n\n")));
            if !content_type.is_empty() {
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            }
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            Ok::<_, Infallible>(response)
        })
    }

    fn request(version: Version, accept: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().version(version);
        if let Some(accept) = accept {
            builder = builder.header(ACCEPT, accept);
        }
        builder.body(()).unwrap()
    }

    #[tokio::test]
    async fn sets_the_policy_on_streams() {
        let service = SseHeadersLayer::new().layer(upstream("TEXT/event-stream;charset=latin1"));
        let response = service
            .oneshot(request(Version::HTTP_11, None))
            .await
            .unwrap();
        let headers = response.headers();
        assert_eq!(headers[CONTENT_TYPE], "text/event-stream; charset=utf-8");
        assert_eq!(headers[CACHE_CONTROL], "no-cache");
        assert_eq!(headers[CONNECTION], "keep-alive");
        assert_eq!(headers[X_ACCEL_BUFFERING], "no");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "data: x\n\n");
    }

    #[tokio::test]
    async fn no_connection_header_on_http2_and_http3() {
        for version in [Version::HTTP_2, Version::HTTP_3] {
            let service = SseHeadersLayer::new().layer(upstream("text/event-stream"));
            let response = service.oneshot(request(version, None)).await.unwrap();
            assert!(response.headers().get(CONNECTION).is_none(), "{version:?}");
            assert_eq!(response.headers()[X_ACCEL_BUFFERING], "no");
        }
    }

    #[tokio::test]
    async fn no_keep_alive_promised_to_http10() {
        let keep_alive = service_fn(|_req: Request<()>| async {
            let response = Response::builder()
                .header(CONTENT_TYPE, "text/event-stream")
                .header(CONNECTION, "Keep-Alive")
                .body(Full::new(Bytes::new()))
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        for layer in [
            SseHeadersLayer::new(),
            SseHeadersLayer::new().connection_header(HeaderValue::from_static("keep-alive")),
            SseHeadersLayer::new().skip_connection_header(),
        ] {
            let response = layer
                .layer(keep_alive)
                .oneshot(request(Version::HTTP_10, None))
                .await
                .unwrap();
            assert!(response.headers().get(CONNECTION).is_none(), "{layer:?}");
        }
        // Another option is still sent, and the inner service's `close` kept.
        let response = SseHeadersLayer::new()
            .connection_header(HeaderValue::from_static("close"))
            .layer(keep_alive)
            .oneshot(request(Version::HTTP_10, None))
            .await
            .unwrap();
        assert_eq!(response.headers()[CONNECTION], "close");
        let response = SseHeadersLayer::new()
            .layer(upstream("text/event-stream"))
            .oneshot(request(Version::HTTP_10, None))
            .await
            .unwrap();
        assert_eq!(response.headers()[CONNECTION], "close");
    }

    #[tokio::test]
    async fn non_streams_pass_untouched() {
        let service = SseHeadersLayer::new().layer(upstream("application/json"));
        let response = service
            .oneshot(request(Version::HTTP_11, Some("text/event-stream")))
            .await
            .unwrap();
        let headers = response.headers();
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        assert_eq!(headers[CONNECTION], "close");
        assert_eq!(response.body().size_hint().exact(), Some(9));
    }

    #[tokio::test]
    async fn configurable_values() {
        let layer = SseHeadersLayer::new()
            .override_content_type(false)
            .cache_control(HeaderValue::from_static("no-store"))
            .skip_connection_header()
            .disable_proxy_buffering(false);
        let response = layer
            .layer(upstream("text/event-stream;charset=utf-8"))
            .oneshot(request(Version::HTTP_11, None))
            .await
            .unwrap();
        let headers = response.headers();
        assert_eq!(headers[CONTENT_TYPE], "text/event-stream;charset=utf-8");
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        assert_eq!(headers[CONNECTION], "close");
        assert!(headers.get(X_ACCEL_BUFFERING).is_none());

        let response = SseHeadersLayer::new()
            .keep_cache_control()
            .connection_header(HeaderValue::from_static("Keep-Alive"))
            .layer(upstream("text/event-stream"))
            .oneshot(request(Version::HTTP_11, None))
            .await
            .unwrap();
        assert!(response.headers().get(CACHE_CONTROL).is_none());
        assert_eq!(response.headers()[CONNECTION], "Keep-Alive");
    }

    #[tokio::test]
    async fn match_accept_fixes_mislabelled_streams() {
        let layer = SseHeadersLayer::new().match_accept(true);
        let response = layer
            .layer(upstream("text/plain"))
            .oneshot(request(Version::HTTP_11, Some("text/event-stream")))
            .await
            .unwrap();
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        // Without the ask, or with only a wildcard, nothing changes.
        for accept in [None, Some("*/*")] {
            let response = layer
                .layer(upstream("text/plain"))
                .oneshot(request(Version::HTTP_11, accept))
                .await
                .unwrap();
            assert_eq!(response.headers()[CONTENT_TYPE], "text/plain", "{accept:?}");
        }
    }

    #[tokio::test]
    async fn match_accept_leaves_errors_alone() {
        let not_found = service_fn(|_req: Request<()>| async {
            let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            Ok::<_, Infallible>(response)
        });
        let response = SseHeadersLayer::new()
            .match_accept(true)
            .layer(not_found)
            .oneshot(request(Version::HTTP_11, Some("text/event-stream")))
            .await
            .unwrap();
        assert!(response.headers().get(CONTENT_TYPE).is_none());
    }

    #[tokio::test]
    async fn strict_accept_answers_406_without_calling_the_inner_service() {
        let called = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = called.clone();
        let inner = service_fn(move |_req: Request<()>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
        });
        let service = SseHeadersLayer::new().strict_accept(true).layer(inner);
        let response = service
            .clone()
            .oneshot(request(Version::HTTP_11, Some("application/json")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(response.headers()[VARY], "accept");
        assert_eq!(called.load(std::sync::atomic::Ordering::SeqCst), 0);
        let body = response.into_body();
        assert_eq!(
            body.size_hint().exact(),
            Some(NOT_ACCEPTABLE_BODY.len() as u64)
        );
        let text = body.collect().await.unwrap().to_bytes();
        assert_eq!(text, NOT_ACCEPTABLE_BODY);

        for accept in [
            None,
            Some("text/event-stream"),
            Some("*/*"),
            Some("text/*;q=0.1"),
        ] {
            let response = service
                .clone()
                .oneshot(request(Version::HTTP_11, accept))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{accept:?}");
        }
        assert_eq!(called.load(std::sync::atomic::Ordering::SeqCst), 4);
    }
}
