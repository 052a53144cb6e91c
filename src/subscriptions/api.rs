//! The management API: create, get, list, suspend and reactivate, delete; JSON in and out.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, LINK, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use tower_service::Service;

use super::{Created, Route, Status, Subscription, SubscriptionStore, Subscriptions};
use crate::BoxError;

/// The largest request body the API reads.
const MAX_BODY: usize = 16 * 1024;
const DEFAULT_PAGE: usize = 20;
const MAX_PAGE: usize = 100;

/// The management API of [`Subscriptions`] as a service of its own, to mount in a router; it
/// answers by the last segments of the path (`.../topics/{topic}/subscriptions`,
/// `.../subscriptions/{id}`), `404` otherwise. See the [module docs](super).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use axum::Router;
/// use http::{Request, StatusCode};
/// use tower::ServiceExt;
/// use tower_sse::subscriptions::Subscriptions;
///
/// let subscriptions = Subscriptions::in_memory().api_prefix("/admin");
/// let app: Router = Router::new()
///     .route_service("/admin/topics/{topic}/subscriptions", subscriptions.api())
///     .route_service("/admin/subscriptions/{id}", subscriptions.api());
///
/// let create = Request::post("/admin/topics/news/subscriptions").body(axum::body::Body::empty()).unwrap();
/// let created = app.oneshot(create).await.unwrap();
/// assert_eq!(created.status(), StatusCode::CREATED);
/// assert!(created.headers()["location"].to_str().unwrap().starts_with("/admin/subscriptions/"));
/// # }
/// ```
#[derive(Clone)]
pub struct SubscriptionApi<St> {
    subscriptions: Subscriptions<St>,
}

impl<St: fmt::Debug> fmt::Debug for SubscriptionApi<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionApi")
            .field("subscriptions", &self.subscriptions)
            .finish()
    }
}

impl<St> SubscriptionApi<St> {
    pub(super) fn new(subscriptions: Subscriptions<St>) -> Self {
        Self { subscriptions }
    }
}

impl<St, B> Service<Request<B>> for SubscriptionApi<St>
where
    St: SubscriptionStore,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let subscriptions = self.subscriptions.clone();
        Box::pin(async move {
            let answer = match Route::ending(request.uri().path()) {
                Some(route) => answer(subscriptions, route, request).await,
                None => error(StatusCode::NOT_FOUND, "not-found", "no such resource"),
            };
            Ok(answer.map(Full::new))
        })
    }
}

/// The answer to an API request on `route` (the subscribe route is not the API's: `404`).
pub(super) async fn answer<St, B>(
    subscriptions: Subscriptions<St>,
    route: Route,
    request: Request<B>,
) -> Response<Bytes>
where
    St: SubscriptionStore,
    B: Body,
    B::Error: Into<BoxError>,
{
    let result = match route {
        Route::TopicSubscriptions(topic) => match *request.method() {
            Method::POST => create(&subscriptions, topic, request).await,
            Method::GET | Method::HEAD => {
                let uri = request.uri().clone();
                list(&subscriptions, &topic, &uri).await
            }
            _ => Err(not_allowed("GET, HEAD, POST")),
        },
        Route::Subscription(id) => match *request.method() {
            Method::GET | Method::HEAD => get(&subscriptions, &id).await,
            Method::PATCH => patch(&subscriptions, &id, request).await,
            Method::DELETE => delete(&subscriptions, &id).await,
            _ => Err(not_allowed("GET, HEAD, PATCH, DELETE")),
        },
        Route::Subscribe(_) => Err(error(
            StatusCode::NOT_FOUND,
            "not-found",
            "subscribe through the subscriptions layer",
        )),
    };
    result.unwrap_or_else(|answer| answer)
}

type Answer = Result<Response<Bytes>, Response<Bytes>>;

/// A subscription as the API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Shown<'a> {
    id: &'a str,
    topic: &'a str,
    mode: &'static str,
    status: &'static str,
    disposable: bool,
    created_at: String,
    last_event_id: Option<String>,
    subscribe: String,
}

