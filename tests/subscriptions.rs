//! Provisioned subscriptions over real sockets: the whole lifecycle through a hyper server with
//! the subscriptions layer over replay and a live upstream, in memory and, with two instances,
//! against a real redis-server.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tower::ServiceBuilder;
use tower_sse::replay::{
    Lookup, MemoryStore, ReadFrom, RedisConfig, RedisStore, ReplayLayer, ReplayStore,
};
use tower_sse::subscriptions::{Caps, SubscriptionStore, Subscriptions};
use tower_sse::wire::EventReader;

use support::redis::{RedisCluster, RedisServer};
use support::{proxy, read_ids, serve, until, Upstream, GUARD};

/// One request on its own connection: the status, the headers and the body (for JSON calls).
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> http::Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    timeout(GUARD, sender.send_request(request))
        .await
        .expect("an answer in time")
        .unwrap()
}

async fn call(addr: SocketAddr, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
    let response = send(addr, method, path, body).await;
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, json)
}

/// Opens an event stream; its `sse-subscription` header and a reader.
async fn open(addr: SocketAddr, path: &str) -> (String, EventReader<Incoming>) {
    let response = send(addr, Method::GET, path, "").await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    let id = response.headers()["sse-subscription"]
        .to_str()
        .unwrap()
        .to_owned();
    (id, EventReader::new(response.into_body()))
}

/// True once the reader's stream ends (events still in flight are read first).
async fn ends(reader: &mut EventReader<Incoming>) {
    timeout(GUARD, async {
        while let Some(event) = reader.next_event().await {
            if event.is_err() {
                break;
            }
        }
    })
    .await
    .expect("the stream ends in time");
}

/// A gateway instance: the subscriptions layer, with the API (this test plays the operator),
/// over replay over a proxy to the upstream.
async fn instance<St, Sub>(
    upstream: SocketAddr,
    store: St,
    subscriptions: Subscriptions<Sub>,
) -> SocketAddr
where
    St: ReplayStore,
    Sub: SubscriptionStore,
{
    let stack = ServiceBuilder::new()
        .layer(subscriptions.layer().with_api())
        .layer(ReplayLayer::with_store(store))
        .service(proxy(upstream));
    serve(stack).await
}

