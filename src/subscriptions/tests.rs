use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Either, Full};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_layer::Layer;

use super::*;
use crate::test_util::next_data_within;

type TopicBody = Either<Channel<Bytes>, Full<Bytes>>;

/// What the topics' service saw: each request's path and `Last-Event-ID`.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The feeds of the streams the topics' service opened, one per request, in order.
type Feeds = mpsc::UnboundedReceiver<Sender<Bytes>>;

type TopicAnswer = std::future::Ready<Result<Response<TopicBody>, Infallible>>;

/// Serves every `/topics/{topic}` as an event stream fed by the test, and 404 (JSON) for any
/// other path.
fn topics() -> (
    Feeds,
    Seen,
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<TopicBody>,
            Error = Infallible,
            Future = TopicAnswer,
        > + Clone,
) {
    let (senders_tx, senders) = mpsc::unbounded_channel();
    let seen = Seen::default();
    let log = seen.clone();
    let service = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let id = request
            .headers()
            .get("last-event-id")
            .map(|id| id.to_str().unwrap().to_owned());
        let path = request.uri().path().to_owned();
        log.lock().unwrap().push((path.clone(), id));
        let stream = path.starts_with("/topics/")
            && !path.ends_with("/subscriptions")
            && path != "/topics/missing";
        let response = if stream {
            let (sender, body) = Channel::new(16);
            let _ = senders_tx.send(sender);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Either::Left(body))
        } else {
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header("content-type", "application/json")
                .body(Either::Right(Full::from(r#"{"error":"no topic"}"#)))
        };
        std::future::ready(Ok(response.unwrap()))
    });
    (senders, seen, service)
}

fn request(method: Method, uri: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::from(body.to_owned()))
        .unwrap()
}

/// Sends `request` through `service`; the status and the JSON body (Null when empty).
async fn call<S, B>(service: &S, request: Request<Full<Bytes>>) -> (StatusCode, Value)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = service.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, json)
}

/// A GET of `uri` through `service`.
async fn get<S>(service: &S, uri: &str) -> S::Response
where
    S: tower::Service<Request<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    service
        .clone()
        .oneshot(request(Method::GET, uri, ""))
        .await
        .unwrap()
}

async fn create<S, B>(service: &S, topic: &str) -> String
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let uri = format!("/topics/{topic}/subscriptions");
    let (status, json) = call(service, request(Method::POST, &uri, "")).await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    json["id"].as_str().unwrap().to_owned()
}

fn last_seen(seen: &Seen) -> (String, Option<String>) {
    seen.lock().unwrap().last().cloned().unwrap()
}

