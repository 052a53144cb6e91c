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

mod admin;
mod demo;
mod limits;
mod ops;
mod proxy;
mod stream_reader;
mod stream_writer;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use stream_writer::Handoff;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt};
use tower_sse::compression::SseCompressionLayer;
use tower_sse::fanout::FanoutLayer;
use tower_sse::lifetime::Triggered;
use tower_sse::replay::{
    MemoryLimits, MemoryStore, PathAndQuery, Qos, RedisConfig, RedisStore, ReplayLayer, ReplayStore,
};
use tower_sse::subscriptions::{SubscriptionStore, Subscriptions};
use tower_sse::{CommentMetadataLayer, LifetimeLayer, ReconnectDelayLayer, Shutdown, SseStack};

use metrics_exporter_prometheus::PrometheusHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every service of the gateway reads requests from: hyper's body (none for a request the
/// stream writer read itself), cut after `--body-timeout` without a byte.
type RequestBody = limits::BodyTimeout<IncomingBody>;

/// A request's body as it comes in: hyper's, or none for a request the stream writer read.
type IncomingBody = Either<Incoming, Empty<Bytes>>;

/// Serves the tower-sse layer stack in front of a demo event stream or an upstream server.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about, long_about = None)]
struct Args {
    /// Address to listen on (use port 0 for any free port; the address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,

    /// Serve from this many threads, each with its own single-threaded runtime and its own
    /// listener on the same address (SO_REUSEPORT: the kernel spreads connections), the way
    /// nginx runs workers; by default one per CPU core (on Unix). 0: one multi-threaded runtime
    /// (tokio's work-stealing scheduler), which balances uneven connections but wakes a second
    /// thread for every burst.
    #[arg(long, value_name = "N", default_value_t = default_workers())]
    workers: usize,

    /// Ask the kernel to run every thread of the gateway in CPU slices of this many microseconds
    /// (Linux 6.12 and later: the EEVDF scheduler's custom slice; the kernel keeps it within
    /// 100-100,000): a woken thread gets a CPU sooner and yields it sooner, for the same share of
    /// CPU. 0: the kernel's default slice (a few milliseconds).
    #[arg(long, value_name = "MICROS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    sched_slice: u64,

    /// Reverse-proxy every request to this http:// base URL instead of serving the demo.
    /// A path in the URL is prefixed to every request path.
    #[arg(long, value_name = "URL", value_parser = proxy::parse_upstream)]
    upstream: Option<Uri>,

    /// How an upstream event stream (a GET without a body whose Accept names
    /// text/event-stream) is read: `direct` off its own socket, with no buffer or task kept while
    /// it is quiet; `hyper` through the pooled client that carries every other request.
    #[arg(long, value_name = "READER", value_enum, default_value_t = proxy::StreamReader::Direct)]
    stream_reader: proxy::StreamReader,

    /// Comment sent as the first byte of every event stream, so headers leave at once.
    #[arg(long, value_name = "TEXT", default_value = "ok")]
    initial_comment: String,

    /// Send no initial comment: headers wait for the first upstream byte.
    #[arg(long, conflicts_with = "initial_comment")]
    no_initial_comment: bool,

    /// Seconds without anything sent to a client before a heartbeat comment goes out (0: off).
    #[arg(long, value_name = "SECS", default_value_t = 15.0, value_parser = seconds)]
    heartbeat: f64,

