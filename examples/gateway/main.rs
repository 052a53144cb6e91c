//! The tower-sse gateway: a demo event stream, or a reverse proxy, behind the full layer stack.
//!
//! ```text
//! cargo run --example gateway                                    # demo stream + page on :3000
//! cargo run --example gateway -- --upstream http://127.0.0.1:8080  # proxy an SSE server
//! cargo run --example gateway -- --help
//! ```
//!
//! Without `--upstream` it serves a built-in event stream at `/events` (an event with an id every
//! second; it resumes after `Last-Event-ID`) and a page at `/` that shows it live with the
//! browser's `EventSource`. With `--upstream` every request is forwarded to that server, bodies
//! streamed both ways, and event-stream responses get the tower-sse stack on the way back.

mod demo;
mod proxy;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, Uri};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::layer::util::{Identity, Stack};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse::{PassthroughLayer, SseHeadersLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves the tower-sse layer stack in front of a demo event stream or an upstream server.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about, long_about = None)]
struct Args {
    /// Address to listen on (use port 0 for any free port; the address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,

    /// Reverse-proxy every request to this http:// base URL instead of serving the demo.
    /// A path in the URL is prefixed to every request path.
    #[arg(long, value_name = "URL", value_parser = proxy::parse_upstream)]
    upstream: Option<Uri>,

    /// Comment sent as the first byte of every event stream, so headers leave at once.
    #[arg(long, value_name = "TEXT", default_value = "ok")]
    initial_comment: String,

    /// Send no initial comment: headers wait for the first upstream byte.
    #[arg(long, conflicts_with = "initial_comment")]
    no_initial_comment: bool,

    /// Milliseconds between events of the demo stream.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    demo_interval: u64,
}

/// The layers every response goes through, outermost first (see the crate docs for the order).
fn layers(
    args: &Args,
) -> ServiceBuilder<Stack<PassthroughLayer, Stack<SseHeadersLayer, Identity>>> {
    let passthrough = if args.no_initial_comment {
        PassthroughLayer::new()
    } else {
        PassthroughLayer::new().initial_comment(args.initial_comment.clone())
    };
    ServiceBuilder::new()
        .layer(SseHeadersLayer::new())
        .layer(passthrough)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("tower-sse gateway listening on http://{addr}");
    match &args.upstream {
        Some(upstream) => {
            println!("  proxying every request to {upstream}");
            println!("  try: curl -N http://{addr}/<path of an event stream>");
            let service = layers(&args).service(proxy::Proxy::new(upstream.clone()));
            serve(listener, service).await;
        }
        None => {
            println!("  page:   http://{addr}/");
            println!("  stream: http://{addr}/events   (try: curl -N http://{addr}/events)");
            let demo = demo::Demo::new(Duration::from_millis(args.demo_interval.max(1)));
            serve(listener, layers(&args).service(demo)).await;
        }
    }
    Ok(())
}

/// The peer's address, put into every request's extensions for the proxy's `X-Forwarded-For`.
#[derive(Clone, Copy, Debug)]
struct PeerAddr(SocketAddr);

/// Accepts HTTP/1 and HTTP/2 connections until Ctrl-C (or SIGTERM), then shuts down gracefully.
async fn serve<S, B>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    println!("Ctrl-C to stop.");
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    eprintln!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Events are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let service = tower::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(PeerAddr(peer));
            service.clone().oneshot(request)
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // A client leaving an endless stream is how streams normally end.
                let client_left = error
                    .downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_incomplete_message);
                if !client_left {
                    eprintln!("connection from {peer} ended with an error: {error}");
                }
            }
        });
    }
    println!("shutting down: waiting up to 3 s for open connections");
    // Event streams never end by themselves; without a shutdown layer they are cut here.
    if tokio::time::timeout(Duration::from_secs(3), graceful.shutdown())
        .await
        .is_err()
    {
        println!("closing the event streams still open");
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
