//! Throughput of the wire core: the parser and the boundary scanner, next to the least work any
//! line-based reader must do (finding every CR and LF with `memchr`), measured in the same run.
//!
//! ```text
//! cargo bench --bench wire
//! ```
//!
//! Each input is fed whole and in 1460-byte chunks (a TCP segment's payload), the chunks cut
//! before timing. Ratios to read: parser / memchr_lines and scanner / memchr_lines.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tower_sse::wire::{Event, Limits, Parser, Scanner};

const EVENTS: usize = 10_000;
/// Events in the `large` input, each with one 64 KiB data line (4 MiB in all).
const LARGE_EVENTS: usize = 64;

fn small() -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..EVENTS {
        out.extend_from_slice(
            format!("id: {n}\nevent: tick\ndata: {{\"n\":{n},\"msg\":\"hello world\"}}\n\n")
                .as_bytes(),
        );
    }
    out
}

fn multiline() -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..EVENTS {
        out.extend_from_slice(format!(": event {n}\nid: {n}\n").as_bytes());
        for line in 0..5 {
            out.extend_from_slice(
                format!("data: line {line} of a multi-line payload\n").as_bytes(),
            );
        }
        out.push(b'\n');
    }
    out
}

fn large() -> Vec<u8> {
    let payload = "x".repeat(64 * 1024);
    let mut out = Vec::new();
    for n in 0..LARGE_EVENTS {
        out.extend_from_slice(format!("id: {n}\ndata: {payload}\n\n").as_bytes());
    }
    out
}

/// `count` events of about `size` bytes each (id, data padding, blank line).
fn sized(size: usize, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size * count);
    for n in 0..count {
        let head = format!("id: {n}\ndata: ");
        let pad = size.saturating_sub(head.len() + 2);
        out.extend_from_slice(head.as_bytes());
        out.extend(std::iter::repeat_n(b'x', pad));
        out.extend_from_slice(b"\n\n");
    }
    out
}

fn crlf() -> Vec<u8> {
    String::from_utf8(small())
        .unwrap()
        .replace('\n', "\r\n")
        .into_bytes()
}

fn chunked(stream: &Bytes, size: usize) -> Vec<Bytes> {
    (0..stream.len())
        .step_by(size)
        .map(|start| stream.slice(start..(start + size).min(stream.len())))
        .collect()
}

fn parse(chunks: &[Bytes]) -> usize {
    let mut parser = Parser::with_limits(Limits::unbounded());
    let mut events = 0;
    for chunk in chunks {
        parser.push(chunk.clone());
        while let Some(event) = parser.next_event() {
            black_box(event.unwrap());
            events += 1;
        }
    }
    events
}

fn scan(chunks: &[Bytes]) -> usize {
    let mut scanner = Scanner::new();
    let mut boundaries = 0;
    for chunk in chunks {
        if scanner.scan(chunk).unwrap().is_some() {
            boundaries += 1;
        }
    }
    boundaries
}

fn memchr_lines(chunks: &[Bytes]) -> usize {
    chunks
        .iter()
        .map(|chunk| memchr::memchr2_iter(b'\r', b'\n', chunk).count())
        .sum()
}

fn wire(c: &mut Criterion) {
    let inputs = [
        ("small", small(), EVENTS),
        ("multiline", multiline(), EVENTS),
        ("large", large(), LARGE_EVENTS),
        ("crlf", crlf(), EVENTS),
    ];
    for (name, stream, events) in inputs {
        group(
            c,
            name,
            Bytes::from(stream),
            events,
            &[("whole", 0), ("1460B", 1460)],
        );
    }
    // The performance issue's sizes: 64 B, 1 KiB and 64 KiB events (about 1 MiB of each), whole
    // and cut into 1 B to 16 KiB chunks.
    let chunkings: &[(&str, usize)] = &[
        ("whole", 0),
        ("1B", 1),
        ("64B", 64),
        ("1460B", 1460),
        ("16KiB", 16 * 1024),
    ];
    for (name, size, count) in [
        ("64B", 64, 16 * 1024),
        ("1KiB", 1024, 1024),
        ("64KiB", 64 * 1024, 16),
    ] {
        let stream = Bytes::from(sized(size, count));
        group(c, &format!("events_{name}"), stream, count, chunkings);
    }
}

/// Parser, scanner and the memchr baseline on `stream`, in each chunking (0: whole).
fn group(c: &mut Criterion, name: &str, stream: Bytes, events: usize, chunkings: &[(&str, usize)]) {
    let mut group = c.benchmark_group(format!("wire/{name}"));
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    // Every chunking must do the same work: every event parsed, every line ending found.
    let whole = vec![stream.clone()];
    let endings = memchr_lines(&whole);
    for &(chunking, size) in chunkings {
        let chunks = if size == 0 {
            whole.clone()
        } else {
            chunked(&stream, size)
        };
        assert_eq!(parse(&chunks), events, "{name}/{chunking}: events parsed");
        assert_eq!(
            memchr_lines(&chunks),
            endings,
            "{name}/{chunking}: line endings"
        );
        assert!(
            scan(&chunks) > 0,
            "{name}/{chunking}: no event boundary found"
        );
        group.bench_with_input(
            BenchmarkId::new("parser", chunking),
            &chunks,
            |b, chunks| b.iter(|| parse(chunks)),
        );
        group.bench_with_input(
            BenchmarkId::new("scanner", chunking),
            &chunks,
            |b, chunks| b.iter(|| scan(chunks)),
        );
        group.bench_with_input(
            BenchmarkId::new("memchr_lines", chunking),
            &chunks,
            |b, chunks| b.iter(|| memchr_lines(chunks)),
        );
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let events: Vec<Event> = (0..EVENTS)
        .map(|n| {
            Event::builder()
                .id(n.to_string())
                .event("tick")
                .data(format!("{{\"n\":{n},\"msg\":\"hello world\"}}"))
                .build()
                .unwrap()
        })
        .collect();
    let encoded_len: usize = events.iter().map(Event::encoded_len).sum();
    let mut group = c.benchmark_group("wire/encode");
    group.throughput(Throughput::Bytes(encoded_len as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    group.bench_function("10k events", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(encoded_len);
            for event in &events {
                event.encode_into(&mut buf);
            }
            black_box(buf.freeze())
        })
    });
    group.finish();
}

criterion_group!(benches, wire, encode);
criterion_main!(benches);
