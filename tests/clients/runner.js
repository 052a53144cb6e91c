// Drives EventSource through a list of streams the test server hands out and reports what the
// client saw. The same file runs in the browser (loaded by the test page) and in Node (with the
// npm `eventsource` package): `node runner.js http://127.0.0.1:PORT SUITE`.
"use strict";

// Reads one stream until it ends (the first error), or, for `reconnects` > 0, through that many
// reconnects. Reports each event's type, data and lastEventId, and each open and error.
function readStream(base, stream) {
  return new Promise((resolve) => {
    const started = Date.now();
    const seen = { url: stream.url, events: [], opens: [], errors: [], states: [] };
    const source = new EventSource(base + stream.url);
    let done = false;
    const finish = () => {
      if (!done) {
        done = true;
        source.close();
        resolve(seen);
      }
    };
    const onEvent = (event) => {
      seen.events.push({
        type: event.type,
        data: event.data,
        lastEventId: event.lastEventId,
        at: Date.now() - started,
      });
      if (stream.until && seen.events.length >= stream.until) finish();
    };
    for (const type of stream.types) source.addEventListener(type, onEvent);
    source.onopen = () => seen.opens.push(Date.now() - started);
    source.onerror = () => {
      seen.errors.push(Date.now() - started);
      seen.states.push(source.readyState);
      if (!stream.until || seen.errors.length > (stream.maxErrors || 50)) finish();
    };
    setTimeout(finish, stream.timeoutMs || 10000);
  });
}

async function run(base, suite) {
  const streams = await (await fetch(base + "/streams?suite=" + suite)).json();
  const results = [];
  for (const stream of streams) {
    results.push(await readStream(base, stream));
  }
  await fetch(base + "/report?suite=" + suite, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(results),
  });
}

if (typeof window === "undefined") {
  // Node: the npm package provides EventSource; fetch is built in.
  globalThis.EventSource = require("eventsource");
  const [base, suite] = process.argv.slice(2);
  run(base, suite).catch((error) => {
    console.error(error);
    process.exit(1);
  });
} else {
  const suite = new URLSearchParams(location.search).get("suite");
  run(location.origin, suite).catch((error) =>
    fetch("/report?suite=" + suite, { method: "POST", body: JSON.stringify({ error: String(error) }) })
  );
}
