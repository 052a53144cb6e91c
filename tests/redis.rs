//! `RedisStore` against a real redis-server that the tests start: the store itself, two gateway
//! stacks sharing one Redis, and Redis going away and coming back under live traffic.

mod support;

use std::time::Duration;

use bytes::Bytes;
use tower::ServiceBuilder;
use tower_sse::fanout::FanoutLayer;
use tower_sse::replay::{
    Lookup, ReadFrom, RedisConfig, RedisStore, ReplayLayer, ReplayStore, StoredEvent,
};

use support::redis::{RedisCluster, RedisServer};
use support::{proxy, read_ids, serve, subscribe, subscribe_with_headers, until, Upstream, GUARD};

fn event(id: &str) -> StoredEvent {
    StoredEvent {
        id: Bytes::copy_from_slice(id.as_bytes()),
        bytes: Bytes::from(format!("id: {id}\ndata: event {id}\n\n")),
    }
}

async fn store(server: &RedisServer, config: RedisConfig) -> RedisStore {
    let store = RedisStore::open(&server.url(), config).unwrap();
    assert!(store.connected(GUARD).await, "connected to Redis");
    store
}

fn ids(lookup: Lookup) -> Vec<String> {
    match lookup {
        Lookup::Found(events) => events
            .iter()
            .map(|e| String::from_utf8(e.id.to_vec()).unwrap())
            .collect(),
        other => panic!("expected events recorded without interruption: {other:?}"),
    }
}

async fn wait_appended(store: &RedisStore, n: u64) {
    until("appends to reach Redis", || store.stats().appended >= n).await;
}