    /// Seconds of upstream silence after which a stream ends, so the client reconnects (0: off).
    /// Heartbeats do not count as activity.
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = seconds)]
    idle_timeout: f64,

    /// Seconds the upstream may take to send response headers before the client gets a 504
    /// (0: off).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = seconds)]
    response_timeout: f64,

    /// Seconds after which a stream ends at its next event boundary, shortened at random by up to
    /// 20 % so clients do not reconnect together (0: off).
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = seconds)]
    max_lifetime: f64,

    /// Reconnection time in milliseconds sent to clients as `retry:` at the start of every stream
    /// and before a stream ends on shutdown or at its maximum lifetime (0: not sent).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    retry: u64,

    /// Up to this many milliseconds added at random to each `retry:` sent, so that clients cut
    /// off together (by a restart, say) do not reconnect in the same instant.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    retry_jitter: u64,

    /// Compress event streams (gzip, deflate, br or zstd, by the client's Accept-Encoding),
    /// flushed after every event so none is delayed.
    #[arg(long)]
    compression: bool,

    /// Response headers to show raw readers as `:name=value` comments at the start of each
    /// stream, comma-separated (sensitive ones such as set-cookie are never shown).
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    headers_as_comment: Vec<http::header::HeaderName>,

    /// Show per-event metadata (`meta-<key>` fields) as `:key=value` comments inside each event;
    /// with `--headers-as-comment` alone, metadata fields are stripped.
    #[arg(long)]
    metadata_as_comment: bool,

    /// Events kept per stream for `Last-Event-ID` replay: a reconnecting client gets what it
    /// missed, then the live stream (0: off). Streams are keyed by path, query and credentials.
    #[arg(long, value_name = "N", default_value_t = 0)]
    replay: usize,

    /// The upstream resumes after the `Last-Event-ID` it is sent, as the spec asks of servers.
    /// Without it, a client whose stream nothing recorded for a while (it was alone, and went
    /// away) is told events may be missing (`sse-resumed-from: partial` and the history-lost
    /// event). The demo source resumes.
    #[arg(long)]
    upstream_resumes: bool,

    /// The type of the event sent when replay cannot promise a reconnecting client misses
    /// nothing (data: `earliest`, `live`, `partial` or `upstream`); empty: none.
    #[arg(long, value_name = "NAME", default_value = "history-lost")]
    history_lost_event: String,

    /// Share one upstream subscription per stream (path, query, credentials) among its clients, with
    /// a bounded queue per client; a client that falls behind is disconnected and, with
    /// `--replay`, resumes from the replay buffer when it reconnects.
    #[arg(long)]
    fanout: bool,

    /// Seconds a shared upstream subscription stays open (still recording for `--replay`) after
    /// its last client leaves, so a client that reconnects within it misses nothing.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = seconds, requires = "fanout")]
    linger: f64,

    /// Let clients with different credentials share replay history and fan-out subscriptions
    /// (one per path and query, opened with the first client's credentials). Off by default:
    /// the stream key of a request with credentials (Authorization, Cookie, --credential-headers)
    /// holds a SHA-256 digest of them, so nobody reads a stream recorded or opened with another
    /// client's credentials. Only for streams that are the same for everybody.
    #[arg(long)]
    share_across_credentials: bool,

    /// More request headers that carry credentials, comma-separated, kept apart like
    /// Authorization and Cookie (default: none besides those two).
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    credential_headers: Vec<http::header::HeaderName>,

    /// Query parameters that tell streams apart for replay and fan-out, comma-separated: the
    /// others are left out of the stream key (the request still carries them), so clients
    /// cannot make up new streams with them. Default: the whole query, minus lastEventId.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    key_query: Option<Vec<String>>,
    /// Bytes the in-memory replay store may hold for all streams together (events, ids and
    /// bookkeeping); beyond it the streams least recently used are forgotten whole (the
    /// default is 64 MiB). Not for `--redis`.
    #[arg(long, value_name = "BYTES", default_value_t = MemoryLimits::DEFAULT_MAX_BYTES, conflicts_with = "redis")]
    replay_max_bytes: usize,

    /// Streams (distinct paths and queries) the in-memory replay store keeps at most; a new one
    /// beyond it evicts the one unused for longest. Not for `--redis`.
    #[arg(long, value_name = "N", default_value_t = MemoryLimits::DEFAULT_MAX_KEYS, conflicts_with = "redis")]
    replay_max_keys: usize,

    /// Shared upstream subscriptions open at once with `--fanout`, lingering ones included: a new
    /// stream first closes the ones nobody reads (idle longest first); when all have clients it
    /// is proxied unshared.
    #[arg(long, value_name = "N", default_value_t = FanoutLayer::DEFAULT_MAX_SUBSCRIPTIONS, requires = "fanout")]
    fanout_max_subscriptions: usize,

    /// Keep replay history in Redis Streams at this URL (`redis://host:port/db`), shared by every
    /// gateway pointed at it, so a client may reconnect to any of them; turns replay on
    /// (`--replay` events per stream, 1000 if not given).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// `--redis` names nodes of a Redis Cluster, comma-separated (any of them; the others are
    /// discovered).
    #[arg(long, requires = "redis")]
    redis_cluster: bool,

    /// Prefix of every Redis key this gateway writes.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "sse:",
        requires = "redis"
    )]
    redis_prefix: String,

    /// Serve provisioned subscriptions: each subscription's stream at
    /// `/subscriptions/{id}/subscribe` resuming from its server-side cursor, and a disposable
    /// subscription for every plain request on a topic's stream path. In Redis with `--redis`.
    /// The management API (`/topics/{topic}/subscriptions`, `/subscriptions/{id}`) is served
    /// only with --admin-listen or --admin-token.
    #[arg(long)]
    subscriptions: bool,

    /// Where a topic's event stream is, on the demo or the upstream: a path with `{topic}`.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/topics/{topic}",
        requires = "subscriptions",
        value_parser = topic_path
    )]
    topic_path: String,

    /// Seconds a client may take to send a request's headers, counted from the connection's
    /// start and, between requests, from the end of the previous one (0: off). Also bounds how
    /// long an HTTP/2 connection may go without its first request. Like nginx's
    /// `client_header_timeout`.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = seconds)]
    header_timeout: f64,

    /// Seconds a request body may send no byte while it is being read before the request ends
    /// (the proxy answers 408; 0: off). Like nginx's `client_body_timeout`.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = seconds)]
    body_timeout: f64,

    /// Seconds a client's socket may accept no byte while the gateway has something to send
    /// before the connection is closed, so a client that stopped reading does not hold it
    /// forever; an HTTP/2 stream the client grants no flow-control window for that long closes
    /// its connection too (0: off). Like nginx's `send_timeout`.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = seconds)]
    send_timeout: f64,

    /// On hyper's HTTP/1 path (see --http1-hyper): write responses with `writev` over the queued
    /// chunks, as hyper does by default, instead of copying each chunk into the connection's
    /// write buffer and sending it with one `write`. The copy costs less for small events;
    /// `writev` saves it for large bodies, and frees what a slow client left queued (the write
    /// buffer keeps its size).
    #[arg(long)]
    http1_writev: bool,

    /// Serve every HTTP/1 request through hyper's connection, event streams too. By default the
    /// gateway reads plain `GET` requests itself and writes the event streams that answer them
    /// straight to the socket, which costs less per event and per idle stream; anything else
    /// (a request with a body, an upgrade, HTTP/1.0, any other response) goes to hyper.
    #[arg(long)]
    http1_hyper: bool,

    /// The most an HTTP/1 connection buffers, in bytes: a request head, and what waits for a
    /// client that reads slower than the stream goes beyond its socket's own buffer (at least
    /// 8192). An event stream the gateway writes frees a buffer grown past 4 KiB once its client
    /// caught up; hyper's (`max_buf_size`) keeps the size it grew to, up to about twice this,
    /// until the connection closes.
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024, value_parser = http1_buffer)]
    http1_buffer: usize,

    /// Serve the subscriptions management API (create, list, get, suspend, reactivate, delete)
    /// on a listener of its own at this address, for operators; the public port then never
    /// serves it. Default: off (with neither this nor --admin-token, the API is not served).
    #[arg(long, value_name = "ADDR", requires = "subscriptions")]
    admin_listen: Option<SocketAddr>,

    /// Require `Authorization: Bearer TOKEN` (compared in constant time; at least 16 visible
    /// characters) on the management API; without --admin-listen, the API is then served on
    /// the public port behind it (`401` without it). Default: none.
    #[arg(long, value_name = "TOKEN", requires = "subscriptions", value_parser = admin::token)]
    admin_token: Option<String>,

    /// At most this many subscriptions in all (every topic and, with --redis, every instance
    /// sharing the Redis; disposable ones included); creates beyond answer 429.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100_000,
        requires = "subscriptions"
    )]
    max_subscriptions: usize,

    /// At most this many subscriptions per topic (disposable ones included); creates beyond
    /// answer 429, plain readers beyond get their stream without one.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        requires = "subscriptions"
    )]
    max_per_topic: usize,

    /// Milliseconds between events of the demo stream.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    demo_interval: u64,

    /// Events per second of each demo stream, for load tests (overrides --demo-interval; events
    /// due in the same timer tick go out in one frame).
    #[arg(long, value_name = "N")]
    demo_rate: Option<f64>,

    /// Pad each demo event's data to about this many bytes, for load tests.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    demo_size: usize,
}