impl<'a> Shown<'a> {
    fn new<St: SubscriptionStore>(
        subscriptions: &Subscriptions<St>,
        subscription: &'a Subscription,
    ) -> Self {
        Self {
            id: &subscription.id,
            topic: &subscription.topic,
            mode: "sse",
            status: subscription.status.as_str(),
            disposable: subscription.disposable,
            created_at: rfc3339(subscription.created_ms),
            last_event_id: (!subscription.cursor.is_empty())
                .then(|| String::from_utf8_lossy(&subscription.cursor).into_owned()),
            subscribe: subscriptions.subscribe_path(&subscription.id),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    mode: Option<String>,
    last_event_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    status: String,
}

#[derive(Serialize)]
struct Page<'a> {
    topic: &'a str,
    total: usize,
    offset: usize,
    limit: usize,
    sort: &'a str,
    items: Vec<Shown<'a>>,
}

async fn create<St, B>(
    subscriptions: &Subscriptions<St>,
    topic: String,
    request: Request<B>,
) -> Answer
where
    St: SubscriptionStore,
    B: Body,
    B::Error: Into<BoxError>,
{
    let body: CreateBody = read_json(request.into_body(), true).await?;
    if body.mode.as_deref().is_some_and(|mode| mode != "sse") {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "unsupported-mode",
            "the only mode served is \"sse\"",
        ));
    }
    let mut subscription = Subscription::new(topic);
    if let Some(id) = body.last_event_id {
        if id.len() > 256 || id.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad-last-event-id",
                "lastEventId must be at most 256 bytes without control characters",
            ));
        }
        subscription = subscription.cursor(id);
    }
    let store = subscriptions.store();
    match store
        .create(subscription.clone(), subscriptions.config.caps)
        .await
    {
        Ok(Created::Stored) => {}
        Ok(Created::Full) => {
            return Err(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-subscriptions",
                "this topic, or the whole store, has the maximum number of subscriptions",
            ))
        }
        Err(failed) => return Err(unavailable(&failed)),
    }
    let location = format!(
        "{}/subscriptions/{}",
        subscriptions.config.api_prefix, subscription.id
    );
    let mut response = json(
        StatusCode::CREATED,
        &Shown::new(subscriptions, &subscription),
    );
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

async fn get<St: SubscriptionStore>(subscriptions: &Subscriptions<St>, id: &str) -> Answer {
    match subscriptions.store().get(id).await {
        Ok(Some(subscription)) => Ok(json(
            StatusCode::OK,
            &Shown::new(subscriptions, &subscription),
        )),
        Ok(None) => Err(not_found(id)),
        Err(failed) => Err(unavailable(&failed)),
    }
}

async fn patch<St, B>(subscriptions: &Subscriptions<St>, id: &str, request: Request<B>) -> Answer
where
    St: SubscriptionStore,
    B: Body,
    B::Error: Into<BoxError>,
{
    let body: PatchBody = read_json(request.into_body(), false).await?;
    let Some(status) = Status::from_name(&body.status) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad-status",
            "status must be \"active\" or \"suspended\"",
        ));
    };
    match subscriptions.store().set_status(id, status).await {
        Ok(Some(subscription)) => {
            if status == Status::Suspended {
                subscriptions.channels.close(id);
            }
            Ok(json(
                StatusCode::OK,
                &Shown::new(subscriptions, &subscription),
            ))
        }
        Ok(None) => Err(not_found(id)),
        Err(failed) => Err(unavailable(&failed)),
    }
}

async fn delete<St: SubscriptionStore>(subscriptions: &Subscriptions<St>, id: &str) -> Answer {
    match subscriptions.store().delete(id).await {
        Ok(true) => {
            subscriptions.channels.close(id);
            let mut response = Response::new(Bytes::new());
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
        Ok(false) => Err(not_found(id)),
        Err(failed) => Err(unavailable(&failed)),
    }
}

/// Sort orders of a list, by their name in the `sort` parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SortBy {
    CreatedAt,
    Id,
    Status,
}