#[tokio::test]
async fn appends_reads_dedupes_trims_and_escapes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server, RedisConfig::default().prefix("t1:")).await;
    let key = Bytes::from_static(b"/prices?currency=eur");
    for id in ["1", "2", "3", "4", "5"] {
        store.append(&key, event(id));
    }
    wait_appended(&store, 5).await;
    let after_two = store.read(&key, ReadFrom::After(b"2"), 10).await.unwrap();
    assert_eq!(ids(after_two), ["3", "4", "5"]);
    let limited = store.read(&key, ReadFrom::After(b"1"), 2).await.unwrap();
    assert_eq!(ids(limited), ["2", "3"]);
    let oldest = store.read(&key, ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!(ids(oldest), ["1", "2", "3", "4", "5"]);
    let newest = store.read(&key, ReadFrom::Newest, 2).await.unwrap();
    assert_eq!(ids(newest), ["4", "5"], "the newest, oldest first");
    let unknown = store.read(&key, ReadFrom::After(b"9"), 10).await.unwrap();
    assert_eq!(unknown, Lookup::Unknown);
    let nothing = store
        .read(&Bytes::from_static(b"/none"), ReadFrom::After(b"1"), 10)
        .await
        .unwrap();
    assert_eq!(nothing, Lookup::Unknown);

    // Another instance records the same events: each is stored once.
    let other = self::store(&server, RedisConfig::default().prefix("t1:")).await;
    for id in ["4", "5", "6"] {
        other.append(&key, event(id));
    }
    wait_appended(&other, 3).await;
    let all = store.read(&key, ReadFrom::Oldest, 100).await.unwrap();
    assert_eq!(ids(all), ["1", "2", "3", "4", "5", "6"]);
    // The bytes come back as they went in.
    let Lookup::Found(events) = store.read(&key, ReadFrom::After(b"5"), 1).await.unwrap() else {
        panic!("id 5 is retained");
    };
    assert_eq!(events, [event("6")]);

    // Keys and ids made of the layout's own characters stay apart.
    let tricky = Bytes::from_static(b"/prices?currency=eur}:s");
    store.append(&tricky, event("1"));
    store.append(&key, event("}:i:1"));
    wait_appended(&store, 7).await;
    let tricky_events = store.read(&tricky, ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!(ids(tricky_events), ["1"]);
    let after = store
        .read(&key, ReadFrom::After(b"}:i:1"), 10)
        .await
        .unwrap();
    assert_eq!(ids(after), Vec::<String>::new());

    // Trim keeps the newest; zero forgets the key.
    store.trim(&key, 2);
    other.trim(&tricky, 0);
    tokio::time::timeout(GUARD, async {
        loop {
            let oldest = store.read(&key, ReadFrom::Oldest, 10).await.unwrap();
            if ids(oldest).len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the trim lands");
    assert_eq!(
        store.read(&key, ReadFrom::After(b"2"), 10).await.unwrap(),
        Lookup::Unknown,
        "a trimmed id is unknown"
    );
    let stats = store.stats();
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.failed_reads, 0);
}

/// What Redis holds for the replay store: its number of keys, and the entries of one key's
/// stream and of its id index.
async fn redis_holds(server: &RedisServer, prefix: &str, key: &str) -> (usize, usize, usize) {
    let client = redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: usize = redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .unwrap();
    let stream: usize = redis::cmd("XLEN")
        .arg(format!("{prefix}{{{key}}}:s"))
        .query_async(&mut connection)
        .await
        .unwrap();
    let index: usize = redis::cmd("HLEN")
        .arg(format!("{prefix}{{{key}}}:i"))
        .query_async(&mut connection)
        .await
        .unwrap();
    (keys, stream, index)
}

/// Waits until Redis holds `expected` (see [`redis_holds`]).
async fn until_holds(
    server: &RedisServer,
    prefix: &str,
    key: &str,
    expected: (usize, usize, usize),
) {
    let mut held = redis_holds(server, prefix, key).await;
    let deadline = tokio::time::Instant::now() + GUARD;
    while held != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis holds {held:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        held = redis_holds(server, prefix, key).await;
    }
}

/// Ids live exactly as long as the entries they name: past `max_len`, and after a trim, Redis
/// holds two keys per stream and one index entry per retained event (before, a key per id
/// outlived its entry by the TTL: 10,044 keys for 144 entries).
#[tokio::test]
async fn redis_holds_no_id_past_its_entry() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = store(&server, RedisConfig::default().prefix("t3:").max_len(10)).await;
    let key = Bytes::from_static(b"/k");
    for n in 0..500 {
        store.append(&key, event(&n.to_string()));
    }
    wait_appended(&store, 500).await;
    assert_eq!(redis_holds(&server, "t3:", "/k").await, (2, 10, 10));
    let newest = store.read(&key, ReadFrom::Oldest, 100).await.unwrap();
    let expected: Vec<String> = (490..500).map(|n| n.to_string()).collect();
    assert_eq!(ids(newest), expected);
    assert_eq!(
        store.read(&key, ReadFrom::After(b"489"), 10).await.unwrap(),
        Lookup::Unknown,
        "a trimmed id is unknown"
    );
    // A trimmed id may come back: it is recorded again.
    store.append(&key, event("3"));
    store.trim(&key, 4);
    wait_appended(&store, 501).await;
    until_holds(&server, "t3:", "/k", (2, 4, 4)).await;
    let newest = store.read(&key, ReadFrom::Oldest, 100).await.unwrap();
    assert_eq!(ids(newest), ["497", "498", "499", "3"]);
    store.trim(&key, 0);
    until_holds(&server, "t3:", "/k", (0, 0, 0)).await;
}

/// Appends dropped because the queue was full (Redis frozen) leave a marker in Redis: this
/// instance still replays everything from its local tier, and another instance reading across
/// the hole is told (`Lookup::Interrupted`), never handed a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_appends_are_marked_and_another_instance_is_told() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let config = RedisConfig::default()
        .prefix("t4:")
        .timeout(Duration::from_millis(100))
        .queue(2)
        .batch(1);
    let store = store(&server, config.clone()).await;
    let key = Bytes::from_static(b"/k");
    store.append(&key, event("1"));
    wait_appended(&store, 1).await;
    server.freeze(true);
    // The writer takes 2 and waits on Redis; 3 and 4 fill the queue; 5 and 6 are dropped.
    store.append(&key, event("2"));
    until("the writer to wait on Redis", || store.stats().retried > 0).await;
    for id in ["3", "4", "5", "6"] {
        store.append(&key, event(id));
    }
    assert_eq!(store.stats().dropped, 2);
    server.freeze(false);
    wait_appended(&store, 4).await;
    // The next append puts the marker first.
    store.append(&key, event("7"));
    wait_appended(&store, 5).await;

    let all = store.read(&key, ReadFrom::After(b"1"), 10).await.unwrap();
    assert_eq!(
        ids(all),
        ["2", "3", "4", "5", "6", "7"],
        "the local tier has them"
    );
    let other = self::store(&server, config).await;
    let interrupted = |lookup: Lookup| match lookup {
        Lookup::Interrupted { events, resumable } => {
            let ids: Vec<String> = events
                .iter()
                .map(|e| String::from_utf8(e.id.to_vec()).unwrap())
                .collect();
            (ids, resumable)
        }
        other => panic!("expected the hole to be reported: {other:?}"),
    };
    let across = other.read(&key, ReadFrom::After(b"1"), 10).await.unwrap();
    assert_eq!(
        interrupted(across),
        (vec!["2".into(), "3".into(), "4".into(), "7".into()], false)
    );
    let from_four = other.read(&key, ReadFrom::After(b"4"), 10).await.unwrap();
    assert_eq!(interrupted(from_four), (vec!["7".into()], false));
    // Past the hole the history is whole again; read from the oldest, the marker is no event.
    let past = other.read(&key, ReadFrom::After(b"7"), 10).await.unwrap();
    assert_eq!(past, Lookup::Found(Vec::new()));
    let oldest = other.read(&key, ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!(ids(oldest), ["1", "2", "3", "4", "7"]);
}

#[tokio::test]
async fn assigned_ids_are_unique_across_instances() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let first = store(&server, RedisConfig::default()).await;
    let second = store(&server, RedisConfig::default()).await;
    let key = Bytes::from_static(b"/k");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1_000 {
        assert!(seen.insert(first.next_id(&key)));
        assert!(seen.insert(second.next_id(&key)));
    }
}

/// Replay over a Redis store in front of a proxy to `upstream`.
async fn gateway(upstream: std::net::SocketAddr, store: RedisStore) -> std::net::SocketAddr {
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store))
        .service(proxy(upstream));
    serve(service).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_instance_without_gap_or_duplicate() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store_a = store(&server, RedisConfig::default()).await;
    let store_b = store(&server, RedisConfig::default()).await;
    resume_on_another_instance(store_a, store_b).await;
}

