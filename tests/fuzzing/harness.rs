//! The fuzz harness, shared by the cargo-fuzz targets (`fuzz/`) and by `tests/fuzz.rs`, which
//! replays the saved corpus and runs a short random smoke run in CI.
//!
//! Input: the first byte picks a chunk size, the rest is the upstream's event stream. Checked:
//! nothing panics, and the messages a client sees through the parser in chunks, through each
//! body layer (compression gunzipped), and through the full stack, equal those of the input read
//! whole. A layer may end
//! the stream early only where the input breaks the default limits, after the events before it.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};
use tower_sse::compression::SseCompressionLayer;
use tower_sse::replay::MemoryStore;
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::wire::{Limits, Parser};
use tower_sse::{
    CommentMetadataLayer, FanoutLayer, HeartbeatLayer, LifetimeLayer, PassthroughLayer,
    ReconnectDelayLayer, ReplayLayer, SseHeadersLayer,
};

/// What a client sees: (type, data, lastEventId) per message.
pub(crate) type Messages = Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>;

/// The messages in `chunks`, read with `limits`; `true` when the limits were broken.
pub(crate) fn messages(chunks: &[Bytes], limits: Limits) -> (Messages, bool) {
    let mut parser = Parser::with_limits(limits);
    let mut out = Vec::new();
    for chunk in chunks {
        parser.push(chunk.clone());
        while let Some(event) = parser.next_event() {
            let Ok(event) = event else {
                return (out, true);
            };
            if let Some(data) = event.data_bytes() {
                let kind = event
                    .event_type()
                    .filter(|t| !t.is_empty())
                    .unwrap_or(b"message");
                out.push((
                    kind.to_vec(),
                    data.to_vec(),
                    parser.last_event_id().to_vec(),
                ));
            }
        }
    }
    (out, false)
}

/// The input's chunks: the first byte picks the size (1 to 256 bytes, or whole).
pub(crate) fn split(input: &[u8]) -> Vec<Bytes> {
    let Some((&pick, stream)) = input.split_first() else {
        return Vec::new();
    };
    let stream = Bytes::copy_from_slice(stream);
    if pick == 0 || stream.is_empty() {
        return vec![stream];
    }
    let size = usize::from(pick);
    (0..stream.len())
        .step_by(size)
        .map(|start| stream.slice(start..(start + size).min(stream.len())))
        .collect()
}

fn upstream(
    chunks: Vec<Bytes>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |_request: Request<()>| {
        let chunks = chunks.clone();
        async move {
            let frames = chunks
                .into_iter()
                .map(|c| Ok::<_, Infallible>(http_body::Frame::data(c)));
            Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(StreamBody::new(tokio_stream::iter(frames)))
                    .unwrap(),
            )
        }
    })
}

async fn through<S, B>(service: S) -> Vec<Bytes>
where
    S: tower::Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    through_request(service, Request::get("/fuzz").body(()).unwrap()).await
}

/// The compression layer's output, gunzipped as a client would.
async fn gunzipped<S, B>(service: S) -> Vec<Bytes>
where
    S: tower::Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let request = Request::get("/fuzz")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(())
        .unwrap();
    let compressed: Vec<u8> = through_request(service, request).await.concat();
    let mut plain = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(&compressed[..]);
    // A stream cut short at a limit decodes up to where it stopped.
    let _ = std::io::Read::read_to_end(&mut decoder, &mut plain);
    vec![Bytes::from(plain)]
}

async fn through_request<S, B>(service: S, request: Request<()>) -> Vec<Bytes>
where
    S: tower::Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = service.oneshot(request).await.unwrap();
    let mut body = std::pin::pin!(response.into_body());
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => frames.extend(frame.into_data().ok()),
            // A layer may end a stream it cannot frame (past a limit) with an error.
            Err(_) => break,
        }
    }
    frames
}

/// Checks one input; panics on any difference.
pub(crate) fn check(input: &[u8]) {
    let chunks = split(input);
    let (expected, _) = messages(&chunks.concat_bytes(), Limits::unbounded());
    let (chunked, _) = messages(&chunks, Limits::unbounded());
    assert_eq!(chunked, expected, "the parser in chunks");
    let (_, breaks_limits) = messages(&chunks.concat_bytes(), Limits::default());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let minute = Duration::from_secs(60);
    let outputs: Vec<(&str, Vec<Bytes>)> = runtime.block_on(async {
        let up = || upstream(chunks.clone());
        let store = MemoryStore::new();
        vec![
            (
                "passthrough",
                through(PassthroughLayer::new().initial_comment("ok").layer(up())).await,
            ),
            (
                "retry",
                through(ReconnectDelayLayer::new(minute).layer(up())).await,
            ),
            (
                "metadata",
                through(
                    CommentMetadataLayer::new()
                        .metadata_as_comment(true)
                        .layer(up()),
                )
                .await,
            ),
            (
                "heartbeat",
                through(HeartbeatLayer::new(minute).layer(up())).await,
            ),
            (
                "lifetime",
                through(LifetimeLayer::new().max_lifetime(minute).layer(up())).await,
            ),
            ("replay", through(ReplayLayer::new().layer(up())).await),
            (
                "idle timeout",
                through(IdleTimeoutLayer::new(minute).layer(up())).await,
            ),
            (
                "compression (gzip)",
                gunzipped(SseCompressionLayer::new().layer(up())).await,
            ),
            (
                "SseStack with compression (gzip)",
                gunzipped(
                    tower_sse::SseStack::new()
                        .reconnect_delay(minute)
                        .metadata(CommentMetadataLayer::new().metadata_as_comment(true))
                        .heartbeat(minute)
                        .lifetime(LifetimeLayer::new().max_lifetime(minute))
                        .replay(ReplayLayer::with_store(MemoryStore::new()))
                        .idle_timeout(minute)
                        .response_timeout(minute)
                        .compression(SseCompressionLayer::new())
                        .layer(up()),
                )
                .await,
            ),
            (
                "full stack",
                through(
                    ServiceBuilder::new()
                        .layer(SseHeadersLayer::new())
                        .layer(PassthroughLayer::new().initial_comment("ok"))
                        .layer(ReconnectDelayLayer::new(minute))
                        .layer(CommentMetadataLayer::new().metadata_as_comment(true))
                        .layer(HeartbeatLayer::new(minute))
                        .layer(LifetimeLayer::new().max_lifetime(minute))
                        .layer(ReplayLayer::with_store(store.clone()))
                        .layer(FanoutLayer::new().record_into(store).linger(Duration::ZERO))
                        .layer(IdleTimeoutLayer::new(minute))
                        .layer(ResponseTimeoutLayer::new(minute))
                        .service(up()),
                )
                .await,
            ),
        ]
    });
    for (layer, frames) in outputs {
        let (seen, _) = messages(&frames, Limits::unbounded());
        if breaks_limits {
            assert!(
                expected.starts_with(&seen),
                "{layer}: past the limits, a prefix of the events"
            );
        } else {
            assert_eq!(seen, expected, "{layer}");
        }
    }
}

trait Concat {
    fn concat_bytes(&self) -> Vec<Bytes>;
}

impl Concat for Vec<Bytes> {
    fn concat_bytes(&self) -> Vec<Bytes> {
        vec![Bytes::from(
            self.iter()
                .flat_map(|c| c.iter().copied())
                .collect::<Vec<u8>>(),
        )]
    }
}