/// `--http1-buffer`: hyper takes no less than 8 KiB.
fn http1_buffer(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(bytes) if bytes >= 8192 => Ok(bytes),
        _ => Err(format!("expected a number of bytes >= 8192, got {value:?}")),
    }
}

/// A non-negative number of seconds, fractions allowed.
fn seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok(secs),
        _ => Err(format!("expected a number of seconds >= 0, got {value:?}")),
    }
}

/// A path that starts with `/` and holds `{topic}` once.
fn topic_path(value: &str) -> Result<String, String> {
    if value.starts_with('/') && value.matches("{topic}").count() == 1 && !value.contains('?') {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "expected a path with one {{topic}}, such as /topics/{{topic}}, got {value:?}"
        ))
    }
}

/// `Some(duration)` for a positive number of seconds, `None` for 0 (off).
fn positive(secs: f64) -> Option<Duration> {
    (secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The stores of a gateway: replay history (when on) and subscriptions (when on).
struct Stores<St, Sub> {
    /// The replay layer: with `Qos::None` when `--replay 0` switches replay off.
    replay: ReplayLayer<St>,
    subscriptions: Option<Subscriptions<Sub>>,
}

/// Serves `inner` behind the `SseStack` the flags describe (the builder applies the crate's one
/// stack order), with the management API and the per-connection limits.
async fn serve_gateway<S, B, St, Sub>(
    args: &Args,
    listener: TcpListener,
    inner: S,
    stores: Stores<St, Sub>,
    metrics: PrometheusHandle,
) where
    St: ReplayStore,
    Sub: SubscriptionStore,
    S: Served<B>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let retry = (args.retry > 0).then(|| Duration::from_millis(args.retry));
    let shutdown = Shutdown::new();
    let mut lifetime = LifetimeLayer::new().shutdown(&shutdown);
    if let Some(max) = positive(args.max_lifetime) {
        lifetime = lifetime.max_lifetime(max).jitter(max / 5);
    }
    if let Some(retry) = retry {
        lifetime = lifetime
            .retry_on_end(retry)
            .retry_jitter(Duration::from_millis(args.retry_jitter));
    }
    let Stores {
        replay,
        subscriptions,
    } = stores;
    let subscriptions = subscriptions.map(|subscriptions| {
        subscriptions
            .topic_path(&args.topic_path)
            .max_per_topic(args.max_per_topic)
            .max_subscriptions(args.max_subscriptions)
    });
    let limits = Limits {
        header: positive(args.header_timeout),
        body: positive(args.body_timeout),
        send: positive(args.send_timeout),
        writev: args.http1_writev,
        http1_buffer: args.http1_buffer,
        direct: !args.http1_hyper,
    };
    let admin = match &subscriptions {
        Some(subscriptions) => Some(
            admin::Admin::start(
                subscriptions,
                args.admin_listen,
                args.admin_token.as_deref(),
                limits,
            )
            .await,
        ),
        None => None,
    };
    // Replay and the hub key streams alike: path, query and credentials unless told otherwise.
    let mut key = PathAndQuery::new().credential_headers(args.credential_headers.clone());
    if args.share_across_credentials {
        key = key.share_across_credentials();
    }
    if let Some(names) = &args.key_query {
        key = key.query_params(names.clone());
    }
    // One builder, one order: the hub keys streams like replay and records into its store, so
    // it keeps recording while it lingers.
    let mut stack = SseStack::new();
    if !args.no_initial_comment {
        stack = stack.initial_comment(args.initial_comment.clone());
    }
    let stack = stack
        .compression(args.compression.then(SseCompressionLayer::new))
        .reconnect_delay(retry.map(|retry| {
            ReconnectDelayLayer::new(retry).jitter(Duration::from_millis(args.retry_jitter))
        }))
        .metadata(
            (args.metadata_as_comment || !args.headers_as_comment.is_empty()).then(|| {
                CommentMetadataLayer::new()
                    .headers_as_comment(args.headers_as_comment.clone())
                    .metadata_as_comment(args.metadata_as_comment)
            }),
        )
        .heartbeat(positive(args.heartbeat))
        .lifetime(lifetime)
        .idle_timeout(positive(args.idle_timeout))
        .response_timeout(positive(args.response_timeout))
        .replay({
            let replay = replay
                .key(key)
                .upstream_resumes(args.upstream_resumes || args.upstream.is_none());
            if args.history_lost_event.is_empty() {
                replay
            } else {
                replay.history_lost_event(args.history_lost_event.clone())
            }
        })
        .fanout(args.fanout.then(|| {
            FanoutLayer::new()
                .linger(Duration::from_secs_f64(args.linger))
                .max_subscriptions(args.fanout_max_subscriptions)
        }))
        .maybe_subscriptions(subscriptions);
    let service = stack.layer(inner);
    let service = admin::Gate::new(service, admin);
    // Printed here, not in `serve`, which the admin listener runs too.
    println!("Ctrl-C to stop.");
    let service = ops::Ops::new(service, metrics);
    if args.workers == 0 {
        serve(listener, service, shutdown, limits).await;
    } else {
        serve_on_workers(args.workers, listener, service, shutdown, limits).await;
    }
}

/// What the gateway serves: a service of its requests that every connection shares and every
/// request clones, whose futures move between threads.
trait Served<B>:
    Service<
        Request<RequestBody>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> Served<B> for S where
    S: Service<
            Request<RequestBody>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// One worker per CPU core where listeners can share an address (`SO_REUSEPORT`), else one
/// multi-threaded runtime. Thread per core keeps the tail short when the cores are busy: no thread
/// is woken to share a burst (README, Sizing).
fn default_workers() -> usize {
    if cfg!(unix) {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    } else {
        0
    }
}

/// A listener on `addr`; with `reuse_port`, one more listener can be bound to the same address
/// for each worker.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart need not wait for old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(reuse_port)?;
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// `--workers N`: `serve` on N threads, each with a single-threaded runtime and a listener of its
/// own on `listener`'s address. Connections stay on the thread that accepted them: no work
/// stealing, no wake-up crossing threads. Stores and hubs are shared as they are between tasks.
async fn serve_on_workers<S, B>(
    workers: usize,
    listener: TcpListener,
    service: S,
    shutdown: Shutdown,
    limits: Limits,
) where
    S: Served<B>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => return eprintln!("cannot read the listening address: {error}"),
    };
    let mut first = Some(listener.into_std());
    let mut threads = Vec::with_capacity(workers);
    for worker in 0..workers {
        let listener = match first.take() {
            Some(listener) => listener,
            None => bind(addr, true).and_then(TcpListener::into_std),
        };
        let (service, shutdown) = (service.clone(), shutdown.clone());
        let thread = std::thread::Builder::new()
            .name(format!("gateway-worker-{worker}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    serve(TcpListener::from_std(listener?)?, service, shutdown, limits).await;
                    Ok::<_, std::io::Error>(())
                })
            });
        match thread {
            Ok(thread) => threads.push(thread),
            Err(error) => eprintln!("cannot start worker {worker}: {error}"),
        }
    }
    let joined = tokio::task::spawn_blocking(move || {
        for (worker, thread) in threads.into_iter().enumerate() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("worker {worker} failed: {error}"),
                Err(_) => eprintln!("worker {worker} panicked"),
            }
        }
    });
    let _ = joined.await;
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    // Asked for before any other thread starts: every thread started later (the runtime's, the
    // workers') inherits the main thread's slice.
    let cpu_slice = limits::request_cpu_slice(Duration::from_micros(args.sched_slice));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(start(args, cpu_slice))
}