/// A client reads on instance A, goes, and resumes on instance B: no gap, no duplicate.
async fn resume_on_another_instance(store_a: RedisStore, store_b: RedisStore) {
    // Counted from here: a store may have written other keys before (the cluster test's did).
    let (appended_a, appended_b) = (store_a.stats().appended, store_b.stats().appended);
    let (upstream_addr, upstream) = Upstream::serve().await;
    let a = gateway(upstream_addr, store_a.clone()).await;
    let b = gateway(upstream_addr, store_b.clone()).await;

    // A recorder stays on A throughout; the client reads 1-3 on A, then goes.
    let mut recorder = subscribe(a, None).await;
    let mut client = subscribe(a, None).await;
    until("two upstream streams", || {
        upstream.feeds.lock().unwrap().len() == 2
    })
    .await;
    for id in 1..=3 {
        upstream.send(id, "on A").await;
    }
    assert_eq!(read_ids(&mut client, 3).await, [1, 2, 3]);
    drop(client);
    for id in 4..=5 {
        upstream.send(id, "while away").await;
    }
    assert_eq!(read_ids(&mut recorder, 5).await, [1, 2, 3, 4, 5]);
    wait_appended(&store_a, appended_a + 5).await;

    // It comes back on B with the id it saw last: B replays 4 and 5 from Redis, then live.
    let mut client = subscribe(b, Some("3")).await;
    assert_eq!(read_ids(&mut client, 2).await, [4, 5]);
    until("B's upstream stream", || {
        upstream.feeds.lock().unwrap().len() >= 3
    })
    .await;
    for id in 6..=7 {
        upstream.send(id, "live").await;
    }
    assert_eq!(read_ids(&mut client, 2).await, [6, 7]);
    // Both instances recorded 6 and 7; Redis holds each once.
    wait_appended(&store_b, appended_b + 2).await;
    let all = store_b
        .read(&Bytes::from_static(b"/topic"), ReadFrom::Oldest, 100)
        .await
        .unwrap();
    assert_eq!(ids(all), ["1", "2", "3", "4", "5", "6", "7"]);
}

