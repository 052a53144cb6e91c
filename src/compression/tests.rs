use super::*;
use crate::test_util::{channel_service, Script};
use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;
use proptest::prelude::*;
use std::convert::Infallible;
use tower::{service_fn, ServiceExt};

const ALL: [Encoding; 4] = [
    Encoding::Gzip,
    Encoding::Deflate,
    Encoding::Brotli,
    Encoding::Zstd,
];

fn negotiate(layer: &SseCompressionLayer, accept: Option<&str>) -> Option<&'static str> {
    let mut headers = HeaderMap::new();
    if let Some(accept) = accept {
        headers.insert(ACCEPT_ENCODING, accept.parse().unwrap());
    }
    layer.config.negotiate(&headers).map(Encoding::token)
}

#[test]
fn negotiation_follows_q_values_then_preference() {
    let layer = SseCompressionLayer::new();
    assert_eq!(negotiate(&layer, None), None);
    assert_eq!(negotiate(&layer, Some("identity")), None);
    assert_eq!(negotiate(&layer, Some("gzip")), Some("gzip"));
    assert_eq!(
        negotiate(&layer, Some("gzip, deflate, br, zstd")),
        Some("zstd")
    );
    assert_eq!(negotiate(&layer, Some("gzip;q=1, br;q=0.5")), Some("gzip"));
    assert_eq!(negotiate(&layer, Some("gzip;q=0")), None);
    assert_eq!(negotiate(&layer, Some("*")), Some("zstd"));
    assert_eq!(negotiate(&layer, Some("*, zstd;q=0")), Some("br"));
    assert_eq!(
        negotiate(&layer, Some("GZIP ; q=0.3, Deflate;q=0.2")),
        Some("gzip")
    );
    assert_eq!(
        negotiate(&layer, Some("gzip;q=2")),
        None,
        "malformed weight"
    );
    let no_zstd = SseCompressionLayer::new().offer(Encoding::Zstd, false);
    assert_eq!(negotiate(&no_zstd, Some("*")), Some("br"));
    let only_gzip = ALL
        .iter()
        .fold(SseCompressionLayer::new(), |l, e| l.offer(*e, false))
        .level(Encoding::Gzip, 1);
    assert_eq!(negotiate(&only_gzip, Some("br, gzip;q=0.1")), Some("gzip"));
}

/// Decodes `encoding` incrementally, as a client does.
enum Decoder {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl Decoder {
    fn new(encoding: Encoding) -> Self {
        match encoding {
            Encoding::Gzip => Self::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            Encoding::Deflate => Self::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
            Encoding::Brotli => {
                Self::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096)))
            }
            Encoding::Zstd => Self::Zstd(zstd::stream::write::Decoder::new(Vec::new()).unwrap()),
        }
    }

    /// Feeds compressed bytes; returns everything decoded so far.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let writer: &mut dyn Write = match self {
            Self::Gzip(d) => d,
            Self::Deflate(d) => d,
            Self::Brotli(d) => &mut **d,
            Self::Zstd(d) => d,
        };
        writer.write_all(bytes).unwrap();
        writer.flush().unwrap();
        match self {
            Self::Gzip(d) => d.get_ref().clone(),
            Self::Deflate(d) => d.get_ref().clone(),
            Self::Brotli(d) => d.get_ref().clone(),
            Self::Zstd(d) => d.get_ref().clone(),
        }
    }
}

fn request(accept: &str) -> Request<()> {
    Request::builder()
        .header(ACCEPT_ENCODING, accept)
        .body(())
        .unwrap()
}

#[tokio::test]
async fn every_event_is_decodable_before_the_next_is_produced() {
    for encoding in ALL {
        let (mut senders, service) = channel_service("text/event-stream");
        let layer = SseCompressionLayer::new();
        let response = layer
            .layer(service)
            .oneshot(request(encoding.token()))
            .await
            .unwrap();
        assert_eq!(response.headers()[CONTENT_ENCODING], encoding.token());
        let mut tx = senders.recv().await.unwrap();
        let mut body = response.into_body();
        let mut decoder = Decoder::new(encoding);
        // The first frame is the header, at once.
        let header = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(decoder.feed(&header).is_empty(), "{encoding:?}");
        let mut expected = Vec::new();
        for n in 0..5 {
            let event = format!("id: {n}\ndata: {{\"price\":{n},\"symbol\":\"ACME\"}}\n\n");
            // Half an event first: nothing needs to be decodable yet.
            let (a, b) = event.as_bytes().split_at(7);
            tx.send_data(Bytes::copy_from_slice(a)).await.unwrap();
            tx.send_data(Bytes::copy_from_slice(b)).await.unwrap();
            expected.extend_from_slice(event.as_bytes());
            let mut decoded = Vec::new();
            while decoded != expected {
                let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
                decoded = decoder.feed(&frame);
            }
        }
    }
}