async fn start(args: Args, cpu_slice: std::io::Result<limits::CpuSlice>) -> Result<(), BoxError> {
    // Warnings by default (Redis failing, writes dropped, a store that cannot keep up);
    // `RUST_LOG=tower_sse=debug` and the like for more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    #[cfg(unix)]
    let open_files = limits::raise_open_files_limit();
    let metrics = ops::install_recorder()?;
    let listener = bind(args.listen, args.workers > 0)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("tower-sse gateway listening on http://{addr}");
    #[cfg(unix)]
    match open_files {
        Ok((before, after)) if before != after => {
            println!("  open files limit raised from {before} to {after}")
        }
        Ok((_, limit)) => println!("  open files limit: {limit}"),
        Err(error) => println!("  open files limit not raised: {error}"),
    }
    match cpu_slice {
        _ if args.sched_slice == 0 => {}
        Ok(limits::CpuSlice::Applied(slice)) => {
            println!("  CPU slice of serving threads: {} µs", slice / 1_000)
        }
        Ok(limits::CpuSlice::Requested(slice)) => println!(
            "  CPU slice of serving threads: {} µs requested (the kernel does not show its slices)",
            slice / 1_000
        ),
        Ok(limits::CpuSlice::Unsupported) => {
            println!("  CPU slice: the kernel's own (custom slices need Linux 6.12 or later)")
        }
        Ok(limits::CpuSlice::OtherPolicy) => {
            println!("  CPU slice: the kernel's own (the gateway runs with a scheduling policy of its own)")
        }
        Err(error) => println!("  CPU slice not requested: {error}"),
    }
    if let Some(url) = &args.redis {
        let events = if args.replay > 0 { args.replay } else { 1_000 };
        let config = RedisConfig::default()
            .prefix(args.redis_prefix.clone())
            .max_len(events);
        let store = if args.redis_cluster {
            RedisStore::open_cluster(url.split(','), config)
        } else {
            RedisStore::open(url, config)
        }
        .map_err(|e| format!("--redis {url}: {e}"))?;
        println!("  replay history in Redis at {url} ({events} events per stream)");
        if !store.connected(Duration::from_secs(2)).await {
            println!("  Redis is not answering yet: streams flow, recording starts when it does");
        }
        let subscriptions = args
            .subscriptions
            .then(|| Subscriptions::new(store.subscriptions()));
        let stores = Stores {
            replay: ReplayLayer::with_store(store),
            subscriptions,
        };
        run(&args, listener, addr, stores, metrics).await;
    } else {
        let limits = MemoryLimits::default()
            .events_per_key(args.replay)
            .max_bytes(args.replay_max_bytes)
            .max_keys(args.replay_max_keys);
        let mut replay = ReplayLayer::with_store(MemoryStore::with_limits(limits));
        if args.replay == 0 {
            replay = replay.qos(Qos::None);
        }
        let stores = Stores {
            replay,
            subscriptions: args.subscriptions.then(Subscriptions::in_memory),
        };
        run(&args, listener, addr, stores, metrics).await;
    }
    Ok(())
}

