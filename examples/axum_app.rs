//! An existing axum app (JSON routes and an SSE route) gains the tower-sse layers.
//!
//! ```text
//! cargo run --example axum_app
//! curl -N http://127.0.0.1:3001/events       # the stream, with the SSE header policy
//! curl -i http://127.0.0.1:3001/api/status   # JSON, untouched
//! ```
//!
//! The layers go on the whole router: they recognise event streams by their Content-Type, so
//! the JSON routes pass through untouched. The strict `Accept` check is a route layer on the
//! stream route only, since it would turn JSON clients away.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio_stream::{wrappers::IntervalStream, Stream, StreamExt};
use tower::ServiceBuilder;
use tower_sse::lifetime::{LifetimeLayer, Shutdown};
use tower_sse::{PassthroughLayer, SseHeadersLayer};

#[derive(Debug, Serialize)]
struct Status {
    ok: bool,
    version: &'static str,
}

async fn status() -> Json<Status> {
    Json(Status {
        ok: true,
        version: env!("CARGO_PKG_VERSION"),
    })
}

async fn events() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut n = 0u64;
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_secs(1))).map(move |_| {
        n += 1;
        Ok(Event::default().id(n.to_string()).data(format!("tick {n}")))
    });
    Sse::new(ticks).keep_alive(KeepAlive::default())
}

fn app() -> Router {
    Router::new()
        .route("/api/status", get(status))
        .route(
            "/events",
            get(events).route_layer(SseHeadersLayer::new().strict_accept(true)),
        )
        .layer(
            ServiceBuilder::new()
                .layer(SseHeadersLayer::new())
                .layer(PassthroughLayer::new().initial_comment("ok")),
        )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("axum app on http://{}", listener.local_addr()?);
    println!("  curl -N http://127.0.0.1:3001/events");
    println!("  curl -i http://127.0.0.1:3001/api/status");
    // Graceful shutdown would wait on open event streams forever (axum #2673): the lifetime
    // layer ends each at its next event boundary when Ctrl-C fires the shutdown signal.
    let shutdown = Shutdown::new();
    let app = app().layer(LifetimeLayer::new().shutdown(&shutdown));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.after(tokio::signal::ctrl_c()))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::{header, Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn json_is_untouched_and_the_stream_gets_the_policy() {
        let response = app()
            .oneshot(Request::get("/api/status").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert!(response.headers().get("x-accel-buffering").is_none());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["ok"], true);

        let response = app()
            .oneshot(Request::get("/events").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        let mut reader = tower_sse::wire::EventReader::new(response.into_body());
        assert_eq!(
            reader.next_event().await.unwrap().unwrap().comments(),
            ["ok"]
        );
        let tick = reader.next_event().await.unwrap().unwrap();
        assert_eq!(tick.data().as_deref(), Some("tick 1"));

        let json_client = Request::get("/events")
            .header(header::ACCEPT, "application/json")
            .body(Body::empty())
            .unwrap();
        let response = app().oneshot(json_client).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
    }
}