#[tokio::test]
async fn headers_are_set_and_content_length_removed() {
    let service = service_fn(|_req: Request<()>| async {
        let response = Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .header(CONTENT_LENGTH, "9")
            .header(VARY, "origin")
            .body(Script::new().chunk("data: x\n\n").into_body())
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let response = SseCompressionLayer::new()
        .layer(service)
        .oneshot(request("gzip"))
        .await
        .unwrap();
    let headers = response.headers();
    assert!(headers.get(CONTENT_LENGTH).is_none());
    let vary: Vec<_> = headers.get_all(VARY).iter().collect();
    assert_eq!(vary, ["origin", "accept-encoding"]);
    assert_eq!(response.body().size_hint().exact(), None);
}

#[tokio::test]
async fn identity_non_streams_and_encoded_bodies_are_untouched() {
    let answer = |content_type: &'static str, encoding: Option<&'static str>| {
        service_fn(move |_req: Request<()>| async move {
            let mut response = Response::builder()
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_LENGTH, "9");
            if let Some(encoding) = encoding {
                response = response.header(CONTENT_ENCODING, encoding);
            }
            let body = Script::new().chunk("data: x\n\n").into_body();
            Ok::<_, Infallible>(response.body(body).unwrap())
        })
    };
    let layer = SseCompressionLayer::new();
    for (service, accept) in [
        (answer("text/event-stream", None), "identity"),
        (answer("application/json", None), "gzip"),
        (answer("text/event-stream", Some("br")), "gzip"),
    ] {
        let response = layer.layer(service).oneshot(request(accept)).await.unwrap();
        assert_eq!(response.headers()[CONTENT_LENGTH], "9");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "data: x\n\n", "{accept}");
    }
}

/// `Content-Encoding: identity` (any case) is no coding: the stream is compressed like one
/// without the header, and the header names the coding that is now applied.
#[tokio::test]
async fn an_identity_coded_stream_is_compressed() {
    let service = service_fn(|_req: Request<()>| async {
        let response = Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .header(CONTENT_ENCODING, "IDENTITY")
            .body(Script::new().chunk("data: x\n\n").into_body())
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let response = SseCompressionLayer::new()
        .layer(service)
        .oneshot(request("gzip"))
        .await
        .unwrap();
    let codings: Vec<_> = response
        .headers()
        .get_all(CONTENT_ENCODING)
        .iter()
        .collect();
    assert_eq!(codings, ["gzip"]);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let mut decoder = Decoder::new(Encoding::Gzip);
    assert_eq!(decoder.feed(&body), b"data: x\n\n");
}

#[tokio::test]
async fn trailers_follow_the_end_of_the_compressed_stream() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-done", "1".parse().unwrap());
    let script = Script::new()
        .chunk("data: x\n\n")
        .trailers(trailers.clone());
    let service = crate::testing::ScriptedService::event_stream(script);
    let response = SseCompressionLayer::new()
        .layer(service)
        .oneshot(request("gzip"))
        .await
        .unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&trailers));
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    decoder.write_all(&collected.to_bytes()).unwrap();
    assert_eq!(decoder.finish().unwrap(), b"data: x\n\n");
}

fn compress_all(encoding: Encoding, chunks: Vec<Bytes>) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let script = Script::new().chunks(chunks);
        let service = crate::testing::ScriptedService::event_stream(script);
        let response = SseCompressionLayer::new()
            .layer(service)
            .oneshot(request(encoding.token()))
            .await
            .unwrap();
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    })
}

fn decompress_all(encoding: Encoding, bytes: &[u8]) -> Vec<u8> {
    let mut decoder = Decoder::new(encoding);
    let decoded = decoder.feed(bytes);
    match decoder {
        Decoder::Gzip(d) => d.finish().unwrap(),
        Decoder::Deflate(d) => d.finish().unwrap(),
        Decoder::Brotli(d) => d.into_inner().unwrap_or(decoded),
        Decoder::Zstd(d) => {
            drop(d);
            decoded
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_over_random_streams_and_chunkings(
        stream in prop::collection::vec(prop_oneof![
            Just(b"data: ".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"{\"key\":\"value\"}".to_vec()),
            prop::collection::vec(any::<u8>(), 0..20),
        ], 0..40).prop_map(|parts| parts.concat()),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
        which in 0..4usize,
    ) {
        let encoding = ALL[which];
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            chunks.push(Bytes::copy_from_slice(&stream[start..cut]));
            start = cut;
        }
        let compressed = compress_all(encoding, chunks);
        prop_assert_eq!(decompress_all(encoding, &compressed), stream);
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_are_compressed_and_flushed_too() {
    let upstream = crate::testing::ScriptedService::event_stream(Script::new().hang());
    let service = tower::ServiceBuilder::new()
        .layer(SseCompressionLayer::new())
        .layer(crate::HeartbeatLayer::new(std::time::Duration::from_secs(
            15,
        )))
        .service(upstream);
    let response = service.oneshot(request("gzip")).await.unwrap();
    let mut body = std::pin::pin!(response.into_body());
    let mut decoder = Decoder::new(Encoding::Gzip);
    let header = body.frame().await.unwrap().unwrap().into_data().unwrap();
    decoder.feed(&header);
    let beat = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(decoder.feed(&beat), b":\n\n");
}