/// The lifecycle, with `a` and `b` two instances (or the same one twice); `history` is the
/// replay store `b` reads.
async fn lifecycle<St: ReplayStore>(
    upstream: &Upstream,
    a: SocketAddr,
    b: SocketAddr,
    history: St,
) {
    let streams = |n: usize| {
        let upstream = upstream.clone();
        async move {
            until("upstream streams", || {
                upstream
                    .feeds
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|f| !f.is_closed())
                    .count()
                    == n
            })
            .await;
        }
    };

    // Create on A.
    let (status, created) = call(a, Method::POST, "/topics/news/subscriptions", "").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let subscribe = created["subscribe"].as_str().unwrap().to_owned();
    let one = format!("/subscriptions/{id}");

    // A plain reader of the topic keeps the upstream stream (and the recording) going.
    let (disposable, mut plain) = open(a, "/topics/news").await;
    assert_ne!(disposable, id);

    // Read 1-3 on A and leave.
    let (channel, mut reader) = open(a, &subscribe).await;
    assert_eq!(channel, id);
    streams(2).await;
    for n in 1..=3 {
        upstream.send(n, "news").await;
    }
    assert_eq!(read_ids(&mut reader, 3).await, [1, 2, 3]);
    drop(reader);
    assert_eq!(read_ids(&mut plain, 3).await, [1, 2, 3]);
    // The cursor is at 3, seen from B.
    let cursor_at = |n: &'static str| async move {
        timeout(GUARD, async {
            loop {
                let (_, got) = call(b, Method::GET, &one_path(&id), "").await;
                if got["lastEventId"] == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("cursor at {n}"));
    };
    cursor_at("3").await;

    // Events 4 and 5 while the reader is away; it comes back to B without Last-Event-ID and
    // resumes from its cursor: 4 and 5 from the replay history, then live 6.
    streams(1).await;
    upstream.send(4, "news").await;
    upstream.send(5, "news").await;
    assert_eq!(read_ids(&mut plain, 2).await, [4, 5]);
    let key = Bytes::from_static(b"/topics/news");
    timeout(GUARD, async {
        loop {
            let read = history.read(&key, ReadFrom::After(b"3"), 10).await;
            if matches!(read, Ok(Lookup::Found(events)) if events.len() == 2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("4 and 5 recorded");
    let (_, mut reader) = open(b, &subscribe).await;
    assert_eq!(read_ids(&mut reader, 2).await, [4, 5]);
    streams(2).await;
    upstream.send(6, "news").await;
    assert_eq!(read_ids(&mut reader, 1).await, [6]);
    assert_eq!(read_ids(&mut plain, 1).await, [6]);

    // The subscription and the disposable one are listed; two pages of one.
    let (_, page) = call(a, Method::GET, "/topics/news/subscriptions?limit=1", "").await;
    assert_eq!(page["total"], 2);
    let first = page["items"][0]["id"].clone();
    let (_, page) = call(
        a,
        Method::GET,
        "/topics/news/subscriptions?limit=1&offset=1",
        "",
    )
    .await;
    assert_ne!(page["items"][0]["id"], first);

    // Suspending through A closes the channel open on B, at an event boundary.
    let (status, patched) = call(a, Method::PATCH, &one, r#"{"status":"suspended"}"#).await;
    assert_eq!(
        (status, patched["status"].as_str()),
        (StatusCode::OK, Some("suspended"))
    );
    ends(&mut reader).await;
    let (status, refused) = call(b, Method::GET, &subscribe, "").await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (StatusCode::CONFLICT, Some("suspended"))
    );

    // Reactivated, it resumes after 6.
    let (status, _) = call(b, Method::PATCH, &one, r#"{"status":"active"}"#).await;
    assert_eq!(status, StatusCode::OK);
    let (_, mut reader) = open(a, &subscribe).await;
    streams(2).await;
    upstream.send(7, "news").await;
    assert_eq!(read_ids(&mut reader, 1).await, [7]);

    // Deleted through B: the channel on A closes, and every route of it is 404.
    let (status, _) = call(b, Method::DELETE, &one, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    ends(&mut reader).await;
    for (method, path) in [
        (Method::GET, &one),
        (Method::DELETE, &one),
        (Method::GET, &subscribe),
    ] {
        let (status, _) = call(a, method.clone(), path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
    }

    // The plain reader leaving removes its disposable subscription.
    drop(plain);
    timeout(GUARD, async {
        loop {
            let (_, page) = call(b, Method::GET, "/topics/news/subscriptions", "").await;
            if page["total"] == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the disposable subscription is removed");

    // Pagination over more subscriptions, following the Link header.
    for _ in 0..5 {
        call(a, Method::POST, "/topics/sport/subscriptions", "").await;
    }
    let mut next = Some("/topics/sport/subscriptions?limit=2".to_owned());
    let mut seen = Vec::new();
    while let Some(path) = next.take() {
        let response = send(b, Method::GET, &path, "").await;
        next = response.headers().get("link").map(|link| {
            let link = link.to_str().unwrap();
            link[1..link.find('>').unwrap()].to_owned()
        });
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let page: Value = serde_json::from_slice(&bytes).unwrap();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
    }
    let mut distinct = seen.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!((seen.len(), distinct.len()), (5, 5));
    let _ = upstream.requests.load(Ordering::SeqCst);
}

fn one_path(id: &str) -> String {
    format!("/subscriptions/{id}")
}

#[tokio::test]
async fn lifecycle_in_memory() {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let subscriptions = Subscriptions::in_memory();
    let store = MemoryStore::new();
    let addr = instance(upstream_addr, store.clone(), subscriptions.clone()).await;
    lifecycle(&upstream, addr, addr, store).await;
    until("channels closed", || subscriptions.open_channels() == 0).await;
}

#[tokio::test]
async fn lifecycle_across_two_instances_sharing_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let config = RedisConfig::default().prefix("subs:");
    lifecycle_on_two_instances(|| RedisStore::open(&server.url(), config.clone()).unwrap()).await;
}

/// The same lifecycle on a real three-master Redis Cluster: the subscriptions on one slot, the
/// topics' histories wherever their keys hash.
#[tokio::test]
async fn lifecycle_across_two_instances_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let config = RedisConfig::default().prefix("subs:");
    lifecycle_on_two_instances(|| {
        RedisStore::open_cluster(cluster.urls(), config.clone()).unwrap()
    })
    .await;
}

/// The lifecycle across two instances, each with a store from `open`.
async fn lifecycle_on_two_instances(open: impl Fn() -> RedisStore) {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let mut addrs = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let store = open();
        assert!(store.connected(GUARD).await);
        let subscriptions =
            Subscriptions::new(store.subscriptions()).poll_interval(Duration::from_millis(100));
        stores.push(store.clone());
        addrs.push(instance(upstream_addr, store, subscriptions).await);
    }
    lifecycle(&upstream, addrs[0], addrs[1], stores.pop().unwrap()).await;
}

#[tokio::test]
async fn the_redis_store_keeps_subscriptions_and_cursors() {
    use tower_sse::subscriptions::{Created, Status, Subscription};
    let caps = caps(2);
    let Some(server) = RedisServer::start() else {
        return;
    };
    let replay = RedisStore::open(&server.url(), RedisConfig::default().prefix("ops:")).unwrap();
    assert!(replay.connected(GUARD).await);
    let store = replay.subscriptions();
    let first = Subscription::new("news").cursor("7");
    let second = Subscription::new("news").disposable(true);
    assert_eq!(
        store.create(first.clone(), caps).await.unwrap(),
        Created::Stored
    );
    assert_eq!(
        store.create(second.clone(), caps).await.unwrap(),
        Created::Stored
    );
    let full = store.create(Subscription::new("news"), caps).await.unwrap();
    assert_eq!(full, Created::Full);

    let got = store.get(&first.id).await.unwrap().unwrap();
    assert_eq!(got, first, "every field round-trips");
    let mut listed = store.list("news").await.unwrap();
    listed.sort_by_key(|s| s.created_ms);
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|s| s.id == second.id && s.disposable));
    assert_eq!(store.list("other").await.unwrap(), vec![]);

    let suspended = store
        .set_status(&first.id, Status::Suspended)
        .await
        .unwrap();
    assert_eq!(suspended.unwrap().status, Status::Suspended);
    assert_eq!(
        store.set_status("0000", Status::Active).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .statuses(vec![first.id.clone(), second.id.clone(), "0000".into()])
            .await
            .unwrap(),
        vec![Some(Status::Suspended), Some(Status::Active), None]
    );

    // Cursors are written in the background; a cursor for a deleted subscription brings
    // nothing back, and a removed disposable subscription leaves its topic's index.
    store.save_cursor(&first.id, Bytes::from_static(b"id \xff 8"));
    until_async(|| async {
        store.get(&first.id).await.unwrap().unwrap().cursor == b"id \xff 8"[..]
    })
    .await;
    assert!(store.delete(&first.id).await.unwrap());
    assert!(!store.delete(&first.id).await.unwrap());
    store.save_cursor(&first.id, Bytes::from_static(b"9"));
    store.remove(&second.id);
    until_async(|| async { store.list("news").await.unwrap().is_empty() }).await;
    assert_eq!(store.get(&first.id).await.unwrap(), None);
    // The topic has room again.
    let again = store.create(Subscription::new("news"), caps).await.unwrap();
    assert_eq!(again, Created::Stored);

    // A disposable subscription expires unless its instance renews it (each status poll does);
    // once expired, it frees its place in a full topic.
    let short = replay
        .subscriptions()
        .disposable_ttl(Duration::from_secs(1));
    let left = Subscription::new("news").disposable(true);
    assert_eq!(
        short.create(left.clone(), caps).await.unwrap(),
        Created::Stored
    );
    let mut redis = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("ops:{{subs}}:sub:{}", left.id);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        (1..=1_000).contains(&ttl),
        "a disposable subscription expires: {ttl}"
    );
    let provisioned: i64 = redis::cmd("PTTL")
        .arg(format!("ops:{{subs}}:sub:{}", again_id(&store).await))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(provisioned, -1, "a provisioned one does not");
    // Near its end (set so here: within one millisecond a renewed TTL can read below the first
    // reading), a poll gives it its whole TTL again.
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(100)
        .query_async(&mut redis)
        .await
        .unwrap();
    short.statuses(vec![left.id.clone()]).await.unwrap();
    let renewed: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        renewed > 100 && renewed <= 1_000,
        "a poll renews it: {renewed}"
    );
    let full = store.create(Subscription::new("news"), caps).await.unwrap();
    assert_eq!(full, Created::Full);
    let freed = Subscription::new("news");
    until_async(|| async { store.create(freed.clone(), caps).await.unwrap() == Created::Stored })
        .await;
    // The index scores expiry by this process's clock and Redis expires the key by its own:
    // the key may outlive its place by a few milliseconds, never longer.
    until_async(|| {
        let mut redis = redis.clone();
        let key = key.clone();
        async move {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
            exists == 0
        }
    })
    .await;
}

fn caps(per_topic: usize) -> Caps {
    Caps {
        per_topic,
        total: 100_000,
    }
}

/// The calls of every command Redis ran (scripts' commands included), from INFO commandstats.
async fn command_calls(redis: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The store-wide cap holds in Redis, across instances and topics, disposable subscriptions
/// included; a refused create costs Redis a few commands, however many subscriptions the topic
/// holds (it used to check every id of a full topic, each time).
#[tokio::test]
async fn the_redis_caps_hold_and_a_refusal_is_cheap() {
    use tower_sse::subscriptions::{Created, Subscription};
    let Some(server) = RedisServer::start() else {
        return;
    };
    let open = || {
        let replay =
            RedisStore::open(&server.url(), RedisConfig::default().prefix("caps:")).unwrap();
        let store = replay.subscriptions();
        async move {
            assert!(replay.connected(GUARD).await);
            store
        }
    };
    let (a, b) = (open().await, open().await);
    let caps = Caps {
        per_topic: 300,
        total: 310,
    };
    // 300 in "full" through A, half of them disposable.
    for n in 0..300 {
        let subscription = Subscription::new("full").disposable(n % 2 == 0);
        assert_eq!(a.create(subscription, caps).await.unwrap(), Created::Stored);
    }
    // 10 more in other topics through B fill the store.
    for n in 0..10 {
        let subscription = Subscription::new(format!("t{n}"));
        assert_eq!(b.create(subscription, caps).await.unwrap(), Created::Stored);
    }
    for store in [&a, &b] {
        let beyond = store
            .create(Subscription::new("other"), caps)
            .await
            .unwrap();
        assert_eq!(beyond, Created::Full, "the store-wide cap holds");
    }
    assert!(b.get("0000").await.unwrap().is_none());
    // A delete makes room, for any topic.
    let listed = b.list("t3").await.unwrap();
    assert!(b.delete(&listed[0].id).await.unwrap());
    let room = b.create(Subscription::new("other"), caps).await.unwrap();
    assert_eq!(room, Created::Stored);

    let mut redis = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("caps:{subs}:sub:*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys.len(), 310);

    let before = command_calls(&mut redis).await;
    const REFUSED: u64 = 100;
    for _ in 0..REFUSED {
        let refused = a.create(Subscription::new("full"), caps).await.unwrap();
        assert_eq!(refused, Created::Full);
    }
    let after = command_calls(&mut redis).await;
    let ran = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    // Commands the scripts ran: neither the connection's own nor INFO itself.
    let inner: u64 = after
        .keys()
        .filter(|name| !matches!(name.as_str(), "eval" | "evalsha" | "script|load" | "info"))
        .map(|name| ran(name))
        .sum();
    eprintln!(
        "{REFUSED} refused creates of a topic of 300: {inner} commands inside the scripts \
         (zcard {}, zremrangebyscore {}, exists {}, zrange {})",
        ran("zcard"),
        ran("zremrangebyscore"),
        ran("exists"),
        ran("zrange")
    );
    assert!(
        ran("zcard") >= REFUSED,
        "the commands of scripts are counted"
    );
    assert_eq!(ran("exists") + ran("zrange"), 0, "no scan of the topic");
    assert!(
        inner <= 4 * REFUSED,
        "at most 4 commands per refusal, whatever the topic holds: {inner}"
    );
}

/// The id of the one provisioned subscription of "news".
async fn again_id(store: &tower_sse::subscriptions::RedisSubscriptions) -> String {
    let listed = store.list("news").await.unwrap();
    listed.into_iter().find(|s| !s.disposable).unwrap().id
}

async fn until_async<F, Fut>(condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    timeout(GUARD, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the condition in time");
}
