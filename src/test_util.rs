//! Helpers for the crate's own tests, beside the public testing kit.

use std::fmt;
use std::pin::Pin;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

pub(crate) use crate::testing::{Script, ScriptedBody};

/// Every data frame of `body`, in order, until it ends (panics on an error).
pub(crate) async fn frames<B>(body: B) -> Vec<Bytes>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push(data);
        }
    }
    frames
}

type ChannelBody = http_body_util::channel::Channel<Bytes>;
type ChannelResponse =
    std::future::Ready<Result<http::Response<ChannelBody>, std::convert::Infallible>>;
type Senders = tokio::sync::mpsc::UnboundedReceiver<http_body_util::channel::Sender<Bytes>>;

/// A service answering every request with `content_type` and a body fed through the sender it
/// hands out for that request: the test decides when each chunk arrives.
pub(crate) fn channel_service(
    content_type: &'static str,
) -> (
    Senders,
    impl tower::Service<
            http::Request<()>,
            Response = http::Response<ChannelBody>,
            Error = std::convert::Infallible,
            Future = ChannelResponse,
        > + Clone,
) {
    let (senders_tx, senders_rx) = tokio::sync::mpsc::unbounded_channel();
    let service = tower::service_fn(move |_request: http::Request<()>| {
        let (sender, body) = http_body_util::channel::Channel::new(16);
        let _ = senders_tx.send(sender);
        let response = http::Response::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .body(body)
            .unwrap();
        std::future::ready(Ok(response))
    });
    (senders_rx, service)
}

/// The next data frame of `body`, or `None` if none arrives within `within` (on tokio's clock).
pub(crate) async fn next_data_within<B>(
    body: Pin<&mut B>,
    within: std::time::Duration,
) -> Option<Bytes>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Debug,
{
    let mut body = body;
    match tokio::time::timeout(within, body.frame()).await {
        Ok(Some(frame)) => Some(frame.unwrap().into_data().expect("a data frame")),
        Ok(None) => panic!("the body ended"),
        Err(_) => None,
    }
}