/// Serves the stack in front of the upstream, or the demo, with its stores.
async fn run<St: ReplayStore, Sub: SubscriptionStore>(
    args: &Args,
    listener: TcpListener,
    addr: SocketAddr,
    stores: Stores<St, Sub>,
    metrics: PrometheusHandle,
) {
    println!("  metrics: http://{addr}/metrics   status stream: http://{addr}/status");
    if args.subscriptions {
        let example = args.topic_path.replace("{topic}", "news");
        match (&args.admin_listen, &args.admin_token) {
            (None, None) => println!(
                "  subscriptions API: off; --admin-listen ADDR serves it on a listener of its own, \
                 --admin-token TOKEN on this port behind the token"
            ),
            (None, Some(_)) => println!(
                "  subscriptions API: curl -H 'Authorization: Bearer <admin token>' -X POST http://{addr}/topics/news/subscriptions"
            ),
            // The admin listener prints its address once it is bound.
            (Some(_), _) => {}
        }
        println!("  read a subscription: curl -N http://{addr}/subscriptions/<id>/subscribe   (topic stream: {example})");
    }
    match &args.upstream {
        Some(upstream) => {
            println!("  proxying every request to {upstream}");
            println!("  try: curl -N http://{addr}/<path of an event stream>");
            serve_gateway(
                args,
                listener,
                proxy::Proxy::new(upstream.clone(), args.stream_reader),
                stores,
                metrics,
            )
            .await;
        }
        None => {
            println!("  page:   http://{addr}/");
            println!("  stream: http://{addr}/events   (try: curl -N http://{addr}/events)");
            let every = match args.demo_rate {
                Some(rate) if rate > 0.0 => Duration::from_secs_f64(1.0 / rate),
                _ => Duration::from_millis(args.demo_interval.max(1)),
            };
            let demo = demo::Demo::new(every, args.demo_size);
            serve_gateway(args, listener, demo, stores, metrics).await;
        }
    }
}

