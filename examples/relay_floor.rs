//! Not an SSE tool: the floor of what a tokio proxy costs per event, to measure the gateway
//! against. One task per connection on tokio's multi-threaded runtime, as the gateway runs; the
//! client's request head is sent to the upstream as it came, then the upstream's bytes go to
//! the client as they arrive, unparsed (no HTTP on the response path, no layers, no keep-alive).
//!
//! ```sh
//! cargo build --release --example relay_floor --example gateway
//! bash benches/probes/ab_load_b.sh target/release/examples/relay_floor \
//!   target/release/examples/gateway HARNESS_BIN_DIR 3 -- \
//!   -- --heartbeat 15 --idle-timeout 60 --replay 1000
//! ```
//!
//! It takes the gateway's `--listen ADDR` and `--upstream http://HOST:PORT` and ignores every
//! other argument, so the load scripts run it in the gateway's place. Loopback measurements
//! only: it trusts its clients (a request head is read up to 16 KiB, nothing is checked).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The request head's bound: beyond it the connection is dropped.
const MAX_HEAD: usize = 16 * 1024;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|arg| arg == flag)
            .and_then(|at| args.get(at + 1))
            .ok_or("usage: relay_floor --listen ADDR --upstream http://HOST:PORT")
    };
    let listen: SocketAddr = value("--listen")?.parse()?;
    let upstream = value("--upstream")?
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let listener = TcpListener::bind(listen).await?;
    println!("relay_floor listening on http://{}", listener.local_addr()?);
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(relay(client, upstream.clone()));
    }
}

/// One connection: its request head to the upstream, then the upstream's bytes back until
/// either side closes.
async fn relay(mut client: TcpStream, upstream: String) {
    let _ = client.set_nodelay(true);
    let mut head = Vec::with_capacity(1024);
    let mut buf = vec![0; 4096];
    while !head.windows(4).any(|end| end == b"\r\n\r\n") {
        match client.read(&mut buf).await {
            Ok(n) if n > 0 && head.len() + n <= MAX_HEAD => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let Ok(mut up) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    if up.write_all(&head).await.is_err() {
        return;
    }
    while let Ok(n @ 1..) = up.read(&mut buf).await {
        if client.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
