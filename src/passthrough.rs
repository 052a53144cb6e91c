//! Unbuffered passthrough of event streams.
//!
//! [`PassthroughLayer`] makes sure nothing between the inner service and the client waits for
//! more bytes than it has:
//!
//! - every data frame of the inner body is forwarded the moment it is ready: nothing aggregates,
//!   nothing waits for a whole event (a client cannot use half an event anyway, and holding one
//!   would only add latency);
//! - `Content-Length` is removed from event-stream responses, and the body never reports an exact
//!   size, so hyper streams it instead of waiting for a known length;
//! - optionally ([`initial_comment`](PassthroughLayer::initial_comment)) a comment frame is sent
//!   at once, before the inner body yields anything. Proxies and some browsers hold the response
//!   headers until the first body byte; with it, `EventSource.onopen` fires immediately even when
//!   the first event is minutes away.
//!
//! The initial comment is only inserted where it is safe: first in the stream. Because a byte
//! order mark is only skipped at the very start of a stream, a leading BOM from the inner body
//! would otherwise land after the comment and spoil the first line; the layer drops that BOM
//! (a client drops it anyway), and holds at most two bytes while it cannot yet tell.
//!
//! Responses that are not event streams ([`is_event_stream`](crate::wire::is_event_stream)) pass
//! through untouched: same frames, trailers and size hint, no per-frame work.
//!
//! A response to `HEAD` gets its headers as a `GET` would (no `Content-Length` on an event
//! stream), and no body at all: a body the inner service gives it anyway is dropped unpolled,
//! since HTTP/2 resets a `HEAD` stream that sends one. Any other response to `HEAD` keeps the
//! `Content-Length` of the body it had.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http::{header, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceExt};
//! use tower_sse::PassthroughLayer;
//! use tower_layer::Layer;
//!
//! let stream = service_fn(|_req: Request<()>| async {
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .header(header::CONTENT_LENGTH, "10")
//!         .body(Full::new(bytes::Bytes::from_static(b"data: hi\n\n")))
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let service = PassthroughLayer::new().initial_comment("ok").layer(stream);
//!
//! let response = service.oneshot(Request::new(())).await.unwrap();
//! assert!(response.headers().get(header::CONTENT_LENGTH).is_none());
//! let mut body = response.into_body();
//! let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
//! assert_eq!(first, ":ok\n\n");
//! let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
//! assert_eq!(second, "data: hi\n\n");
//! # }
//! ```

use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{head_parts, shared_body, PrefixedBody};
use crate::future::{head_response_future, Exchange, OnResponse};
use crate::wire::{is_encoded, Event};

/// Forwards event streams unbuffered; see the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct PassthroughLayer {
    initial: Option<Bytes>,
}

impl PassthroughLayer {
    /// Forwards every frame at once and removes `Content-Length`; no initial comment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `:text` and a blank line as the first frame of every event stream, at once.
    ///
    /// The comment is encoded once, here; each response clones the bytes. Line breaks in `text`
    /// start further comment lines, so no field can be injected.
    pub fn initial_comment(mut self, text: impl Into<String>) -> Self {
        self.initial = Some(Event::comment(text).encode());
        self
    }
}