/// Whether a new connection opens with HTTP/2's preface (prior knowledge: the gateway speaks
/// plain TCP, where clients choose HTTP/2 only that way), looked at without reading it: the
/// connection then goes to hyper's HTTP/1 or HTTP/2 server directly. (hyper-util's automatic
/// builder does the same with a buffer and a connection state that holds both protocols, which
/// costs every idle HTTP/1 stream about 8 KB more.) Nearly always decided by the first byte:
/// an HTTP/1 request line differs from the preface at once, except for a `PRI` request.
async fn speaks_http2(stream: &tokio::net::TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut start = [0u8; PREFACE.len()];
    loop {
        let Ok(seen) = stream.peek(&mut start).await else {
            return false;
        };
        if seen == 0 || start[..seen] != PREFACE[..seen] {
            return false;
        }
        if seen == PREFACE.len() {
            return true;
        }
        // Part of the preface so far: peeking again at once would find the same bytes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pin_project_lite::pin_project! {
    /// Serves `connection` until it ends; once `shutdown` fires, it takes no new request (HTTP/1
    /// keep-alive ends, HTTP/2 sends GOAWAY) and ends after the responses in flight.
    ///
    /// The shutdown is polled with every wake of the connection: a [`Triggered`] reads a flag
    /// when polled again, where a watch channel (hyper-util's `GracefulShutdown`) takes a lock
    /// that every connection shares. A future of its own, not an `async fn`: that would hold the
    /// connection twice over in the task (as its argument and as the pinned local).
    struct Graceful<C> {
        #[pin]
        connection: C,
        shutdown: Option<Triggered>,
    }
}

impl<C> Graceful<C> {
    fn new(connection: C, shutdown: Triggered) -> Self {
        Self {
            connection,
            shutdown: Some(shutdown),
        }
    }
}

impl<C: GracefulConnection> Future for Graceful<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if let Some(shutdown) = this.shutdown {
            if Pin::new(shutdown).poll(cx).is_ready() {
                *this.shutdown = None;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        this.connection.poll(cx)
    }
}

/// The peer's address, put into every request's extensions for the proxy's `X-Forwarded-For`.
#[derive(Clone, Copy, Debug)]
struct PeerAddr(SocketAddr);

/// A connection's way into the gateway's service, for hyper and for [`stream_writer`] alike.
struct Handler<S, B> {
    service: std::sync::Arc<S>,
    peer: SocketAddr,
    /// Told of every request, so a connection that never sends a first one can be closed.
    started: std::sync::Arc<tokio::sync::Notify>,
    /// HTTP/2 streams the client stops granting window to.
    stalls: Option<std::sync::Arc<limits::StallWatch>>,
    body_timeout: Option<Duration>,
    /// The answer to the first request hyper reads: [`stream_writer`] made it, and handed the
    /// connection to hyper to write it.
    /// (A lock no one else takes: it makes the handler `Sync` for the writer's borrow.)
    answered: std::sync::Mutex<Option<Response<limits::Watched<B>>>>,
}

/// A response on its way, boxed: hyper keeps a slot the size of this future for the
/// connection's whole life, and the stack's future (a clone of every layer, then their futures)
/// is kilobytes; boxed, it is freed once the response head is out.
type Answer<B> =
    Pin<Box<dyn Future<Output = Result<Response<limits::Watched<B>>, Infallible>> + Send>>;

impl<S, B> Handler<S, B>
where
    S: Served<B>,
    B: Body<Data = Bytes> + Send + 'static,
{
    fn handle(&self, mut request: Request<IncomingBody>) -> Answer<B> {
        self.started.notify_one();
        request.extensions_mut().insert(PeerAddr(self.peer));
        let held = self
            .stalls
            .as_ref()
            .filter(|_| request.version() == http::Version::HTTP_2)
            .map(|watch| watch.register());
        let response = S::clone(&self.service)
            .oneshot(request.map(|body| limits::BodyTimeout::new(body, self.body_timeout)));
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| limits::Watched::new(body, held)))
        })
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Handler<S, B>
where
    S: Served<B>,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<limits::Watched<B>>;
    type Error = Infallible;
    type Future = Answer<B>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let answered = self
            .answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(response) = answered {
            return Box::pin(std::future::ready(Ok(response)));
        }
        self.handle(request.map(Either::Left))
    }
}