/// A store on the cluster: connected, or the test fails.
async fn cluster_store(cluster: &RedisCluster, config: RedisConfig) -> RedisStore {
    let store = RedisStore::open_cluster(cluster.urls(), config).unwrap();
    assert!(store.connected(GUARD).await, "connected to the cluster");
    store
}

/// Replay on a real three-master Redis Cluster: stream keys spread over the masters, each
/// written and read on its own slot; a client resumes on another instance; the master that
/// serves a live stream is killed and restarted (empty) mid-stream: the stream flows on, a
/// client reconnecting to the recording instance misses nothing, and once the master is back the
/// appends it missed are written, so the other instance replays them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_a_cluster_resumes_anywhere_and_rides_out_a_master_restart() {
    let Some(mut cluster) = RedisCluster::start() else {
        return;
    };
    let config = RedisConfig::default().timeout(Duration::from_millis(300));
    let first = cluster_store(&cluster, config.clone()).await;
    let second = cluster_store(&cluster, config.clone()).await;
    let keys: Vec<Bytes> = (0..12).map(|n| Bytes::from(format!("/k{n}"))).collect();
    for key in &keys {
        for id in 1..=5 {
            first.append(key, event(&id.to_string()));
        }
    }
    wait_appended(&first, 60).await;
    for key in &keys {
        let after = second.read(key, ReadFrom::After(b"2"), 10).await.unwrap();
        assert_eq!(ids(after), ["3", "4", "5"], "{key:?}");
    }
    resume_on_another_instance(first.clone(), second.clone()).await;

    // A live stream through the hub on the first instance.
    let (upstream_addr, upstream) = Upstream::serve().await;
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(first.clone()))
        .layer(FanoutLayer::new().record_into(first.clone()))
        .service(proxy(upstream_addr));
    let addr = serve(service).await;
    let mut client = subscribe(addr, Some("7")).await;
    until("the upstream stream", || {
        upstream.feeds.lock().unwrap().len() == 1
    })
    .await;
    let appended = first.stats().appended;
    upstream.send(8, "before").await;
    assert_eq!(read_ids(&mut client, 1).await, [8]);
    wait_appended(&first, appended + 1).await;

    // The master serving the stream dies: the stream flows on, writes wait.
    let owner = cluster.owner_of("sse:{/topic}:s");
    owner.kill();
    for id in 9..=15 {
        upstream.send(id, "master down").await;
    }
    assert_eq!(read_ids(&mut client, 7).await, (9..=15).collect::<Vec<_>>());
    until("a failed write to be sent again", || {
        first.stats().retried > 0
    })
    .await;
    let (headers, mut resumed) = subscribe_with_headers(addr, Some("10")).await;
    assert_eq!(headers["sse-resumed-from"], "last-event-id");
    assert_eq!(
        read_ids(&mut resumed, 5).await,
        (11..=15).collect::<Vec<_>>()
    );

    // It comes back empty; the writes that waited are made, and the other instance has them.
    cluster.owner_of("sse:{/topic}:s").restart();
    cluster.wait_ok();
    upstream.send(16, "master back").await;
    assert_eq!(read_ids(&mut client, 1).await, [16]);
    wait_appended(&first, appended + 9).await;
    let elsewhere = second
        .read(&Bytes::from_static(b"/topic"), ReadFrom::After(b"10"), 100)
        .await
        .unwrap();
    assert_eq!(ids(elsewhere), ["11", "12", "13", "14", "15", "16"]);
    assert_eq!(first.stats().dropped, 0);
}

/// Redis killed mid-stream and restarted empty: the live stream never stops; a client that
/// reconnects to the recording instance during the outage gets every event it missed, exactly
/// once, from the instance's local tier; the appends that failed reach Redis once it is back, in
/// order, so another instance replays them too. (Before, every reconnect during an outage skipped
/// what was recorded meanwhile, and those events never reached Redis.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_loses_nothing_and_recording_catches_up() {
    if let Some(server) = RedisServer::start() {
        outage(server).await;
    }
}