#[tokio::test]
async fn create_get_list_patch_delete() {
    let (_senders, _seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory().max_per_topic(6);
    let service = subscriptions.layer().with_api().layer(topics);

    let response = service
        .clone()
        .oneshot(request(
            Method::POST,
            "/topics/news/subscriptions",
            r#"{"mode":"sse"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["content-type"], "application/json");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/subscriptions/{id}"));
    assert_eq!(id.len(), 32);
    assert_eq!(created["topic"], "news");
    assert_eq!(created["mode"], "sse");
    assert_eq!(created["status"], "active");
    assert_eq!(created["disposable"], false);
    assert_eq!(created["lastEventId"], Value::Null);
    assert_eq!(
        created["subscribe"],
        format!("/subscriptions/{id}/subscribe")
    );
    assert!(created["createdAt"].as_str().unwrap().ends_with('Z'));

    let (status, got) = call(&service, request(Method::GET, &location, "")).await;
    assert_eq!((status, &got), (StatusCode::OK, &created));

    // Suspend, then reactivate.
    let (status, patched) = call(
        &service,
        request(Method::PATCH, &location, r#"{"status":"suspended"}"#),
    )
    .await;
    assert_eq!(
        (status, &patched["status"]),
        (StatusCode::OK, &json!("suspended"))
    );
    let (status, patched) = call(
        &service,
        request(Method::PATCH, &location, r#"{"status":"active"}"#),
    )
    .await;
    assert_eq!(
        (status, &patched["status"]),
        (StatusCode::OK, &json!("active"))
    );

    // Delete: 204, then 404 for everything on it.
    let (status, body) = call(&service, request(Method::DELETE, &location, "")).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = call(&service, request(method, &location, "")).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::NOT_FOUND, &json!("not-found"))
        );
    }
    let (status, _) = call(
        &service,
        request(Method::PATCH, &location, r#"{"status":"active"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let subscribe = format!("{location}/subscribe");
    let (status, _) = call(&service, request(Method::GET, &subscribe, "")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(subscriptions.store().is_empty());
}

/// The layer serves readers: the management routes go to the inner service untouched (here a
/// `404`), so an anonymous client can neither create, list, get, suspend nor delete; only the
/// API (mounted behind authentication) or an explicit `with_api` serves them.
#[tokio::test]
async fn the_layer_serves_readers_only_unless_told_otherwise() {
    let (mut senders, seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory();
    let service = subscriptions.layer().layer(topics.clone());
    let api = subscriptions.api();
    let id = create(&api, "news").await;
    let one = format!("/subscriptions/{id}");
    let no_topic = json!({"error": "no topic"});

    let anonymous = [
        request(Method::POST, "/topics/news/subscriptions", ""),
        request(Method::GET, "/topics/news/subscriptions", ""),
        request(Method::GET, &one, ""),
        request(Method::PATCH, &one, r#"{"status":"suspended"}"#),
        request(Method::DELETE, &one, ""),
    ];
    for refused in anonymous {
        let (method, path) = (refused.method().clone(), refused.uri().path().to_owned());
        let (status, body) = call(&service, refused).await;
        assert_eq!(
            (status, &body),
            (StatusCode::NOT_FOUND, &no_topic),
            "{method} {path}"
        );
        assert_eq!(
            last_seen(&seen).0,
            path,
            "{method} {path} went to the inner service"
        );
    }
    assert_eq!(subscriptions.store().len(), 1, "nothing created or deleted");
    let stored = subscriptions.store().get(&id).await.unwrap().unwrap();
    assert_eq!(stored.status, Status::Active, "not suspended");

    // Reading needs the id, and works.
    let read = get(&service, &format!("/subscriptions/{id}/subscribe")).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.headers()["sse-subscription"], id.as_str());
    let _feed = senders.recv().await.unwrap();

    assert!(subscriptions.is_api_path("/topics/news/subscriptions"));
    assert!(subscriptions.is_api_path(&one));
    assert!(!subscriptions.is_api_path(&format!("{one}/subscribe")));
    assert!(!subscriptions.is_api_path("/topics/news"));

    // Told otherwise, the layer serves the API too.
    let operator = subscriptions.layer().with_api().layer(topics);
    let (status, listed) = call(
        &operator,
        request(Method::GET, "/topics/news/subscriptions", ""),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["items"][0]["id"], id.as_str());
}

/// The store-wide cap: creates in any topic are refused with `429` once the store is full, and
/// readers beyond it still get their stream, without a disposable subscription.
#[tokio::test]
async fn the_store_wide_cap_holds_for_every_topic() {
    let (mut senders, _seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory().max_subscriptions(2);
    let service = subscriptions.layer().layer(topics);
    let api = subscriptions.api();
    create(&api, "a").await;
    let reader = get(&service, "/topics/b").await;
    assert!(reader.headers().contains_key("sse-subscription"));
    let (status, body) = call(&api, request(Method::POST, "/topics/c/subscriptions", "")).await;
    assert_eq!(
        (status, &body["error"]),
        (
            StatusCode::TOO_MANY_REQUESTS,
            &json!("too-many-subscriptions")
        )
    );
    let beyond = get(&service, "/topics/d").await;
    assert_eq!(beyond.status(), StatusCode::OK);
    assert!(!beyond.headers().contains_key("sse-subscription"));
    assert_eq!(subscriptions.store().len(), 2);
    // The reader leaving makes room.
    let _feeds = (senders.recv().await, senders.recv().await);
    drop(reader);
    create(&api, "c").await;
}

#[tokio::test]
async fn lists_page_by_page_in_any_order() {
    let (_senders, _seen, topics) = topics();
    let service = Subscriptions::in_memory().layer().with_api().layer(topics);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create(&service, "news").await);
        // Distinct creation times, so the order by time is known.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    create(&service, "sport").await;

    let list = "/topics/news/subscriptions";
    let response = get(&service, &format!("{list}?limit=2")).await;
    assert_eq!(
        response.headers()["link"],
        format!("<{list}?limit=2&offset=2&sort=createdAt>; rel=\"next\"")
    );
    let mut seen = Vec::new();
    for offset in [0, 2, 4] {
        let uri = format!("{list}?limit=2&offset={offset}");
        let (status, page) = call(&service, request(Method::GET, &uri, "")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (page["total"].as_u64(), page["offset"].as_u64()),
            (Some(5), Some(offset))
        );
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(seen, ids, "pages in creation order, each id once");
    let last = service
        .clone()
        .oneshot(request(
            Method::GET,
            &format!("{list}?limit=2&offset=4"),
            "",
        ))
        .await
        .unwrap();
    assert!(!last.headers().contains_key("link"), "no next page");

    let (_, newest_first) = call(
        &service,
        request(Method::GET, &format!("{list}?sort=-createdAt"), ""),
    )
    .await;
    let newest: Vec<&str> = newest_first["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    let mut reversed = ids.clone();
    reversed.reverse();
    assert_eq!(newest, reversed);
    let (_, by_id) = call(
        &service,
        request(Method::GET, &format!("{list}?sort=id"), ""),
    )
    .await;
    let by_id: Vec<&str> = by_id["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(by_id, sorted);

    let (_, empty) = call(
        &service,
        request(Method::GET, "/topics/none/subscriptions", ""),
    )
    .await;
    assert_eq!(
        (
            empty["total"].as_u64(),
            empty["items"].as_array().unwrap().len()
        ),
        (Some(0), 0)
    );
}

#[tokio::test]
async fn bad_requests_get_clear_answers() {
    let (_senders, _seen, topics) = topics();
    let service = Subscriptions::in_memory()
        .max_per_topic(1)
        .layer()
        .with_api()
        .layer(topics);
    let id = create(&service, "news").await;
    let one = format!("/subscriptions/{id}");
    let list = "/topics/news/subscriptions";
    let cases = [
        (
            request(Method::POST, list, "{"),
            StatusCode::BAD_REQUEST,
            "bad-json",
        ),
        (
            request(Method::POST, list, r#"{"tenant":1}"#),
            StatusCode::BAD_REQUEST,
            "bad-json",
        ),
        (
            request(Method::POST, list, r#"{"mode":"websocket"}"#),
            StatusCode::BAD_REQUEST,
            "unsupported-mode",
        ),
        (
            request(Method::POST, list, r#"{"lastEventId":"a\nb"}"#),
            StatusCode::BAD_REQUEST,
            "bad-last-event-id",
        ),
        (
            request(Method::POST, list, ""),
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-subscriptions",
        ),
        (
            request(Method::POST, list, &" ".repeat(17 * 1024)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
        ),
        (
            request(Method::PATCH, &one, r#"{"status":"paused"}"#),
            StatusCode::BAD_REQUEST,
            "bad-status",
        ),
        (
            request(Method::PATCH, &one, ""),
            StatusCode::BAD_REQUEST,
            "bad-json",
        ),
        (
            request(Method::PUT, &one, ""),
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
        ),
        (
            request(Method::POST, &format!("{one}/subscribe"), ""),
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
        ),
        (
            request(Method::GET, &format!("{list}?limit=0"), ""),
            StatusCode::BAD_REQUEST,
            "bad-limit",
        ),
        (
            request(Method::GET, &format!("{list}?limit=101"), ""),
            StatusCode::BAD_REQUEST,
            "bad-limit",
        ),
        (
            request(Method::GET, &format!("{list}?offset=-1"), ""),
            StatusCode::BAD_REQUEST,
            "bad-offset",
        ),
        (
            request(Method::GET, &format!("{list}?sort=topic"), ""),
            StatusCode::BAD_REQUEST,
            "bad-sort",
        ),
        (
            request(
                Method::GET,
                "/subscriptions/0123456789abcdef0123456789abcdef",
                "",
            ),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
    ];
    for (request, status, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (got, body) = call(&service, request).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{what}: {body}"
        );
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let response = service
        .clone()
        .oneshot(request(Method::PUT, &one, ""))
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "GET, HEAD, PATCH, DELETE");
    // Paths that are neither the API's nor a topic's go to the inner service untouched, as do
    // malformed ids and topic names.
    for path in [
        "/other",
        "/subscriptions/not%20an%20id",
        "/topics/a%2Fb/subscriptions",
    ] {
        let (status, body) = call(&service, request(Method::GET, path, "")).await;
        assert_eq!(
            (status, body),
            (StatusCode::NOT_FOUND, json!({"error": "no topic"})),
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_reader_resumes_from_the_cursor_unless_it_sends_its_own_id() {
    let (mut senders, seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory();
    let service = subscriptions.layer().layer(topics);
    let id = create(&subscriptions.api(), "news").await;
    let subscribe = format!("/subscriptions/{id}/subscribe");

    // The first read: no cursor yet, so no Last-Event-ID for the topic.
    let response = get(&service, &subscribe).await;
    assert_eq!(response.headers()["sse-subscription"], id.as_str());
    assert_eq!(last_seen(&seen), ("/topics/news".to_owned(), None));
    let mut feed = senders.recv().await.unwrap();
    let mut body = Box::pin(response.into_body());
    // An id split across frames moves the cursor only when its event is complete.
    feed.send_data("id: 1\ndata: a\n\nid: 2\nda".into())
        .await
        .unwrap();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "id: 1\ndata: a\n\nid: 2\nda"
    );
    let cursor = |subscriptions: &Subscriptions| {
        let store = subscriptions.store().clone();
        let id = id.clone();
        async move { store.get(&id).await.unwrap().unwrap().cursor }
    };
    assert_eq!(cursor(&subscriptions).await, "1");
    feed.send_data("ta: b\n\n".into()).await.unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(cursor(&subscriptions).await, "2");
    drop((body, feed));
    assert_eq!(subscriptions.open_channels(), 0);

    // Back without an id: the topic is asked from 2.
    let response = get(&service, &subscribe).await;
    assert_eq!(last_seen(&seen).1.as_deref(), Some("2"));
    drop(response);
    // The reader's own id wins, as a header or a query parameter; the rest of the query is
    // dropped, so the reader cannot steer what the subscription reads.
    let mut own = request(Method::GET, &subscribe, "");
    own.headers_mut()
        .insert("last-event-id", "1".parse().unwrap());
    drop(service.clone().oneshot(own).await.unwrap());
    assert_eq!(
        last_seen(&seen),
        ("/topics/news".to_owned(), Some("1".to_owned()))
    );
    let query = format!("{subscribe}?room=admin&lastEventId=0");
    drop(get(&service, &query).await);
    assert_eq!(
        last_seen(&seen),
        ("/topics/news".to_owned(), Some("0".to_owned()))
    );
    let mut garbage = request(Method::GET, &subscribe, "");
    garbage
        .headers_mut()
        .insert("last-event-id", "x".repeat(300).parse().unwrap());
    drop(service.clone().oneshot(garbage).await.unwrap());
    assert_eq!(
        last_seen(&seen).1.as_deref(),
        Some("2"),
        "a garbage id gives way to the cursor"
    );

    // An id-only block moves the cursor; an empty id resets it.
    let response = get(&service, &subscribe).await;
    // The newest feed is this channel's; the older ones belonged to dropped answers.
    let mut feed = senders.recv().await.unwrap();
    while let Ok(newer) = senders.try_recv() {
        feed = newer;
    }
    let mut body = Box::pin(response.into_body());
    feed.send_data("id: 9\n\n".into()).await.unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(cursor(&subscriptions).await, "9");
    feed.send_data("id\ndata: x\n\n".into()).await.unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(cursor(&subscriptions).await, "");
    drop((body, feed));
    drop(get(&service, &subscribe).await);
    assert_eq!(last_seen(&seen).1, None);

    // A subscription created with a starting point reads after it.
    let (_, created) = call(
        &subscriptions.api(),
        request(
            Method::POST,
            "/topics/news/subscriptions",
            r#"{"lastEventId":"41"}"#,
        ),
    )
    .await;
    assert_eq!(created["lastEventId"], "41");
    let subscribe = created["subscribe"].as_str().unwrap();
    drop(get(&service, subscribe).await);
    assert_eq!(last_seen(&seen).1.as_deref(), Some("41"));
}

#[tokio::test(start_paused = true)]
async fn suspending_closes_open_channels_at_a_boundary_and_refuses_new_ones() {
    let (mut senders, _seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory();
    let service = subscriptions.layer().layer(topics);
    let api = subscriptions.api();
    let id = create(&api, "news").await;
    let subscribe = format!("/subscriptions/{id}/subscribe");
    let one = format!("/subscriptions/{id}");

    let first = get(&service, &subscribe).await;
    let second = get(&service, &subscribe).await;
    let (mut feed_a, mut feed_b) = (senders.recv().await.unwrap(), senders.recv().await.unwrap());
    assert_eq!(subscriptions.open_channels(), 2);
    let mut first = Box::pin(first.into_body());
    let mut second = Box::pin(second.into_body());
    // The first channel is in the middle of event 2; the second is at a boundary.
    feed_a
        .send_data("id: 1\ndata: a\n\nid: 2\nda".into())
        .await
        .unwrap();
    feed_b.send_data("id: 1\ndata: a\n\n".into()).await.unwrap();
    first.frame().await.unwrap().unwrap();
    second.frame().await.unwrap().unwrap();

    let (status, _) = call(
        &api,
        request(Method::PATCH, &one, r#"{"status":"suspended"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The second ends at once; the first finishes event 2 and drops the start of event 3.
    assert!(second.frame().await.is_none());
    feed_a
        .send_data("ta: b\n\nid: 3\ndata: c\n\n".into())
        .await
        .unwrap();
    assert_eq!(
        first.frame().await.unwrap().unwrap().into_data().unwrap(),
        "ta: b\n\n"
    );
    assert!(first.frame().await.is_none());
    assert_eq!(
        subscriptions
            .store()
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .cursor,
        "2"
    );

    // Suspended: refused with 409, the topic is not asked.
    let (status, body) = call(&service, request(Method::GET, &subscribe, "")).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::CONFLICT, &json!("suspended"))
    );
    assert!(senders.try_recv().is_err());

    // Reactivated: readable again, and a later suspension closes the new channel too.
    call(&api, request(Method::PATCH, &one, r#"{"status":"active"}"#)).await;
    let third = get(&service, &subscribe).await;
    assert_eq!(third.status(), StatusCode::OK);
    let _feed = senders.recv().await.unwrap();
    let mut third = Box::pin(third.into_body());
    assert_eq!(
        next_data_within(third.as_mut(), Duration::from_secs(1)).await,
        None
    );
    call(&api, request(Method::DELETE, &one, "")).await;
    assert!(third.frame().await.is_none(), "deleting closes the channel");
    drop((first, second, third));
    assert_eq!(subscriptions.open_channels(), 0);
}

#[tokio::test]
async fn plain_topic_requests_get_a_disposable_subscription() {
    let (mut senders, _seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory();
    let service = subscriptions.layer().layer(topics.clone());
    let api = subscriptions.api();
    let response = get(&service, "/topics/news").await;
    let id = response.headers()["sse-subscription"]
        .to_str()
        .unwrap()
        .to_owned();
    let _feed = senders.recv().await.unwrap();
    let (_, listed) = call(&api, request(Method::GET, "/topics/news/subscriptions", "")).await;
    assert_eq!(listed["items"][0]["id"], id.as_str());
    assert_eq!(listed["items"][0]["disposable"], true);

    // Suspending it closes the channel; the channel closing removes it.
    let mut body = Box::pin(response.into_body());
    let patch = request(
        Method::PATCH,
        &format!("/subscriptions/{id}"),
        r#"{"status":"suspended"}"#,
    );
    assert_eq!(call(&api, patch).await.0, StatusCode::OK);
    assert!(body.frame().await.is_none());
    drop(body);
    let (_, listed) = call(&api, request(Method::GET, "/topics/news/subscriptions", "")).await;
    assert_eq!(listed["total"], 0);
    assert!(subscriptions.store().is_empty());

    // An answer that is not an event stream passes untouched; its record goes with it.
    let (status, body) = call(&service, request(Method::GET, "/topics/missing", "")).await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"error": "no topic"}))
    );
    assert!(subscriptions.store().is_empty());

    // Switched off: the stream, and no record.
    let plain = Subscriptions::in_memory().disposable(false);
    let service = plain.layer().layer(topics);
    let response = service
        .oneshot(request(Method::GET, "/topics/news", ""))
        .await
        .unwrap();
    assert!(!response.headers().contains_key("sse-subscription"));
    assert!(plain.store().is_empty());
}

#[tokio::test]
async fn a_prefix_and_a_topic_path_move_the_routes() {
    let (_senders, seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory()
        .api_prefix("/api/")
        .topic_path("/topics/{topic}/live");
    let service = subscriptions.layer().with_api().layer(topics);
    let response = service
        .clone()
        .oneshot(request(Method::POST, "/api/topics/news/subscriptions", ""))
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/api/subscriptions/"), "{location}");
    drop(get(&service, &format!("{location}/subscribe")).await);
    assert_eq!(last_seen(&seen).0, "/topics/news/live");
    // Without the prefix, the API is not there: the inner service answers.
    let (status, body) = call(
        &service,
        request(Method::POST, "/topics/news/subscriptions", ""),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"error": "no topic"}))
    );
    // A plain request on the topic path is a disposable channel.
    let response = service
        .oneshot(request(Method::GET, "/topics/news/live", ""))
        .await
        .unwrap();
    assert!(response.headers().contains_key("sse-subscription"));
}

#[tokio::test]
async fn the_standalone_api_answers_wherever_it_is_mounted() {
    let subscriptions = Subscriptions::in_memory();
    let api = subscriptions.api();
    let (status, created) = call(
        &api,
        request(Method::POST, "/deep/mount/topics/a/subscriptions", ""),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap();
    let (status, _) = call(
        &api,
        request(Method::GET, &format!("/elsewhere/subscriptions/{id}"), ""),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&api, request(Method::GET, "/nothing/here", "")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A memory store that says it is shared, as a Redis store is: changes made straight in the
/// store stand for another instance's.
#[derive(Clone, Debug, Default)]
struct Shared(MemorySubscriptions);

impl SubscriptionStore for Shared {
    fn create(&self, s: Subscription, caps: super::Caps) -> StoreFuture<Created> {
        self.0.create(s, caps)
    }
    fn get(&self, id: &str) -> StoreFuture<Option<Subscription>> {
        self.0.get(id)
    }
    fn list(&self, topic: &str) -> StoreFuture<Vec<Subscription>> {
        self.0.list(topic)
    }
    fn set_status(&self, id: &str, status: Status) -> StoreFuture<Option<Subscription>> {
        self.0.set_status(id, status)
    }
    fn delete(&self, id: &str) -> StoreFuture<bool> {
        self.0.delete(id)
    }
    fn save_cursor(&self, id: &str, cursor: Bytes) {
        self.0.save_cursor(id, cursor);
    }
    fn remove(&self, id: &str) {
        self.0.remove(id);
    }
    fn is_shared(&self) -> bool {
        true
    }
}

#[tokio::test(start_paused = true)]
async fn another_instance_suspending_closes_channels_within_the_poll_interval() {
    let (mut senders, _seen, topics) = topics();
    let store = Shared::default();
    let subscriptions = Subscriptions::new(store.clone()).poll_interval(Duration::from_millis(500));
    let service = subscriptions.layer().layer(topics);
    let id = create(&subscriptions.api(), "news").await;
    let response = service
        .clone()
        .oneshot(request(
            Method::GET,
            &format!("/subscriptions/{id}/subscribe"),
            "",
        ))
        .await
        .unwrap();
    let _feed = senders.recv().await.unwrap();
    let mut body = Box::pin(response.into_body());
    assert_eq!(
        next_data_within(body.as_mut(), Duration::from_secs(2)).await,
        None
    );
    let start = tokio::time::Instant::now();
    store.set_status(&id, Status::Suspended).await.unwrap();
    assert!(body.frame().await.is_none());
    assert!(
        start.elapsed() <= Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn an_event_that_never_ends_is_cut_after_the_grace_period() {
    let (mut senders, _seen, topics) = topics();
    let subscriptions = Subscriptions::in_memory();
    let service = subscriptions.layer().layer(topics);
    let id = create(&subscriptions.api(), "news").await;
    let response = service
        .clone()
        .oneshot(request(
            Method::GET,
            &format!("/subscriptions/{id}/subscribe"),
            "",
        ))
        .await
        .unwrap();
    let mut feed = senders.recv().await.unwrap();
    let mut body = Box::pin(response.into_body());
    feed.send_data("id: 1\ndata: a\n\nid: 2\ndata: half".into())
        .await
        .unwrap();
    body.frame().await.unwrap().unwrap();
    let patch = request(
        Method::PATCH,
        &format!("/subscriptions/{id}"),
        r#"{"status":"suspended"}"#,
    );
    call(&subscriptions.api(), patch).await;
    let start = tokio::time::Instant::now();
    assert!(body.frame().await.is_none());
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(
        subscriptions
            .store()
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .cursor,
        "1"
    );
}