/// The per-connection limits of `--header-timeout`, `--body-timeout`, `--send-timeout` and
/// `--http1-buffer`, and how HTTP/1 responses are written (`--http1-writev`, `--http1-hyper`).
#[derive(Clone, Copy, Debug)]
struct Limits {
    header: Option<Duration>,
    body: Option<Duration>,
    send: Option<Duration>,
    writev: bool,
    http1_buffer: usize,
    /// Event streams over HTTP/1 are written by [`stream_writer`], not hyper.
    direct: bool,
}

/// Accepts HTTP/1 and HTTP/2 connections until Ctrl-C (or SIGTERM), then shuts down gracefully:
/// `shutdown` ends every open event stream at its next boundary, so connections finish.
async fn serve<S, B>(listener: TcpListener, service: S, shutdown: Shutdown, limits: Limits)
where
    S: Served<B>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut http1 = http1::Builder::new();
    // What hyper holds for a client that stopped reading, beyond the socket's own buffer
    // (hyper's default is about 400 KiB per connection), and the longest request head.
    http1
        .max_buf_size(limits.http1_buffer)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        // Copying an event into the connection's write buffer and sending it with one `write`
        // costs less than queueing it for a `writev` with its chunk framing: about 4 % of the
        // CPU per event under load (README, Sizing). Either way at most `max_buf_size` waits,
        // but the copy's buffer keeps its size once a slow client made it grow.
        .writev(limits.writev);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    // An HTTP/2 client that stops answering pings is gone; its first request is timed below.
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header)
        .keep_alive_timeout(limits.header.unwrap_or(Duration::from_secs(20)));
    let builders = std::sync::Arc::new((http1, http2));
    let shared = std::sync::Arc::new(service);
    // Every connection's task holds a sender: all are gone once the last connection ended.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut signal = std::pin::pin!(shutdown_signal());
    let mut backoff = limits::AcceptBackoff::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff.accepted();
                    accepted
                }
                Err(error) => {
                    // Out of file descriptors, the connection stays in the backlog and the next
                    // accept fails at once: wait, longer while it goes on, never spin.
                    let wait = backoff.failed(&error);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = &mut signal => break,
                    }
                }
            },
            () = &mut signal => break,
        };
        // Events are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        // Shared: a connection holds a pointer to the stack (its clone is some 800 bytes), and
        // each request clones it for as long as its response head takes.
        let service = shared.clone();
        // Told of every request, so a connection that never sends a first one can be closed.
        let started = std::sync::Arc::new(tokio::sync::Notify::new());
        // HTTP/2 streams the client stops granting window to, which the socket cannot show.
        let stalls = limits
            .send
            .map(|_| std::sync::Arc::new(limits::StallWatch::new()));
        let handler = Handler {
            service,
            peer,
            started: started.clone(),
            stalls: stalls.clone(),
            body_timeout: limits.body,
            answered: std::sync::Mutex::new(None),
        };
        let builders = builders.clone();
        let (open, mut triggered) = (open.clone(), shutdown.triggered());
        tokio::spawn(async move {
            let connection = async move {
                let http2 = speaks_http2(&stream).await;
                let mut io = limits::SendTimeout::new(stream, limits.send);
                if !http2 {
                    let mut read = Bytes::new();
                    if limits.direct {
                        let bounds = stream_writer::Bounds {
                            buffer: limits.http1_buffer,
                            header: limits.header,
                        };
                        let call = |request: Request<()>| {
                            handler.handle(request.map(|()| Either::Right(Empty::new())))
                        };
                        match stream_writer::serve(&mut io, call, bounds, &mut triggered).await {
                            Handoff::Closed(ended) => return Some(ended),
                            Handoff::Hyper {
                                read: unanswered,
                                response,
                            } => {
                                read = unanswered;
                                *handler.answered.lock().unwrap_or_else(|e| e.into_inner()) =
                                    response;
                            }
                        }
                    }
                    let io = TokioIo::new(stream_writer::Rewind::new(io, read));
                    let connection = builders.0.serve_connection(io, handler);
                    return Some(
                        Graceful::new(connection, triggered)
                            .await
                            .map_err(Into::into),
                    );
                }
                let io = TokioIo::new(io);
                // A stalled stream closes its connection (by dropping it): the client is too
                // slow for anything more graceful.
                let stalled = async {
                    match (&stalls, limits.send) {
                        (Some(stalls), Some(limit)) => stalls.stalled(limit).await,
                        _ => std::future::pending().await,
                    }
                };
                // Boxed: the task is sized for the HTTP/1 connection most streams use.
                Box::pin(async {
                    tokio::select! {
                        ended = Graceful::new(builders.1.serve_connection(io, handler), triggered) => Some(ended.map_err(Into::into)),
                        () = stalled => None,
                    }
                })
                .await
            };
            // Whatever the protocol (before hyper even knows which one it is), a connection that
            // sends no complete request head within the header timeout is closed.
            let no_first_request = async {
                if let Some(limit) = limits.header {
                    if tokio::time::timeout(limit, started.notified())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                std::future::pending().await
            };
            let ended = tokio::select! {
                ended = connection => ended,
                () = no_first_request => None,
            };
            drop(open);
            // None: no request head in time, or a stalled HTTP/2 stream; the connection was
            // closed by dropping it, and there is nothing to report.
            let Some(ended) = ended else { return };
            if let Err(error) = ended {
                if !client_left(&*error) {
                    eprintln!("connection from {peer} ended with an error: {error}");
                }
            }
        });
    }
    // Once per process: every worker's listener and the admin's stop alike.
    static ANNOUNCED: std::sync::Once = std::sync::Once::new();
    ANNOUNCED.call_once(|| {
        println!("shutting down: ending open event streams at their next event boundary");
    });
    shutdown.trigger();
    // Streams end within the lifetime layer's grace period; this bound is a last resort.
    let deadline = LifetimeLayer::DEFAULT_GRACE + Duration::from_secs(5);
    drop(open);
    if tokio::time::timeout(deadline, all_closed.recv())
        .await
        .is_err()
    {
        println!("connections still open after {deadline:?}: closing them");
    }
}

/// A client leaving an endless stream is how streams normally end: the connection closes while
/// a body is being read or written. A client closed for its own slowness (header or send
/// timeout) is not worth a line either: under a slowloris attack there would be thousands.
fn client_left(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(|error| error.is_incomplete_message() || error.is_timeout())
        {
            return true;
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, TimedOut};
            if matches!(
                io.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | TimedOut
            ) {
                return true;
            }
        }
        cause = error.source();
    }
    false
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
