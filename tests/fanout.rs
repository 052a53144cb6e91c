//! The fan-out hub over real sockets: a counting upstream, the hub in a hyper server, and real
//! HTTP clients on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tower::ServiceBuilder;
use tower_sse::fanout::FanoutLayer;
use tower_sse::replay::{MemoryStore, ReplayLayer};

use support::{alive_tasks, proxy, read_ids, serve, subscribe, until, Upstream, GUARD};

/// 1,000, or fewer where the open-files limit cannot hold 1,000 clients and their server sides in
/// this one process (`.ci/run` raises the limit, so CI always runs 1,000).
fn client_count() -> usize {
    let soft_limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(usize::MAX);
    let clients = 1_000.min(soft_limit.saturating_sub(256) / 2);
    if clients < 1_000 {
        assert!(
            std::env::var_os("CI").is_none(),
            "the open-files limit ({soft_limit}) is too low for 1,000 clients under CI"
        );
        eprintln!("open-files limit {soft_limit}: running {clients} clients instead of 1,000");
    }
    clients
}

/// Serves replay + fan-out in front of `upstream`; returns the address.
async fn gateway(upstream: SocketAddr, fanout: FanoutLayer) -> SocketAddr {
    let store = MemoryStore::new();
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store.clone()))
        .layer(fanout.record_into(store))
        .service(proxy(upstream));
    serve(service).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_cost_one_upstream_connection_and_the_hub_ends_after_its_linger() {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let fanout = FanoutLayer::new().linger(Duration::from_millis(200));
    let addr = gateway(upstream_addr, fanout.clone()).await;
    let baseline = alive_tasks();

    let count = client_count();
    let mut clients = Vec::new();
    for _ in 0..count {
        clients.push(tokio::spawn(subscribe(addr, None)));
    }
    let mut readers = Vec::new();
    for client in clients {
        readers.push(client.await.unwrap());
    }
    until("every client attached", || fanout.clients() == count).await;
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
    assert_eq!(fanout.subscriptions(), 1);

    let expected: Vec<usize> = (1..=20).collect();
    let send = {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            for id in 1..=20 {
                upstream.send(id, "tick").await;
            }
        })
    };
    let mut reads = Vec::new();
    for mut reader in readers {
        reads.push(tokio::spawn(async move {
            let ids = read_ids(&mut reader, 20).await;
            (ids, reader)
        }));
    }
    let mut readers = Vec::new();
    for read in reads {
        let (ids, reader) = read.await.unwrap();
        assert_eq!(ids, expected);
        readers.push(reader);
    }
    send.await.unwrap();
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);

    // Everyone leaves: after the linger the upstream stream closes and every task is gone.
    drop(readers);
    until("no attached client", || fanout.clients() == 0).await;
    until("the subscription to close", || fanout.subscriptions() == 0).await;
    until("the upstream stream to be closed", || {
        upstream
            .feeds
            .lock()
            .unwrap()
            .iter()
            .all(|feed| feed.is_closed())
    })
    .await;
    until("tasks back to the baseline", || alive_tasks() <= baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_that_reconnects_within_the_linger_misses_nothing() {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let fanout = FanoutLayer::new().linger(Duration::from_secs(20));
    let addr = gateway(upstream_addr, fanout.clone()).await;

    let mut client = subscribe(addr, None).await;
    until("the upstream stream", || {
        upstream.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    for id in 1..=3 {
        upstream.send(id, "before").await;
    }
    assert_eq!(read_ids(&mut client, 3).await, [1, 2, 3]);
    drop(client);
    until("the client to leave", || fanout.clients() == 0).await;

    // The upstream cannot resume; the hub keeps listening and recording meanwhile.
    for id in 4..=6 {
        upstream.send(id, "while away").await;
    }
    let mut client = subscribe(addr, Some("3")).await;
    for id in 7..=8 {
        upstream.send(id, "after").await;
    }
    assert_eq!(read_ids(&mut client, 5).await, [4, 5, 6, 7, 8]);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_disconnected_while_the_others_get_everything() {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let fanout = FanoutLayer::new().queue_capacity(64);
    let addr = gateway(upstream_addr, fanout.clone()).await;

    let mut readers = Vec::new();
    for _ in 0..10 {
        readers.push(subscribe(addr, None).await);
    }
    // A client that sends its request and never reads a byte, with a small receive buffer (so
    // the kernel's autotuning does not swallow the test's stream).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /topic HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    until("11 attached clients", || fanout.clients() == 11).await;

    // Enough to fill the stalled client's socket buffers many times over, sent no faster than
    // the readers read (a hub never holds its upstream back, so a burst beyond every reader's
    // queue would cut them all): at most 32 events ahead of the slowest reader.
    const EVENTS: usize = 4_000;
    let data = "x".repeat(4 * 1024);
    let progress: Vec<Arc<AtomicUsize>> = (0..readers.len()).map(|_| Arc::default()).collect();
    let mut reads = Vec::new();
    for (mut reader, progress) in readers.into_iter().zip(progress.clone()) {
        reads.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(EVENTS);
            while ids.len() < EVENTS {
                ids.extend(read_ids(&mut reader, 1).await);
                progress.store(ids.len(), Ordering::Release);
            }
            (ids, reader)
        }));
    }
    for id in 1..=EVENTS {
        let slowest = || progress.iter().map(|p| p.load(Ordering::Acquire)).min();
        if slowest().unwrap_or(0) + 32 < id {
            until("the readers to keep up", || {
                slowest().unwrap_or(0) + 16 >= id
            })
            .await;
        }
        upstream.send(id, &data).await;
    }
    let expected: Vec<usize> = (1..=EVENTS).collect();
    let mut readers = Vec::new();
    for read in reads {
        let (ids, reader) = read.await.unwrap();
        assert_eq!(ids, expected);
        readers.push(reader);
    }
    // The stalled client was cut off: the hub let it go, and the server closed its connection
    // (reading what its buffers hold ends, rather than waiting forever).
    until("the stalled client to be dropped", || {
        fanout.clients() == 10
    })
    .await;
    let mut sink = vec![0; 1 << 16];
    timeout(GUARD, async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the stalled connection is closed");
}
