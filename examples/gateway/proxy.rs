//! A streaming reverse proxy: the inner service of the gateway with `--upstream`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::Service;

use crate::limits::is_body_timeout;
use crate::stream_reader::{self, StreamBody};
use crate::{PeerAddr, RequestBody};

/// An upstream response's body (through hyper's client or read directly), or the proxy's own.
pub(crate) type ProxyBody = Either<Either<Incoming, StreamBody>, Full<Bytes>>;

/// How upstream event streams are read (`--stream-reader`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StreamReader {
    /// Off the stream's own socket: no connection task, channel or idle read buffer.
    Direct,
    /// Through hyper's pooled client, as every other request.
    Hyper,
}

/// Forwards requests to one upstream, streaming bodies both ways.
#[derive(Clone, Debug)]
pub(crate) struct Proxy {
    client: Client<HttpConnector, RequestBody>,
    upstream: Uri,
    /// The upstream's `host:port` and `Host`, for event streams read directly; `None` with
    /// `--stream-reader hyper`.
    direct: Option<Arc<(String, String)>>,
}

/// Checks `--upstream`: an absolute `http://` URL.
pub(crate) fn parse_upstream(value: &str) -> Result<Uri, String> {
    let uri: Uri = value.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme() != Some(&Scheme::HTTP) || uri.authority().is_none() {
        return Err("expected an http:// URL with a host, e.g. http://127.0.0.1:8080".into());
    }
    Ok(uri)
}

impl Proxy {
    pub(crate) fn new(upstream: Uri, streams: StreamReader) -> Self {
        let mut connector = HttpConnector::new();
        // Events are small writes that must leave at once.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let direct = (streams == StreamReader::Direct)
            .then(|| upstream.authority())
            .flatten()
            .map(|authority| {
                let address = format!(
                    "{}:{}",
                    authority.host(),
                    authority.port_u16().unwrap_or(80)
                );
                Arc::new((address, authority.as_str().to_owned()))
            });
        Self {
            client,
            upstream,
            direct,
        }
    }

    /// The upstream URL for `uri`: the upstream's scheme and host, its path as a prefix.
    fn target(&self, uri: &Uri) -> Uri {
        let prefix = self.upstream.path().trim_end_matches('/');
        let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let mut parts = self.upstream.clone().into_parts();
        parts.path_and_query = format!("{prefix}{path_and_query}").parse().ok();
        Uri::from_parts(parts).unwrap_or_else(|_| self.upstream.clone())
    }
}

impl Service<Request<RequestBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let target = self.target(&parts.uri);
        let client_host = parts.headers.get(header::HOST).cloned();
        remove_hop_by_hop(&mut parts.headers);
        // The client sets Host from the upstream URL.
        parts.headers.remove(header::HOST);
        if let Some(PeerAddr(peer)) = parts.extensions.get::<PeerAddr>().copied() {
            append_forwarded_for(&mut parts.headers, peer.ip());
        }
        if let Some(host) = client_host {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
        if accepts_event_stream(&parts.headers) {
            // The layers work on the event stream's bytes: a compressed answer would make every
            // one of them step aside. The gateway compresses toward the client itself.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        parts.uri = target;
        // The client speaks HTTP/1.1 to the upstream, whatever the downstream spoke.
        parts.version = http::Version::HTTP_11;
        let direct = self.direct.as_ref().filter(|_| {
            parts.method == http::Method::GET
                && body.is_end_stream()
                && accepts_event_stream(&parts.headers)
        });
        if let Some(direct) = direct.cloned() {
            let request = Request::from_parts(parts, ());
            return Box::pin(async move {
                let (address, host) = &*direct;
                Ok(match stream_reader::send(address, host, &request).await {
                    Ok(response) => {
                        forwarded(response.map(|body| Either::Left(Either::Right(body))))
                    }
                    Err(error) => bad_gateway(&error),
                })
            });
        }
        let upstream = self.client.request(Request::from_parts(parts, body));
        Box::pin(async move {
            Ok(match upstream.await {
                Ok(response) => forwarded(response.map(|body| Either::Left(Either::Left(body)))),
                Err(error) if is_body_timeout(&error) => request_timeout(),
                Err(error) => bad_gateway(&error),
            })
        })
    }
}

/// The upstream's response as the client gets it: without the upstream connection's headers.
fn forwarded(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    remove_hop_by_hop(response.headers_mut());
    response
}

fn bad_gateway(error: &dyn std::error::Error) -> Response<ProxyBody> {
    let mut message = format!("502 Bad Gateway: upstream request failed: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message.push('\n');
    eprintln!("{}", message.trim_end());
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Either::Right(Full::from(message)))
        .expect("static response parts are valid")
}

/// 408: the client stopped sending its request body (`--body-timeout`). Over HTTP/1 hyper then
/// closes the connection, since the body was not read to its end.
fn request_timeout() -> Response<ProxyBody> {
    Response::builder()
        .status(StatusCode::REQUEST_TIMEOUT)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Either::Right(Full::from(
            "408 Request Timeout: the request body stopped arriving\n",
        )))
        .expect("static response parts are valid")
}

/// Whether the request asks for an event stream: its `Accept` names `text/event-stream` (as
/// every `EventSource` sends). Those requests ask the upstream for `identity`, so that the
/// layers see the stream's bytes; other requests keep their `Accept-Encoding`, and their
/// compressed answers pass through untouched.
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|range| range.split(';').next())
        .any(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Removes the headers that describe one connection, not the message (RFC 9110, 7.6.1).
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    // `TE: trailers` is end-to-end in practice (gRPC needs it); other TE values are not.
    if headers
        .get(header::TE)
        .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: std::net::IpAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}