async fn list<St: SubscriptionStore>(
    subscriptions: &Subscriptions<St>,
    topic: &str,
    uri: &http::Uri,
) -> Answer {
    let mut limit = DEFAULT_PAGE;
    let mut offset = 0;
    let mut sort = "createdAt";
    for pair in uri.query().unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        error(
                            StatusCode::BAD_REQUEST,
                            "bad-limit",
                            "limit must be a number from 1 to 100",
                        )
                    })?;
            }
            "offset" => {
                offset = value.parse().map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        "bad-offset",
                        "offset must be a number",
                    )
                })?;
            }
            "sort" => sort = value,
            _ => {}
        }
    }
    let (descending, by) = match sort.strip_prefix('-') {
        Some(name) => (true, name),
        None => (false, sort),
    };
    let by = match by {
        "createdAt" => SortBy::CreatedAt,
        "id" => SortBy::Id,
        "status" => SortBy::Status,
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad-sort",
                "sort must be createdAt, id or status, optionally after -",
            ))
        }
    };
    let mut all = subscriptions
        .store()
        .list(topic)
        .await
        .map_err(|failed| unavailable(&failed))?;
    // The id last, so that equal keys still give every page a stable order.
    all.sort_by(|a, b| {
        let order = match by {
            SortBy::CreatedAt => a.created_ms.cmp(&b.created_ms),
            SortBy::Id => std::cmp::Ordering::Equal,
            SortBy::Status => a.status.as_str().cmp(b.status.as_str()),
        }
        .then_with(|| a.id.cmp(&b.id));
        if descending {
            order.reverse()
        } else {
            order
        }
    });
    let total = all.len();
    let items = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|subscription| Shown::new(subscriptions, subscription))
        .collect();
    let page = Page {
        topic,
        total,
        offset,
        limit,
        sort,
        items,
    };
    let mut response = json(StatusCode::OK, &page);
    if offset.saturating_add(limit) < total {
        let next = format!(
            "<{}?limit={limit}&offset={}&sort={sort}>; rel=\"next\"",
            uri.path(),
            offset + limit
        );
        if let Ok(next) = HeaderValue::try_from(next) {
            response.headers_mut().insert(LINK, next);
        }
    }
    Ok(response)
}

/// The request body as JSON, at most [`MAX_BODY`] bytes; an empty body is the default value
/// when `empty_ok`.
async fn read_json<T, B>(body: B, empty_ok: bool) -> Result<T, Response<Bytes>>
where
    T: for<'de> Deserialize<'de> + Default,
    B: Body,
    B::Error: Into<BoxError>,
{
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(failed) if failed.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "request bodies are at most 16 KiB",
            ))
        }
        Err(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad-body",
                "the request body could not be read",
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) && empty_ok {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|failed| {
        error(
            StatusCode::BAD_REQUEST,
            "bad-json",
            &format!("the body is not the expected JSON: {failed}"),
        )
    })
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Bytes> {
    let body = serde_json::to_vec(value).expect("API values serialize");
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error answer: `{"error": code, "message": message}`.
pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    #[derive(Serialize)]
    struct Failure<'a> {
        error: &'a str,
        message: &'a str,
    }
    json(
        status,
        &Failure {
            error: code,
            message,
        },
    )
}

pub(super) fn not_found(id: &str) -> Response<Bytes> {
    error(
        StatusCode::NOT_FOUND,
        "not-found",
        &format!("no subscription {id}"),
    )
}

pub(super) fn unavailable(failed: &super::StoreError) -> Response<Bytes> {
    tracing::warn!(target: "tower_sse", error = %failed, "subscriptions: store failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
        "the subscription store is not answering; try again",
    )
}

fn not_allowed(allow: &'static str) -> Response<Bytes> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        &format!("allowed: {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// `2026-11-23T13:40:00.123Z` for milliseconds since the Unix epoch.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_441_200_123), "2026-11-23T13:40:00.123Z");
        assert_eq!(rfc3339(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }
}
