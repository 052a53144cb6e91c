//! A load client for SSE endpoints: opens N streams, parses what arrives, prints one JSON line.
//!
//! ```sh
//! cargo run --release --example gateway -- --listen 127.0.0.1:3000 --demo-rate 100 &
//! cargo run --release --example load -- --url http://127.0.0.1:3000/events --conns 1000 --secs 10
//! ```
//!
//! Per stream it checks that ids (decimal) go up by one: a smaller or equal id is a duplicate,
//! a jump is a gap. Latency is the receive time minus the send time the gateway's demo source
//! puts into each event's data (`"ts":<microseconds since the Unix epoch>`); both ends read the
//! same clock, so run them on one machine. Heartbeats are comment-only blocks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_sse::wire::EventReader;

/// Opens SSE connections and reports throughput, latency and id continuity as JSON.
#[derive(Debug, Parser)]
#[command(name = "load", about, long_about = None)]
struct Args {
    /// The event stream's http:// URL; given several times, connections take them in turn
    /// (all on the first URL's host and port).
    #[arg(long, required = true)]
    url: Vec<Uri>,
    /// Connections to open.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Seconds to measure, after every connection is open and has received its first event.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// A label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// Idle streams: wait for no event, only hold the connections open for `--secs` and count
    /// the heartbeats (comments) that arrive.
    #[arg(long)]
    idle: bool,
    /// With `--idle`: create this file once every connection is open (for memory readings).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Default)]
struct Tally {
    events: u64,
    bytes: u64,
    heartbeats: u64,
    gaps: u64,
    duplicates: u64,
    errors: u64,
    /// Latencies in microseconds.
    latencies: Vec<u32>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.events += other.events;
        self.bytes += other.bytes;
        self.heartbeats += other.heartbeats;
        self.gaps += other.gaps;
        self.duplicates += other.duplicates;
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
    }
}

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// The `"ts":<digits>` value in `data`.
fn send_time(data: &[u8]) -> Option<u128> {
    let at = memchr::memmem::find(data, b"\"ts\":")? + 5;
    let digits = data[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

async fn open(addr: SocketAddr, uri: Uri) -> Result<EventReader<hyper::body::Incoming>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    // Origin form and a Host header, as browsers send them (nginx refuses HTTP/1.1 without Host).
    let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header("host", host)
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    Ok(EventReader::new(response.into_body()))
}

/// Reads one stream until `end`; counts only what arrives after `start`.
async fn read(
    mut reader: EventReader<hyper::body::Incoming>,
    ready: Arc<tokio::sync::Barrier>,
    start: Arc<tokio::sync::OnceCell<Instant>>,
    end: Duration,
) -> Tally {
    let mut tally = Tally::default();
    let mut last_id: Option<u64> = None;
    let mut first = true;
    // A stream that falls silent ends the run for it rather than hanging it.
    let patience = end + Duration::from_secs(10);
    loop {
        let event = match tokio::time::timeout(patience, reader.next_event()).await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(_))) => {
                tally.errors += 1;
                break;
            }
            Ok(None) | Err(_) => break,
        };
        if first && event.is_message() {
            first = false;
            ready.wait().await;
        }
        let Some(started) = start.get() else {
            if let Some(id) = event.id().and_then(|id| std::str::from_utf8(id).ok()) {
                last_id = id.parse().ok();
            }
            continue;
        };
        if started.elapsed() >= end {
            break;
        }
        if !event.is_message() {
            if !event.comments().is_empty() {
                tally.heartbeats += 1;
            }
            continue;
        }
        tally.events += 1;
        tally.bytes += event.encoded_len() as u64;
        if let Some(sent) = event.data_bytes().and_then(|data| send_time(data)) {
            let latency = now_micros().saturating_sub(sent);
            tally.latencies.push(latency.min(u32::MAX as u128) as u32);
        }
        let id = event
            .id()
            .and_then(|id| std::str::from_utf8(id).ok())
            .and_then(|id| id.parse::<u64>().ok());
        if let (Some(id), Some(last)) = (id, last_id) {
            if id <= last {
                tally.duplicates += 1;
            } else if id > last + 1 {
                tally.gaps += id - last - 1;
            }
        }
        if id.is_some() {
            last_id = id.max(last_id);
        }
    }
    tally
}

/// Holds idle streams open for `--secs` and reports the heartbeats seen.
async fn idle(
    args: Args,
    readers: Vec<EventReader<hyper::body::Incoming>>,
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(path) = &args.ready_file {
        std::fs::write(path, args.conns.to_string())?;
    }
    let hold = Duration::from_secs_f64(args.secs);
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                let (mut heartbeats, mut events, mut ended) = (0u64, 0u64, false);
                let deadline = tokio::time::Instant::now() + hold;
                loop {
                    match tokio::time::timeout_at(deadline, reader.next_event()).await {
                        Ok(Some(Ok(event))) if event.is_message() => events += 1,
                        Ok(Some(Ok(_))) => heartbeats += 1,
                        Ok(_) => {
                            ended = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                (heartbeats, events, ended)
            })
        })
        .collect();
    let (mut heartbeats, mut events, mut ended) = (0, 0, 0);
    for task in tasks {
        let (h, e, x) = task.await?;
        heartbeats += h;
        events += e;
        ended += u64::from(x);
    }
    println!(
        "{{\"label\":{:?},\"conns\":{},\"secs\":{:.2},\"idle\":true,\"heartbeats\":{heartbeats},\"events\":{events},\"ended_early\":{ended}}}",
        args.label, args.conns, args.secs
    );
    Ok(())
}

fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let authority = args.url[0]
        .authority()
        .ok_or("the URL needs a host and port")?;
    let addr: SocketAddr = tokio::net::lookup_host(authority.as_str())
        .await?
        .next()
        .ok_or("the host does not resolve")?;
    let mut readers = Vec::with_capacity(args.conns);
    for url in args.url.iter().cycle().take(args.conns) {
        readers.push(open(addr, url.clone()).await?);
    }
    if args.idle {
        return idle(args, readers).await;
    }
    let ready = Arc::new(tokio::sync::Barrier::new(args.conns + 1));
    let start = Arc::new(tokio::sync::OnceCell::new());
    let end = Duration::from_secs_f64(args.secs);
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|reader| tokio::spawn(read(reader, ready.clone(), start.clone(), end)))
        .collect();
    // Measure from the moment every stream has delivered its first event.
    ready.wait().await;
    let _ = start.set(Instant::now());
    let mut total = Tally::default();
    for task in tasks {
        total.add(task.await?);
    }
    let elapsed = start.get().map_or(end, Instant::elapsed).max(end);
    let secs = elapsed.as_secs_f64();
    total.latencies.sort_unstable();
    println!(
        "{{\"label\":{:?},\"conns\":{},\"secs\":{:.2},\"events\":{},\"events_per_sec\":{:.0},\"bytes_per_sec\":{:.0},\"latency_ms\":{{\"p50\":{:.2},\"p99\":{:.2},\"p999\":{:.2}}},\"gaps\":{},\"duplicates\":{},\"heartbeats\":{},\"errors\":{}}}",
        args.label,
        args.conns,
        secs,
        total.events,
        total.events as f64 / secs,
        total.bytes as f64 / secs,
        quantile(&total.latencies, 0.5),
        quantile(&total.latencies, 0.99),
        quantile(&total.latencies, 0.999),
        total.gaps,
        total.duplicates,
        total.heartbeats,
        total.errors,
    );
    Ok(())
}