/// The same with Redis keeping an append-only file: it comes back with what it had, and what
/// was recorded during the outage follows without a hole (before, a client resuming on another
/// instance got `last-event-id` and then a hole of every event recorded while Redis was down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_aof_gets_the_outage_without_a_hole() {
    if let Some(server) = RedisServer::start_with_aof() {
        outage(server).await;
    }
}

async fn outage(mut server: RedisServer) {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let config = RedisConfig::default().timeout(Duration::from_millis(200));
    let store = store(&server, config.clone()).await;
    let fanout = FanoutLayer::new();
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store.clone()))
        .layer(fanout.record_into(store.clone()))
        .service(proxy(upstream_addr));
    let addr = serve(service).await;
    let mut client = subscribe(addr, None).await;
    until("the upstream stream", || {
        upstream.feeds.lock().unwrap().len() == 1
    })
    .await;
    upstream.send(1, "recorded").await;
    assert_eq!(read_ids(&mut client, 1).await, [1]);
    wait_appended(&store, 1).await;

    // Redis dies: every live event still arrives; the writes that fail are sent again.
    server.kill();
    for id in 2..=20 {
        upstream.send(id, "redis down").await;
    }
    let expected: Vec<usize> = (2..=20).collect();
    assert_eq!(read_ids(&mut client, 19).await, expected);
    until("a failed write to be sent again", || {
        store.stats().retried > 0
    })
    .await;
    // A client reconnecting to this instance gets what it missed from the local tier.
    let (headers, mut resumed) = subscribe_with_headers(addr, Some("5")).await;
    assert_eq!(headers["sse-resumed-from"], "last-event-id");
    assert_eq!(
        read_ids(&mut resumed, 15).await,
        (6..=20).collect::<Vec<_>>()
    );
    upstream.send(21, "still live").await;
    assert_eq!(read_ids(&mut resumed, 1).await, [21]);
    assert_eq!(read_ids(&mut client, 1).await, [21]);
    // Answered by the local tier, without waiting on the Redis the writer found down.
    let stats = store.stats();
    assert!(stats.local_reads > 0, "{stats:?}");
    assert_eq!(stats.dropped, 0);

    // Redis comes back empty (it kept nothing on disk): the writes waiting are made, in order.
    server.restart();
    upstream.send(22, "redis back").await;
    assert_eq!(read_ids(&mut client, 1).await, [22]);
    wait_appended(&store, 22).await;
    // Another instance, with nothing of its own, replays them from Redis.
    let other = self::store(&server, config).await;
    let (upstream_addr, _other_upstream) = Upstream::serve().await;
    let other_addr = gateway(upstream_addr, other.clone()).await;
    let (headers, mut elsewhere) = subscribe_with_headers(other_addr, Some("10")).await;
    assert_eq!(headers["sse-resumed-from"], "last-event-id");
    assert_eq!(
        read_ids(&mut elsewhere, 12).await,
        (11..=22).collect::<Vec<_>>()
    );
    assert_eq!(other.stats().local_reads, 0, "answered by Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_times_out_and_the_client_gets_the_live_stream() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (upstream_addr, upstream) = Upstream::serve().await;
    let config = RedisConfig::default().timeout(Duration::from_millis(200));
    let store = store(&server, config).await;
    let addr = gateway(upstream_addr, store.clone()).await;
    server.freeze(true);
    let started = std::time::Instant::now();
    let mut client = subscribe(addr, Some("1")).await;
    // The lookup timed out: no replay, the live stream instead (measured, not asserted: the
    // guard above bounds it).
    let waited = started.elapsed();
    until("the upstream stream", || {
        upstream.feeds.lock().unwrap().len() == 1
    })
    .await;
    upstream.send(2, "live").await;
    assert_eq!(read_ids(&mut client, 1).await, [2]);
    assert!(store.stats().failed_reads >= 1);
    server.freeze(false);
    eprintln!("response with a frozen Redis after {waited:?}");
}
