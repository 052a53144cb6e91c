//! A body that plays a script, for the crate's own tests.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

#[derive(Clone, Debug)]
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    Error(&'static str),
    Pending,
}

/// Yields its steps in order, one per poll; `Pending` steps return `Pending` once (and wake).
#[derive(Clone, Debug)]
pub(crate) struct ScriptedBody {
    steps: VecDeque<Step>,
    forever_pending: bool,
    ended: bool,
    panic_if_polled_after_end: bool,
}

#[derive(Debug)]
pub(crate) struct ScriptError(&'static str);

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ScriptError {}

impl ScriptedBody {
    pub(crate) fn data(chunks: &[&[u8]]) -> Self {
        Self {
            steps: chunks
                .iter()
                .map(|c| Step::Data(Bytes::copy_from_slice(c)))
                .collect(),
            forever_pending: false,
            ended: false,
            panic_if_polled_after_end: false,
        }
    }

    pub(crate) fn pending_forever() -> Self {
        Self {
            steps: VecDeque::new(),
            forever_pending: true,
            ended: false,
            panic_if_polled_after_end: false,
        }
    }

    pub(crate) fn with_trailers(mut self, trailers: HeaderMap) -> Self {
        self.steps.push_back(Step::Trailers(trailers));
        self
    }

    pub(crate) fn with_error(mut self, message: &'static str) -> Self {
        self.steps.push_back(Step::Error(message));
        self
    }

    /// Panics when polled again after it returned `None`, which callers must not do.
    pub(crate) fn then_panic_if_polled(mut self) -> Self {
        self.panic_if_polled_after_end = true;
        self
    }

    #[allow(dead_code)]
    pub(crate) fn then_pending(mut self) -> Self {
        self.steps.push_back(Step::Pending);
        self
    }
}

impl Body for ScriptedBody {
    type Data = Bytes;
    type Error = ScriptError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ScriptError>>> {
        match self.steps.pop_front() {
            Some(Step::Data(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Step::Trailers(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Some(Step::Error(message)) => Poll::Ready(Some(Err(ScriptError(message)))),
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None if self.forever_pending => Poll::Pending,
            None => {
                assert!(
                    !(self.ended && self.panic_if_polled_after_end),
                    "polled after the end"
                );
                self.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty() && !self.forever_pending
    }

    fn size_hint(&self) -> SizeHint {
        if self.forever_pending || self.steps.iter().any(|s| matches!(s, Step::Pending)) {
            return SizeHint::default();
        }
        let len = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Data(d) => d.len() as u64,
                _ => 0,
            })
            .sum();
        SizeHint::with_exact(len)
    }
}

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
