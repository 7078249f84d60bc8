//! A TCP proxy per directed link between nodes, so the harness can cut, stall and heal the
//! network between any two nodes without root or `tc`.
//!
//! Node `i` dials node `j` through the proxy of link `(i, j)` (`waft node --dial`), so each
//! link has its own proxy and its own state:
//! - `Up`: bytes flow.
//! - `Stalled`: bytes stop flowing in both directions (connections stay open, data waits in the
//!   proxy and the kernel's buffers), like a link that drops every packet: TCP keeps
//!   retransmitting until the link heals or a keep-alive gives up.
//! - `Cut`: every connection is reset and new ones are closed at once, like a link whose far
//!   end is unreachable.

use std::collections::BTreeMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    Stalled,
    Cut,
}

/// One directed link's proxy.
pub struct Link {
    pub addr: String,
    state: watch::Sender<LinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// A proxy on a fresh 127.0.0.1 port forwarding to `upstream`.
    pub async fn start(upstream: String) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let (state, _) = watch::channel(LinkState::Up);
        let rx = state.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let state = rx.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if *state.borrow() == LinkState::Cut {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, state.clone()), pump(sr, cw, state));
                });
            }
        });
        Link { addr, state, task }
    }

    pub fn set(&self, s: LinkState) {
        self.state.send_replace(s);
    }
}

/// Copies bytes one way while the link is up; holds them while stalled; ends on a cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<LinkState>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = state.wait_for(|s| *s == LinkState::Cut) => return,
        };
        match state.wait_for(|s| *s != LinkState::Stalled).await {
            Ok(s) if *s == LinkState::Up => {}
            _ => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Every directed link between `n` nodes.
pub struct Network {
    pub links: BTreeMap<(usize, usize), Link>,
}

impl Network {
    /// Proxies for every ordered pair of the nodes at `addrs`.
    pub async fn start(addrs: &[String]) -> Network {
        let mut links = BTreeMap::new();
        for from in 0..addrs.len() {
            for (to, addr) in addrs.iter().enumerate() {
                if from != to {
                    links.insert((from, to), Link::start(addr.clone()).await);
                }
            }
        }
        Network { links }
    }

    /// `waft node --dial` arguments for node `i`: every peer through its link's proxy.
    pub fn dial_args(&self, i: usize, addrs: &[String]) -> Vec<String> {
        self.links
            .iter()
            .filter(|((from, _), _)| *from == i)
            .flat_map(|((_, to), link)| {
                ["--dial".to_owned(), format!("{}={}", addrs[*to], link.addr)]
            })
            .collect()
    }

    /// Splits the nodes into groups that cannot reach each other (both directions).
    pub fn partition(&self, groups: &[Vec<usize>], how: LinkState) {
        for ((from, to), link) in &self.links {
            let together = groups.iter().any(|g| g.contains(from) && g.contains(to));
            link.set(if together { LinkState::Up } else { how });
        }
    }

    /// Cuts (or stalls) one direction only: `from` can no longer reach `to`.
    pub fn one_way(&self, from: usize, to: usize, how: LinkState) {
        self.links[&(from, to)].set(how);
    }

    pub fn heal(&self) {
        for link in self.links.values() {
            link.set(LinkState::Up);
        }
    }
}
