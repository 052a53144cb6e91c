//! The gateway example as a child process, for the tests that run it as a user does.
//!
//! `cargo test` builds the examples before it runs tests, so the binary is next to the test's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

use super::GUARD;

/// Where `cargo test` put the gateway example.
pub fn binary() -> PathBuf {
    let mut path = std::env::current_exe().unwrap();
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path.join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX))
}

/// A running gateway on a free loopback port, killed when dropped.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Gateway {
    /// Starts the gateway with `--listen 127.0.0.1:0` and `args`, and reads its address from
    /// the first line it prints.
    pub async fn start(args: &[&str]) -> Self {
        let binary = binary();
        assert!(
            binary.exists(),
            "{} not built: run `cargo build --all-features --example gateway`",
            binary.display()
        );
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = timeout(GUARD, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let addr = first
            .rsplit("http://")
            .next()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        // Keep reading stdout so the gateway never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
    }

    /// Starts the gateway as a proxy of `upstream`, with no heartbeats, and `args`.
    pub async fn proxy(upstream: SocketAddr, args: &[&str]) -> Self {
        let upstream = format!("http://{upstream}");
        let mut all = vec!["--heartbeat", "0", "--upstream", upstream.as_str()];
        all.extend_from_slice(args);
        Self::start(&all).await
    }

    /// The URL of `path` on this gateway.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