impl<S> Layer<S> for PassthroughLayer {
    type Service = Passthrough<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Passthrough {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`PassthroughLayer`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Passthrough<S> {
    inner: S,
    layer: PassthroughLayer,
}

impl<S> Passthrough<S> {
    /// Wraps `inner`, with no initial comment.
    pub fn new(inner: S) -> Self {
        PassthroughLayer::new().layer(inner)
    }

    /// The layer, to configure it for several services.
    pub fn layer() -> PassthroughLayer {
        PassthroughLayer::new()
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Passthrough<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<PassthroughBody<ResBody>>;
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
    /// The response future of [`Passthrough`].
    pub struct ResponseFuture for PassthroughLayer => PassthroughBody where B: Body
}

impl<B: Body> OnResponse<B> for PassthroughLayer {
    type Body = PassthroughBody<B>;

    fn on_response(
        self,
        exchange: Exchange,
        response: Response<B>,
    ) -> Response<PassthroughBody<B>> {
        if exchange.is_head() {
            let body = PassthroughBody::from_shared(PrefixedBody::empty());
            return Response::from_parts(head_parts(response), body);
        }
        if !exchange.has_stream_body(response.headers()) {
            return response
                .map(|inner| PassthroughBody::from_shared(PrefixedBody::untouched(inner)));
        }
        let (mut parts, inner) = response.into_parts();
        parts.headers.remove(CONTENT_LENGTH);
        // Plain bytes in front of an encoded body would corrupt it; the compression layer sends
        // its own first bytes at once.
        let initial = self.initial.filter(|_| !is_encoded(&parts.headers));
        let body = PrefixedBody::counted_stream(inner, initial);
        Response::from_parts(parts, PassthroughBody::from_shared(body))
    }
}

shared_body! {
    /// The response body of [`Passthrough`]; see the [module docs](self).
    pub struct PassthroughBody(PrefixedBody),
        none when "`None` for the answer to a `HEAD` request, whose body was dropped"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{frames, next_data_within, Script, ScriptedBody};
    use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
    use http::HeaderMap;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    async fn respond(
        layer: PassthroughLayer,
        content_type: &'static str,
        body: ScriptedBody,
    ) -> Response<PassthroughBody<ScriptedBody>> {
        let mut body = Some(body);
        let inner = service_fn(move |_req: Request<()>| {
            let body = body.take().expect("called once");
            async move {
                let response = Response::builder()
                    .header(CONTENT_TYPE, content_type)
                    .header(CONTENT_LENGTH, "123")
                    .body(body)
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        layer.layer(inner).oneshot(Request::new(())).await.unwrap()
    }

    #[tokio::test]
    async fn streams_lose_content_length_and_exact_size() {
        let body = Script::new().chunks([b"data: 1\n\n"]).into_body();
        let response = respond(PassthroughLayer::new(), "text/event-stream", body).await;
        assert!(response.headers().get(CONTENT_LENGTH).is_none());
        assert_eq!(response.body().size_hint().exact(), None);
        assert_eq!(frames(response.into_body()).await, ["data: 1\n\n"]);
    }

    #[tokio::test]
    async fn frames_are_forwarded_one_for_one() {
        let chunks: [&[u8]; 4] = [b"da", b"ta: 1\n", b"\n", b"data: 2\n\n"];
        let response = respond(
            PassthroughLayer::new(),
            "text/event-stream",
            Script::new().chunks(chunks).into_body(),
        )
        .await;
        assert_eq!(frames(response.into_body()).await, chunks);
    }

    #[tokio::test]
    async fn non_streams_are_untouched_trailers_and_all() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = Script::new()
            .chunks([b"{}"])
            .trailers(trailers.clone())
            .into_body();
        let response = respond(
            PassthroughLayer::new().initial_comment("x"),
            "application/json",
            body,
        )
        .await;
        assert_eq!(response.headers()[CONTENT_LENGTH], "123");
        assert_eq!(response.body().size_hint().exact(), Some(2));
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "{}");
    }

    #[tokio::test]
    async fn initial_comment_comes_first_without_polling_the_inner_body() {
        let response = respond(
            PassthroughLayer::new().initial_comment("hello"),
            "text/event-stream",
            Script::new().hang().into_body(),
        )
        .await;
        let mut body = response.into_body();
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), ":hello\n\n");
    }

    #[tokio::test]
    async fn leading_bom_is_dropped_after_the_initial_comment() {
        let cases: [&[&[u8]]; 5] = [
            &[b"\xEF\xBB\xBFdata: 1\n\n"],
            &[b"\xEF", b"\xBB", b"\xBF", b"data: 1\n\n"],
            &[b"\xEF\xBB", b"\xBFdata: 1\n\n"],
            &[b"", b"\xEF\xBB\xBF", b"data: 1\n\n"],
            &[b"data: 1\n\n"],
        ];
        for chunks in cases {
            let response = respond(
                PassthroughLayer::new().initial_comment(""),
                "text/event-stream",
                Script::new().chunks(chunks).into_body(),
            )
            .await;
            let got = frames(response.into_body()).await.concat();
            assert_eq!(got, b":\n\ndata: 1\n\n", "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn partial_bom_that_is_not_a_bom_is_kept() {
        let cases: [(&[&[u8]], &[u8]); 3] = [
            (&[b"\xEF\xBB", b"x\n\n"], b"\xEF\xBBx\n\n"),
            (&[b"\xEF"], b"\xEF"),
            (&[b"\xEF", b"\xBBz"], b"\xEF\xBBz"),
        ];
        for (chunks, expected) in cases {
            let response = respond(
                PassthroughLayer::new().initial_comment(""),
                "text/event-stream",
                Script::new().chunks(chunks).into_body(),
            )
            .await;
            let got = frames(response.into_body()).await.concat();
            assert_eq!(got, [&b":\n\n"[..], expected].concat(), "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn inner_body_is_not_polled_after_it_ended() {
        let response = respond(
            PassthroughLayer::new().initial_comment(""),
            "text/event-stream",
            Script::new().chunks([b"\xEF"]).into_body(),
        )
        .await;
        let mut body = response.into_body();
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(got, b":\n\n\xEF");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn held_bytes_go_out_before_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-done", "1".parse().unwrap());
        let body = Script::new()
            .chunks([b"\xEF\xBB"])
            .trailers(trailers.clone())
            .into_body();
        let response = respond(
            PassthroughLayer::new().initial_comment(""),
            "text/event-stream",
            body,
        )
        .await;
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), &b":\n\n\xEF\xBB"[..]);
    }

    #[tokio::test]
    async fn no_initial_comment_in_front_of_an_encoded_body() {
        let inner = service_fn(|_req: Request<()>| async {
            let response = Response::builder()
                .header(CONTENT_TYPE, "text/event-stream")
                .header(CONTENT_ENCODING, "gzip")
                .body(Script::new().chunk(&b"\x1f\x8b"[..]).into_body())
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let layer = PassthroughLayer::new().initial_comment("ok");
        let response = layer.layer(inner).oneshot(Request::new(())).await.unwrap();
        assert_eq!(frames(response.into_body()).await, [&b"\x1f\x8b"[..]]);
    }

    /// `Content-Encoding: IDENTITY` is no coding, for passthrough as for heartbeat: both used to
    /// disagree (passthrough took it as encoded and sent no initial comment; heartbeat took it as
    /// plain and wrote heartbeats into it).
    #[tokio::test(start_paused = true)]
    async fn identity_in_upper_case_is_plain_for_passthrough_and_heartbeat() {
        let inner = service_fn(|_req: Request<()>| async {
            let response = Response::builder()
                .header(CONTENT_TYPE, "text/event-stream")
                .header(CONTENT_ENCODING, "IDENTITY")
                .body(Script::new().chunk("data: 1\n\n").hang().into_body())
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let service = tower::ServiceBuilder::new()
            .layer(PassthroughLayer::new().initial_comment("ok"))
            .layer(crate::HeartbeatLayer::new(std::time::Duration::from_secs(
                15,
            )))
            .service(inner);
        let response = service.oneshot(Request::new(())).await.unwrap();
        let mut body = std::pin::pin!(response.into_body());
        let second = std::time::Duration::from_secs(1);
        let started = tokio::time::Instant::now();
        for expected in [":ok\n\n", "data: 1\n\n", ":\n\n"] {
            let frame = next_data_within(body.as_mut(), 60 * second).await;
            assert_eq!(frame.as_deref(), Some(expected.as_bytes()));
        }
        assert_eq!(started.elapsed(), 15 * second);
    }

    #[tokio::test]
    async fn without_initial_comment_a_bom_is_forwarded() {
        let response = respond(
            PassthroughLayer::new(),
            "text/event-stream",
            Script::new()
                .chunks([b"\xEF\xBB\xBFdata: 1\n\n"])
                .into_body(),
        )
        .await;
        assert_eq!(
            frames(response.into_body()).await,
            [&b"\xEF\xBB\xBFdata: 1\n\n"[..]]
        );
    }

    #[tokio::test]
    async fn errors_of_the_inner_body_pass_through() {
        let body = Script::new()
            .chunks([b"data: 1\n\n"])
            .error("upstream reset")
            .into_body();
        let response = respond(PassthroughLayer::new(), "text/event-stream", body).await;
        let mut body = response.into_body();
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(error.to_string(), "upstream reset");
    }

    #[test]
    fn layer_is_cheap_to_clone_and_send() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        fn assert_send<T: Send + Sync + 'static>() {}
        assert_traits::<PassthroughLayer>();
        assert_traits::<Passthrough<tower::util::BoxCloneSyncService<Request<()>, (), ()>>>();
        assert_send::<PassthroughBody<http_body_util::Full<Bytes>>>();
    }
}
